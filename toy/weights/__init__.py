"""Where the toy world's trained weights ship (see toy/train_sam.py and toy/train_gen.py)."""

from __future__ import annotations

from pathlib import Path

#: The toy Segment Anything (``seg_worker`` profile ``toy``), safetensors.
SAM_WEIGHTS = Path(__file__).parent / "sam.safetensors"
#: The toy generator's pipeline directory (``save_pretrained`` layout).
SD_DIR = Path(__file__).parent / "sd"

__all__ = ["SAM_WEIGHTS", "SD_DIR"]
