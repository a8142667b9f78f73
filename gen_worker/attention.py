"""Target heat maps from cross-attention, and batch-invariant UNet evaluation.

A :class:`CrossAttentionRecorder` processor replaces the default processor on the
UNet's cross-attention (``attn2``) layers only; self-attention keeps SDPA/xFormers.
Its output is computed exactly like diffusers' ``AttnProcessor2_0`` (its ``__call__`` is
copied from diffusers 0.42.1, marked in the code) whether or not it records, so
recording never changes an image. While a :class:`HeatmapAccumulator` is
active it also computes the attention probabilities of the conditional half of the
batch, averages them over heads, resizes each layer's map ``[77, h, w]`` to the
latent resolution and adds it to a per-sample sum. See docs/gen_worker.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from gen_worker.tokenizer import WORD_END


class HeatmapAccumulator:
    """Per-sample sums of head-averaged cross-attention maps, ``[B, T, H, W]`` float32.

    ``B``: samples in the batch, ``T``: text tokens (77), ``H x W``: the output (final
    latent) resolution. A pass (one pipeline call) may run at another latent size
    (the progressive draft): each layer's map is resized to ``H x W`` all the same.
    """

    def __init__(self) -> None:
        self.active = False
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.cfg = True
        self.latent_hw = (0, 0)
        self.samples = []

    @property
    def samples(self) -> list[int]:
        """The samples whose rows the current UNet call holds (see :func:`batch_invariant_unet`)."""
        return self._samples

    @samples.setter
    def samples(self, samples: list[int]) -> None:
        self._samples = samples
        # Made here, outside a compiled UNet: inside, a tensor built from the list would
        # be a constant of the graph, and each sample (one per call when batch-invariant)
        # would compile a graph of its own.
        device = self.sums.device if self.sums is not None else None
        self._index = torch.tensor(samples, dtype=torch.long, device=device)

    def start(self, batch: int, tokens: int, out_hw: tuple[int, int], device: torch.device) -> None:
        self.sums = torch.zeros(batch, tokens, *out_hw, dtype=torch.float32, device=device)
        self.counts = torch.zeros(batch, dtype=torch.float32, device=device)
        self.samples = list(range(batch))
        self.active = True

    def begin_pass(self, latent_hw: tuple[int, int], cfg: bool) -> None:
        """Set the latent size and guidance layout of the next pipeline call."""
        self.latent_hw = latent_hw
        self.cfg = cfg

    def stop(self) -> torch.Tensor | None:
        """End recording; the mean map per sample ``[B, T, H, W]`` (None if nothing recorded)."""
        self.active = False
        if self.sums is None or self.counts is None:
            return None
        means = self.sums / self.counts.clamp(min=1.0).view(-1, 1, 1, 1)
        self.sums = self.counts = None
        return means

    def layer_hw(self, queries: int) -> tuple[int, int]:
        """The spatial size ``(h, w)`` of a layer with ``queries`` positions.

        UNet down-sampling convolutions (stride 2, padding 1) give ``ceil(n / 2)`` per
        level, so try each level of the current latent size.
        """
        lh, lw = self.latent_hw
        for level in range(8):
            h, w = math.ceil(lh / 2**level), math.ceil(lw / 2**level)
            if h * w == queries:
                return h, w
        raise ValueError(f"cannot place {queries} attention positions on latent {lh}x{lw}")

    def add(self, probs: torch.Tensor) -> None:
        """Add one layer's probabilities ``[n, heads, Q, T]`` of the conditional rows of the
        current call (one row per sample in :attr:`samples`)."""
        assert self.sums is not None and self.counts is not None
        n = len(self.samples)
        if probs.shape[0] != n:
            raise ValueError(f"expected {n} conditional rows, got {probs.shape[0]}")
        maps = probs.float().mean(dim=1)  # [n, Q, T]
        h, w = self.layer_hw(maps.shape[1])
        maps = maps.transpose(1, 2).reshape(n, -1, h, w)
        if (h, w) != tuple(self.sums.shape[-2:]):
            maps = F.interpolate(
                maps, size=self.sums.shape[-2:], mode="bilinear", align_corners=False
            )
        self.sums.index_add_(0, self._index, maps.to(self.sums.device))
        self.counts.index_add_(0, self._index, torch.ones(n, device=self.counts.device))


class CrossAttentionRecorder:
    """Attention processor for ``attn2`` layers: SDPA output plus optional recording."""

    def __init__(self, accumulator: HeatmapAccumulator) -> None:
        self.accumulator = accumulator

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        # Copied from diffusers.models.attention_processor.AttnProcessor2_0.__call__
        # (diffusers 0.42.1), so outputs match the default processor. Changes: the
        # deprecated ``scale`` argument check is dropped, local names are shorter, and the
        # recording hook (``_record``, marked below) is added, and the key and value of
        # fused projections are taken as FusedAttnProcessor2_0 takes them (marked below).
        # Re-check on a diffusers upgrade.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq_len, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        is_cross = encoder_hidden_states is not None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        if is_cross and attn.fused_projections:  # Not in AttnProcessor2_0: fused (k, v).
            kv = attn.to_kv(encoder_hidden_states)
            key, value = torch.split(kv, kv.shape[-1] // 2, dim=-1)
        else:
            key = attn.to_k(encoder_hidden_states)
            value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # Not in diffusers: record the cross-attention probabilities (output unchanged).
        if is_cross and self.accumulator.active:
            self._record(attn, query, key, attention_mask)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _record(
        self,
        attn: Attention,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> None:
        """Probabilities softmax(QK^T * scale) of the conditional rows, in float32."""
        acc = self.accumulator
        n = len(acc.samples)
        # diffusers orders a guided batch [unconditional..., conditional...].
        rows = slice(n, 2 * n) if acc.cfg else slice(0, n)
        q, k = query[rows].float(), key[rows].float()
        scores = torch.matmul(q, k.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask[rows].float()
        acc.add(scores.softmax(dim=-1))  # [n, heads, Q, T]


def install_recorder(unet: Any, accumulator: HeatmapAccumulator) -> int:
    """Put a :class:`CrossAttentionRecorder` on every ``attn2`` layer; keep the others.

    Returns the number of layers instrumented.
    """
    recorder = CrossAttentionRecorder(accumulator)
    processors = dict(unet.attn_processors)
    count = 0
    for name in processors:
        if name.endswith("attn2.processor"):
            processors[name] = recorder
            count += 1
    unet.set_attn_processor(processors)
    return count


@contextmanager
def batch_invariant_unet(
    unet: torch.nn.Module, accumulator: HeatmapAccumulator, enabled: bool = True
) -> Iterator[None]:
    """Evaluate the UNet one sample at a time (its guidance pair together) while active.

    oneDNN convolutions and small matrix products round differently for different
    batch sizes, so a sample computed in a batch of 4 differs in the last bits from
    the same sample alone. Calling the UNet with the same shapes for every sample
    makes an image independent of its batch. Costs batching throughput: used on the
    CPU, where determinism is promised; on CUDA the whole batch runs in one call.
    Per-row keyword arguments (SDXL's added conditioning) are cut like the sample.
    """
    if not enabled:
        yield
        return
    # A compiled UNet (torch.compile's OptimizedModule) has its compiled forward as an
    # instance attribute: put it back on exit, rather than deleting ours.
    own_forward = "forward" in vars(unet)
    original = unet.forward

    def forward(
        sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, **kw: Any
    ):
        rows = sample.shape[0]
        n = rows // 2 if accumulator.cfg and rows % 2 == 0 else rows
        pairs = rows == 2 * n
        if n <= 1:
            return original(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kw)
        outs = []
        samples = accumulator.samples
        try:
            for i in range(n):
                index = [i, n + i] if pairs else [i]
                accumulator.samples = [samples[i]] if len(samples) == n else [i]
                t = timestep[index] if torch.is_tensor(timestep) and timestep.ndim > 0 else timestep
                out = original(
                    sample[index],
                    t,
                    encoder_hidden_states=encoder_hidden_states[index],
                    **_rows(kw, index, rows),
                )
                outs.append(out[0] if isinstance(out, tuple) else out.sample)
        finally:
            accumulator.samples = samples
        stacked = torch.stack(outs)  # [n, pair, C, H, W]
        result = stacked.transpose(0, 1).reshape(sample.shape[0], *stacked.shape[2:])
        if kw.get("return_dict", True):
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=result)
        return (result,)

    unet.forward = forward  # instance attribute, undone on exit
    try:
        yield
    finally:
        if own_forward:
            unet.forward = original
        else:
            del unet.forward


def _rows(kw: dict[str, Any], index: list[int], rows: int) -> dict[str, Any]:
    """``kw`` with every per-row tensor cut to the rows ``index``: SDXL's
    ``added_cond_kwargs`` (pooled text ``[rows, P]``, size/crop ids ``[rows, 6]``)."""

    def cut(value: Any) -> Any:
        if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == rows:
            return value[index]
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        return value

    return {k: cut(v) for k, v in kw.items()}


def word_starts(tokens: Sequence[str]) -> list[bool]:
    """Whether each BPE token begins a word (CLIP marks word ends with ``</w>``)."""
    starts = []
    previous_ended = True
    for tok in tokens:
        starts.append(previous_ended)
        previous_ended = tok.endswith(WORD_END) or tok.startswith("<|")
    return starts


def find_token_span(tokenizer: Any, prompt_ids: Sequence[int], target: str) -> list[int]:
    """Positions in ``prompt_ids`` (the padded prompt) of every whole-word occurrence of
    ``target``'s tokens; empty when the target is not in the (possibly truncated) prompt.

    Matching is on token ids and word boundaries, so "cup" is found in "coffee cup"
    but not in "teacup".
    """
    target_ids = tokenizer(target, add_special_tokens=False).input_ids
    if not target_ids or set(target_ids) & set(tokenizer.all_special_ids):
        return []  # nothing to find, or a special token such as padding
    tokens = tokenizer.convert_ids_to_tokens(list(prompt_ids))
    starts = word_starts(tokens)
    n = len(target_ids)
    found: list[int] = []
    ids = list(prompt_ids)
    for i in range(len(ids) - n + 1):
        if ids[i : i + n] == target_ids and starts[i]:
            found.extend(range(i, i + n))
    return found


def target_heatmap(maps: torch.Tensor, positions: Sequence[int]) -> np.ndarray:
    """The heat map ``[H, W]`` of one target: the mean of its token maps ``maps[T, H, W]``."""
    return maps[list(positions)].mean(dim=0).cpu().numpy().astype(np.float32)


__all__: list[str] = [
    "CrossAttentionRecorder",
    "HeatmapAccumulator",
    "batch_invariant_unet",
    "find_token_span",
    "install_recorder",
    "target_heatmap",
    "word_starts",
]
