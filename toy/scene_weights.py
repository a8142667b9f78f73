"""Where the scene path's trained weights ship (toy/train_scene.py, toy/train_depth.py).

Paths only, nothing imported: the seg worker reads :data:`DEPTH_DIR` through
:mod:`toy.profiles` and must not load diffusers for it.
"""

from __future__ import annotations

from pathlib import Path

_WEIGHTS = Path(__file__).parent / "weights"
#: The scene generator: a StableDiffusionPipeline ``save_pretrained`` directory.
SCENE_SD_DIR = _WEIGHTS / "scene_sd"
#: The depth model: a DepthAnythingForDepthEstimation and its processor, ``save_pretrained``.
DEPTH_DIR = _WEIGHTS / "depth"

__all__ = ["DEPTH_DIR", "SCENE_SD_DIR"]
