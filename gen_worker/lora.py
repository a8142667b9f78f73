"""Per-request LoRA adapters: names resolved in ``GENSEG_LORA_DIR``, loaded once into a
pipeline, kept in a bounded LRU cache, applied per batch.

- :class:`LoraLibrary`: the adapters a worker offers. A name is one
  ``{name}.safetensors`` file or one diffusers LoRA directory ``{name}/`` directly in
  the directory; :meth:`LoraLibrary.check` refuses a request (a
  :class:`~plumbing.errors.PermanentError`) naming an unknown adapter
  (``lora_not_found``, also when no directory is set) or more adapters than the worker
  allows (``too_many_loras``).
- :class:`AdapterCache`: the adapters loaded into one set of networks (a UNet and its
  text encoders). :meth:`AdapterCache.apply` loads what a batch needs with diffusers'
  ``load_lora_weights`` (a file that is not a LoRA for this model: ``invalid_lora``),
  unloads the least recently used beyond its capacity, and activates the batch's
  adapters with their scales, or disables every adapter for a batch without any: a
  disabled peft layer computes exactly the base layer, so no state leaks between batches.

Adapters are activated in name order, whatever the request's order: their deltas are
summed in that order, so the same set gives the same bits however it was listed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plumbing.errors import PermanentError, is_out_of_memory

log = logging.getLogger(__name__)

LORA_NOT_FOUND = "lora_not_found"
INVALID_LORA = "invalid_lora"
TOO_MANY_LORAS = "too_many_loras"
SUFFIX = ".safetensors"
#: Adapters kept loaded per pipeline (at least the per-request limit).
DEFAULT_CACHE_SIZE = 8

#: ``(name, scale)`` pairs in name order: the adapter set of a batch (its key).
AdapterSet = tuple[tuple[str, float], ...]


def adapter_set(loras: Sequence[Any]) -> AdapterSet:
    """The canonical adapter set of a request's ``loras`` (``LoraSpec`` s): name order."""
    return tuple(sorted((lora.name, float(lora.scale)) for lora in loras))


@dataclass(frozen=True)
class LoraFile:
    """One adapter on disk: its request name, its path, and what identifies this version
    of it (size and modification time of its weight file), to reload a changed file."""

    name: str
    path: Path
    version: tuple[int, int]

    @property
    def adapter_name(self) -> str:
        """The name inside the pipeline: request names may hold dots, which peft's module
        dictionaries refuse."""
        return "genseg_" + hashlib.sha256(self.name.encode()).hexdigest()[:16]

    def load_args(self) -> tuple[str, dict[str, Any]]:
        """``load_lora_weights``'s source and keyword arguments for this adapter."""
        if self.path.is_dir():
            return str(self.path), {}
        return str(self.path.parent), {"weight_name": self.path.name}


def _version(path: Path) -> tuple[int, int]:
    files = sorted(path.glob("*" + SUFFIX)) if path.is_dir() else [path]
    stats = [f.stat() for f in files]
    return (sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0))


class LoraLibrary:
    """The adapters of ``GENSEG_LORA_DIR`` (``directory``; None: this worker has none) and
    how many one request may apply (``GENSEG_MAX_LORAS``)."""

    def __init__(self, directory: str | Path | None, max_per_request: int = 4) -> None:
        self.directory = Path(directory).expanduser() if directory else None
        self.max_per_request = max_per_request

    @classmethod
    def from_settings(cls, settings: Any) -> LoraLibrary:
        """``GENSEG_LORA_DIR`` and ``GENSEG_MAX_LORAS`` (default 4) of ``settings``."""
        return cls(getattr(settings, "lora_dir", None), getattr(settings, "max_loras", 4))

    def check(self, loras: Sequence[Any]) -> None:
        """Raise :class:`PermanentError` unless every adapter of a request is available."""
        if not loras:
            return
        if len(loras) > self.max_per_request:
            raise PermanentError(
                f"{len(loras)} LoRA adapters asked: this worker applies at most "
                f"{self.max_per_request} per request (GENSEG_MAX_LORAS)",
                error_type=TOO_MANY_LORAS,
            )
        for lora in loras:
            self.resolve(lora.name)

    def resolve(self, name: str) -> LoraFile:
        """The adapter ``name``: ``{name}.safetensors``, else the directory ``{name}/``."""
        if self.directory is None:
            raise PermanentError(
                f"LoRA adapter {name!r} asked, but this worker has no adapters "
                "(GENSEG_LORA_DIR is not set)",
                error_type=LORA_NOT_FOUND,
            )
        # The contract's name pattern has no separator; checked again here because this
        # is where a path is built from a name.
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise PermanentError(f"{name!r} is not a LoRA adapter name", error_type=LORA_NOT_FOUND)
        file, folder = self.directory / f"{name}{SUFFIX}", self.directory / name
        if file.parent == self.directory and file.is_file():
            return LoraFile(name, file, _version(file))
        if folder.parent == self.directory and folder.is_dir() and any(folder.glob("*" + SUFFIX)):
            return LoraFile(name, folder, _version(folder))
        raise PermanentError(
            f"no LoRA adapter {name!r} on this worker (expected {name}{SUFFIX} or a diffusers "
            f"LoRA directory {name}/ in GENSEG_LORA_DIR)",
            error_type=LORA_NOT_FOUND,
        )


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Silence the libraries' loading chatter: peft's multiple-adapter warning,
    transformers' progress bar and load report (of the text encoders' base weights, which
    an adapter leaves alone), diffusers' multi-line log of a failed load (the error we
    raise says it in one line)."""
    from transformers.utils import logging as tf_logging

    loggers = {name: logging.getLogger(name) for name in ("transformers", "diffusers")}
    levels = {name: logger.level for name, logger in loggers.items()}
    bar = tf_logging.is_progress_bar_enabled()
    for logger in loggers.values():
        logger.setLevel(logging.CRITICAL)
    tf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, logger in loggers.items():
            logger.setLevel(levels[name])
        if bar:
            tf_logging.enable_progress_bar()


def _reason(exc: BaseException, lora: LoraFile, limit: int = 300) -> str:
    """One line saying why a load failed: the error's first two lines ("Error(s) in
    loading state_dict for ...:" says little alone), with the request's adapter name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:2]) or type(exc).__name__
    text = text.replace(lora.adapter_name, lora.name)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class AdapterCache:
    """The adapters loaded into one pipeline's networks, least recently used first.

    ``capacity``: how many stay loaded (a batch's own adapters are never unloaded to
    make room for each other, so the capacity must cover one request's limit).
    ``family``: the architecture, for error messages.
    """

    def __init__(self, capacity: int = DEFAULT_CACHE_SIZE, family: str = "sd15") -> None:
        self.capacity = max(1, capacity)
        self.family = family
        self.loaded: OrderedDict[str, LoraFile] = OrderedDict()  # adapter name -> file
        #: What is active now: ((adapter name, scale), ...); () = all disabled (the base
        #: model); None = unknown (after loading or unloading, which change diffusers' choice).
        self.active: tuple[tuple[str, float], ...] | None = ()

    def apply(self, pipe: Any, adapters: Sequence[tuple[LoraFile, float]]) -> None:
        """Make ``adapters`` (file, scale) the pipeline's active set; none: base model."""
        if not adapters:
            if self.active != ():
                pipe.disable_lora()
                self.active = ()
            return
        if len(adapters) > self.capacity:
            raise PermanentError(
                f"{len(adapters)} LoRA adapters in one request, more than this worker keeps "
                f"loaded ({self.capacity})",
                error_type=TOO_MANY_LORAS,
            )
        wanted = {f.adapter_name for f, _ in adapters}
        for lora, _ in adapters:
            self._ensure_loaded(pipe, lora, keep=wanted)
        state = tuple((f.adapter_name, float(s)) for f, s in adapters)
        if state != self.active:
            pipe.enable_lora()  # undo a disable_lora(): set_adapters alone does not
            pipe.set_adapters([n for n, _ in state], adapter_weights=[s for _, s in state])
            self.active = state

    def _ensure_loaded(self, pipe: Any, lora: LoraFile, keep: set[str]) -> None:
        name = lora.adapter_name
        current = self.loaded.get(name)
        if current is not None and current.version == lora.version:
            self.loaded.move_to_end(name)
            return
        if current is not None:  # the file changed on disk: reload it
            self._unload(pipe, name)
        while len(self.loaded) >= self.capacity:
            victim = next((n for n in self.loaded if n not in keep), None)
            if victim is None:
                break
            self._unload(pipe, victim)
        source, kwargs = lora.load_args()
        self.active = None
        try:
            with _quiet_loading():
                pipe.load_lora_weights(source, adapter_name=name, **kwargs)
            if not any(name in names for names in pipe.get_list_adapters().values()):
                raise ValueError("no layer of the model matched its weights")
        except Exception as exc:
            self._discard(pipe, name)
            if is_out_of_memory(exc):
                raise
            raise PermanentError(
                f"LoRA adapter {lora.name!r} cannot be applied to this {self.family} model: "
                f"{_reason(exc, lora)}",
                error_type=INVALID_LORA,
            ) from exc
        self.loaded[name] = lora
        log.info("LoRA adapter %s loaded from %s", lora.name, lora.path)

    def _unload(self, pipe: Any, name: str) -> None:
        lora = self.loaded.pop(name)
        self._discard(pipe, name)
        log.info("LoRA adapter %s unloaded (least recently used)", lora.name)

    def _discard(self, pipe: Any, name: str) -> None:
        """Remove adapter ``name`` from every network that has it (a failed load may have
        reached some of them)."""
        self.active = None
        present = [c for c, names in pipe.get_list_adapters().items() if name in names]
        if present:
            with _quiet_loading():
                pipe.delete_adapters(name)


__all__ = [
    "DEFAULT_CACHE_SIZE",
    "INVALID_LORA",
    "LORA_NOT_FOUND",
    "TOO_MANY_LORAS",
    "AdapterCache",
    "AdapterSet",
    "LoraFile",
    "LoraLibrary",
    "adapter_set",
]
