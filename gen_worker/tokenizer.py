"""A CLIP-compatible BPE tokenizer written locally, so no profile but ``pretrained`` downloads.

The vocabulary is byte-level like CLIP's: every byte as a symbol, alone and as a
word end (``"a</w>"``), plus merges that make a small list of common words single
tokens (so multi-token and single-token targets both occur in tests). ``vocab_size``
pads the vocabulary with unused tokens to a given size (49408 for the SD 1.5 CLIP
text encoder), so token ids cover the embedding table of the model they feed.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
WORD_END = "</w>"

# Whole-word merges: words the demo and the tests use, so they encode as one token.
COMMON_WORDS = (
    "a an the of on in and with at to by for photo image modern minimalist coffee cup "
    "wooden table natural light dog cat red blue green house tree car sky person chair "
    "bottle apple white black small large"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def bpe(word: str, merges: Sequence[str]) -> list[str]:
    """The pieces CLIP's BPE makes of ``word`` with ``merges`` (lowest rank first)."""
    ranks = {tuple(rule.split(" ")): i for i, rule in enumerate(merges)}
    pieces = [*word[:-1], word[-1] + WORD_END]
    while len(pieces) > 1:
        pairs = [
            (ranks.get(pair, len(ranks)), i) for i, pair in enumerate(itertools.pairwise(pieces))
        ]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2 :]]
    return pieces


def build_vocab(
    vocab_size: int | None = None,
    words: Sequence[str] = COMMON_WORDS,
    *,
    whole_words: bool = False,
) -> tuple[dict[str, int], list[str]]:
    """The vocabulary (token -> id) and the ordered merge rules.

    ``vocab_size``: pad to exactly this many tokens (must be at least the base size);
    ``words``: the words to merge. Merging a word left to right can be undone by the
    rules of an earlier word ("an" splits "triangle" into "tri an g l e"); with
    ``whole_words`` each word's merges start from what the earlier rules make of it,
    so every word is one token (the toy profile). Without, the ``tiny`` profile's
    vocabulary stays as it always was (and some of its words are several tokens).
    """
    symbols = list(_bytes_to_unicode().values())
    tokens: list[str] = symbols + [s + WORD_END for s in symbols]
    merges: list[str] = []
    known = set(tokens)
    for word in words:
        # Merge left to right: "cup" -> c u p</w> -> cu p</w> -> cup</w>.
        pieces = bpe(word, merges) if whole_words else [*word[:-1], word[-1] + WORD_END]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            rule = f"{pieces[0]} {pieces[1]}"
            if rule not in merges:
                merges.append(rule)
            if merged not in known:
                known.add(merged)
                tokens.append(merged)
            pieces = [merged, *pieces[2:]]
    tokens += [BOS, EOS]
    if vocab_size is not None:
        if vocab_size < len(tokens):
            raise ValueError(f"vocab_size must be at least {len(tokens)}, got {vocab_size}")
        tokens += [f"<|unused{i}|>" for i in range(vocab_size - len(tokens))]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_tokenizer_files(
    directory: Path,
    vocab_size: int | None = None,
    words: Sequence[str] = COMMON_WORDS,
    *,
    whole_words: bool = False,
) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (what CLIPTokenizer reads) into ``directory``."""
    vocab, merges = build_vocab(vocab_size, words, whole_words=whole_words)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    return directory


def local_clip_tokenizer(
    vocab_size: int | None = None,
    max_length: int = 77,
    words: Sequence[str] = COMMON_WORDS,
    *,
    whole_words: bool = False,
    pad_token: str | None = None,
) -> CLIPTokenizer:
    """A CLIPTokenizer loaded from files written to a temporary directory (then removed).

    ``pad_token``: None pads with the end token (CLIP ViT-L, SD 1.5); SDXL's second
    tokenizer pads with ``"!"``.
    """
    extra = {} if pad_token is None else {"pad_token": pad_token}
    with tempfile.TemporaryDirectory(prefix="genseg-tokenizer-") as tmp:
        write_tokenizer_files(Path(tmp), vocab_size, words, whole_words=whole_words)
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length, **extra)
