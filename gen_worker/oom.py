"""The out-of-memory ladder: split the batch, then save memory, then give up per item.

On out-of-memory (:func:`plumbing.errors.is_out_of_memory`) a batch is retried as
two halves (recursively, down to single samples); a single sample that still does
not fit is retried once in low-memory mode (VAE tiling, attention slicing); a sample
that fails even then gets a :class:`plumbing.errors.PermanentError` with
``error_type="out_of_memory"``. Other exceptions propagate. The runner is injected,
so the ladder is testable on a CPU. :func:`low_memory_mode` is the second step's
switch (the generator enters it when asked).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from diffusers.models.attention_processor import SlicedAttnProcessor

from plumbing.errors import OUT_OF_MEMORY, PermanentError, is_out_of_memory

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: ``run(samples, low_memory)`` -> one result per sample, in order.
Runner = Callable[[Sequence[T], bool], list[R]]

#: Slice size of the attention-slicing fallback (diffusers' "auto" for SD 1.5: heads / 2).
LOW_MEMORY_SLICE = 4


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_with_oom_ladder(
    samples: Sequence[T], run: Runner[T, R], *, low_memory: bool = False
) -> list[R | PermanentError]:
    """Run ``samples`` through ``run``, stepping down the ladder on out-of-memory errors.

    Returns one entry per sample: its result, or a ``PermanentError("out_of_memory")``.
    """
    if not samples:
        return []
    try:
        return list(run(samples, low_memory))
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        message = str(exc).splitlines()[0] if str(exc) else "out of memory"
    _free_memory()
    if len(samples) > 1:
        half = (len(samples) + 1) // 2
        log.warning(
            "out of memory with %d samples: retrying as %d + %d",
            len(samples),
            half,
            len(samples) - half,
        )
        return run_with_oom_ladder(
            samples[:half], run, low_memory=low_memory
        ) + run_with_oom_ladder(samples[half:], run, low_memory=low_memory)
    if not low_memory:
        log.warning("out of memory with one sample: retrying with VAE tiling and attention slicing")
        return run_with_oom_ladder(samples, run, low_memory=True)
    log.error("out of memory even for one sample in low-memory mode: giving up on it")
    return [
        PermanentError(
            f"out of memory for one image even with VAE tiling and attention slicing: {message}",
            error_type=OUT_OF_MEMORY,
        )
    ]


@contextmanager
def low_memory_mode(pipe: Any, *, enabled: bool, unet: bool = True) -> Iterator[None]:
    """VAE tiling, and attention slicing on the UNet's self-attention, while active.

    diffusers' ``enable_attention_slicing`` would replace every processor, the
    heat-map recorder included, so only the ``attn1`` processors are swapped here.
    """
    if not enabled:
        yield
        return
    saved = dict(pipe.unet.attn_processors) if unet else None
    if saved is not None:
        sliced = SlicedAttnProcessor(LOW_MEMORY_SLICE)
        pipe.unet.set_attn_processor(
            {name: (p if name.endswith("attn2.processor") else sliced) for name, p in saved.items()}
        )
    pipe.vae.enable_tiling()
    try:
        yield
    finally:
        pipe.vae.disable_tiling()
        if saved is not None:
            pipe.unet.set_attn_processor(saved)
