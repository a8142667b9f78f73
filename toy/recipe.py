"""What the toy training scripts share: the learning-rate shape, the loss meter that logs
progress, and the command line that turns a recipe dataclass into flags.

Nothing here imports torch or the models, so every script (generator, scene generator,
depth model) can use it.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

R = TypeVar("R")


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to a
    tenth at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


class LossMeter:
    """Running means of losses, logged every ``every`` steps with the step rate."""

    def __init__(self, name: str, total: int, every: int) -> None:
        self.name, self.total, self.every = name, total, every
        self.sums: dict[str, float] = {}
        self.count = 0
        self.last: dict[str, float] = {}
        self.started = time.monotonic()

    def update(self, step: int, **values: float) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            self.last = {k: v / self.count for k, v in self.sums.items()}
            rate = (step + 1) / (time.monotonic() - self.started)
            losses = " ".join(f"{k} {v:.4f}" for k, v in self.last.items())
            log.info(
                "%s step %d/%d  %s  (%.2f steps/s)", self.name, step + 1, self.total, losses, rate
            )
            self.sums, self.count = {}, 0


def _flag(text: str) -> bool:
    """``true``/``false`` (or yes/no, 1/0) of a boolean recipe field; ``bool("false")``
    would be True."""
    value = text.strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def recipe_main(
    argv: Sequence[str] | None,
    doc: str | None,
    recipe: type[R],
    train: Callable[[Path, R], Any],
    out_help: str,
) -> None:
    """The command line of a training script: ``--out`` plus one flag per field of the
    ``recipe`` dataclass (``--unet-steps``; unset flags keep the default), then
    ``train(out, recipe(**flags))``."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help=out_help)
    defaults = recipe()
    for f in fields(recipe):  # type: ignore[arg-type]
        flag = "--" + f.name.replace("_", "-")
        kind = type(getattr(defaults, f.name))
        parser.add_argument(flag, type=_flag if kind is bool else kind, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    overrides = {
        f.name: getattr(args, f.name)
        for f in fields(recipe)  # type: ignore[arg-type]
        if getattr(args, f.name) is not None
    }
    train(args.out, recipe(**overrides))


__all__ = ["LossMeter", "recipe_main", "warmup_cosine"]
