"""What the command line tells a user about a request's targets, in words: before it is
submitted (nothing to cut out, a target the prompt does not name) and after the
generator reported targets its tokenizer could not find.

In attention mode the generator's heat maps say where a target is; a target without one
falls back to the segmenter's automatic mode (seg_worker/segment.py), so its cut-outs are
whatever that finds, labelled with the target's name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def in_prompt(target: str, prompt: str) -> bool:
    """Whether ``target``'s words appear in ``prompt``, whole and in order: the
    generator finds a target's heat map by its words' tokens in the prompt, so "cup"
    is in "a coffee cup" but not in "a teacup" or "two cups"."""
    words = re.findall(r"\w+", target.lower())
    if not words:
        return False
    pattern = r"\b" + r"\W+".join(re.escape(word) for word in words) + r"\b"
    return re.search(pattern, prompt.lower()) is not None


def target_warnings(
    prompt: str, targets: Sequence[str], *, mode: str = "attention", mode_flag: bool = True
) -> list[str]:
    """One line per problem with the targets of a request in segmentation ``mode``
    (only attention mode cuts out by target); ``mode_flag``: the command has ``--mode``."""
    if mode != "attention":
        return []
    if not targets:
        how = "name objects with --target NAME"
        if mode_flag:
            how += ", or use --mode auto to cut out every object"
        return [f"no --target: nothing will be cut out in attention mode; {how}"]
    absent = [target for target in targets if not in_prompt(target, prompt)]
    if not absent:
        return []
    return [
        f"{_names(absent)} not in the prompt: attention mode finds a target by its words in "
        f"the prompt, so {_fallback(absent)}"
    ]


def missing_targets_note(missing: Sequence[str], image_index: int | None = None) -> str:
    """The note for targets the generator reported missing (``missing_targets``)."""
    which = f"image {image_index}: " if image_index is not None else ""
    return (
        f"{which}the generator did not find {_names(missing)} in the prompt as its tokenizer "
        f"reads it (a word it does not know, or cut off by its length limit), so "
        f"{_fallback(missing)}"
    )


def _names(targets: Sequence[str]) -> str:
    return ", ".join(repr(target) for target in targets)


def _fallback(targets: Sequence[str]) -> str:
    """What the segmenter does for a target without a heat map (seg_worker.segment)."""
    if len(targets) == 1:
        return "its cut-outs come from automatic mode (any object), not from where it is"
    return "their cut-outs come from automatic mode (any object), not from where they are"
