"""The stage runtime every worker runs inside, and the downstream subscriber API."""

from consumers.stage import (
    ItemResult,
    Output,
    PermanentError,
    Phase,
    Stage,
    StageContext,
    StageError,
    TransientError,
)

__all__ = [
    "ItemResult",
    "Output",
    "PermanentError",
    "Phase",
    "Stage",
    "StageContext",
    "StageError",
    "TransientError",
]
