"""Pretrained checkpoints: which architecture one is, and loading it.

``SD_MODEL`` may be a Hugging Face id, a local diffusers directory or one
``.safetensors``/``.ckpt`` file. :func:`detect_family` tells SD 1.5 from SDXL with
diffusers' own metadata: a directory's or id's ``model_index.json`` (its pipeline class,
or a second text encoder), a single file's tensor names (diffusers'
``infer_diffusers_model_type``, reading only the few tensors it asks for).
:func:`load_pretrained` loads a pipeline class from any of the three.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from gen_worker.families import XL_PIPELINES, Family

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
#: diffusers' single-file model types that are SDXL base models (``xl_refiner`` is not:
#: it has no first text encoder and only refines images).
_XL_TYPES = {"xl_base", "xl_inpaint", "playground-v2-5"}


def is_single_file(source: str) -> bool:
    return source.lower().endswith(SINGLE_FILE_SUFFIXES) and Path(source).expanduser().is_file()


class _LazySafetensors(Mapping[str, torch.Tensor]):
    """A ``.safetensors`` file as a read-only mapping that reads a tensor when asked:
    detecting the architecture needs the names and a few shapes, not gigabytes."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt")
        self._keys = set(self._file.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _single_file_family(path: Path) -> Family:
    from diffusers.loaders.single_file_utils import (
        infer_diffusers_model_type,
        load_single_file_checkpoint,
    )

    if path.suffix.lower() == ".safetensors":
        checkpoint: Mapping[str, Any] = _LazySafetensors(path)
    else:  # a pickled .ckpt cannot be read lazily
        checkpoint = load_single_file_checkpoint(str(path))
    model_type = infer_diffusers_model_type(checkpoint)
    if model_type == "xl_refiner":
        raise ValueError(f"{path} is an SDXL refiner: it cannot generate from text, use a base")
    return "sdxl" if model_type in _XL_TYPES else "sd15"


def index_family(index: Mapping[str, Any], source: str = "the model") -> Family:
    """The family of a ``model_index.json``: SDXL pipelines name their class so, and have
    a second text encoder."""
    name = str(index.get("_class_name", ""))
    if "XL" not in name and "text_encoder_2" not in index:
        return "sd15"
    encoder = index.get("text_encoder")
    if not encoder or not any(encoder):
        raise ValueError(f"{source} is an SDXL refiner: it cannot generate from text, use a base")
    return "sdxl"


def detect_family(source: str) -> Family:
    """``sd15`` or ``sdxl`` for ``SD_MODEL``'s value (a file, a directory or a hub id).

    A hub id is read from the local cache, else downloaded (its ``model_index.json``).
    Raises ValueError for an SDXL refiner, OSError when the source cannot be read.
    """
    if is_single_file(source):
        return _single_file_family(Path(source).expanduser())
    index = DiffusionPipeline.load_config(source)
    return index_family(index, source)


def load_pretrained(
    source: str,
    cls: type[Any],
    *,
    dtype: torch.dtype = torch.float32,
    single_file_config: str | None = None,
) -> Any:
    """Load pipeline class ``cls`` from a Hugging Face id, a local directory or a single file.

    SD 1.5: the safety checker is not loaded (the images go to segmentation; a checker,
    if wanted, is the policy's, see docs/policy.md). SDXL: no invisible watermark (the
    generator decodes latents itself).
    """
    if issubclass(cls, XL_PIPELINES):
        extra: dict[str, Any] = {"add_watermarker": False}
    else:
        extra = {"safety_checker": None, "requires_safety_checker": False}
    if is_single_file(source):
        kwargs: dict[str, Any] = {"dtype": dtype, **extra}
        if single_file_config:
            kwargs["config"] = single_file_config
        log.info("loading %s from single file %s", cls.__name__, source)
        return cls.from_single_file(str(Path(source).expanduser()), **kwargs)
    log.info("loading %s from %s", cls.__name__, source)
    return cls.from_pretrained(source, dtype=dtype, **extra)


__all__ = [
    "SINGLE_FILE_SUFFIXES",
    "detect_family",
    "index_family",
    "is_single_file",
    "load_pretrained",
]
