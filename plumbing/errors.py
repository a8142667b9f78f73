"""One taxonomy of failures, used by every stage and by the runtime.

A failure is either **permanent** (retrying cannot fix it: bad input, a refused
reference, a policy refusal; the record is dead-lettered at once) or **transient**
(a store or broker hiccup, out of memory: retried with backoff, then
dead-lettered). Errors say which by their class:

- :class:`PermanentError` and :class:`TransientError` are the two roots; a
  component's own errors subclass one of them (each blob store error does, once,
  in :mod:`plumbing.blobstore`; :class:`plumbing.images.InvalidImage` is permanent);
- a record that breaks the contract (:class:`schemas.InvalidEvent`) is permanent;
- any other exception counts as transient: a bug that fails every time ends in
  the dead-letter topic after ``max_attempts``, with its class name as the reason.

Out-of-memory has one detector, :func:`is_out_of_memory`, for the generator's
batch-splitting ladder and for every stage's retries.
"""

from __future__ import annotations

import sys

from schemas import InvalidEvent


class StageError(Exception):
    """Base of the errors raised on purpose; ``error_type`` names them in dead letters."""

    #: ``error.type`` in the dead-letter event.
    error_type: str = "error"


class PermanentError(StageError):
    """Retrying cannot help (bad input, refused reference): dead-letter at once."""

    error_type = "permanent"

    def __init__(self, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        if error_type:
            self.error_type = error_type


class TransientError(StageError):
    """Worth retrying with backoff (store or broker hiccup, out of memory)."""

    error_type = "transient"


#: ``error.type`` of a dead letter whose last attempt ran out of memory.
OUT_OF_MEMORY = "out_of_memory"


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` means the device (or the host) ran out of memory.

    torch raises ``torch.OutOfMemoryError`` for CUDA allocations, but plain
    ``RuntimeError``s whose text says "out of memory" from other back ends (cuDNN,
    cuBLAS, MPS); both count, and so does Python's ``MemoryError``. torch is looked
    up only when already imported: this module must not import it.
    """
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def is_permanent(exc: BaseException) -> bool:
    """True when retrying ``exc`` cannot help: dead-letter the record at once."""
    return isinstance(exc, PermanentError | InvalidEvent)


def error_type_of(exc: BaseException) -> str:
    """``error.type`` of the dead-letter event for ``exc``."""
    if isinstance(exc, InvalidEvent):
        return "validation"
    declared = getattr(exc, "error_type", None)
    if isinstance(declared, str):
        return declared
    if is_out_of_memory(exc):
        return OUT_OF_MEMORY
    return type(exc).__name__


__all__ = [
    "OUT_OF_MEMORY",
    "PermanentError",
    "StageError",
    "TransientError",
    "error_type_of",
    "is_out_of_memory",
    "is_permanent",
]
