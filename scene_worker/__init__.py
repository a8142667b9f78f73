"""The scene stage: one scene-ready event when every view of a multi-view scene is done.

- :mod:`scene_worker.manifest`: when a scene is complete, and its event (pure);
- :mod:`scene_worker.state`: the scene's bookkeeping in the blob store;
- :mod:`scene_worker.stage`: :class:`SceneStage`, the stage the runtime runs.
"""

from scene_worker.stage import SceneStage

__all__ = ["SceneStage"]
