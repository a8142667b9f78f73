"""Training parts of the toy denoiser beyond the diffusion loss: the cross-attention
capture and the attention loss on it, min-SNR loss weights, the EMA of the weights."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention


class AttentionCapture:
    """Cross-attention processor (``attn2``) that keeps its probabilities for the loss.

    Computes the same output as SDPA, from explicit ``softmax(QK^T * scale)``, and
    appends the head-averaged probabilities ``[B, Q, T]`` to :attr:`maps`.
    """

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []

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
        # Adapted from diffusers.models.attention_processor.AttnProcessor2_0.__call__
        # (diffusers 0.42.1): the cross-attention path of the toy UNet only (no spatial or
        # group norm, no mask, no residual), with an explicit softmax in place of SDPA.
        assert encoder_hidden_states is not None, "only for cross-attention layers"
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        q = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        k = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        v = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)  # [B, heads, Q, T]
        self.maps.append(probs.mean(dim=1))
        out = (probs @ v).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def attention_loss(
    maps: Sequence[torch.Tensor], token_object: torch.Tensor, masks: torch.Tensor
) -> torch.Tensor:
    """Mean over layers and object tokens of ``1 - share inside`` + ``(map - mask)^2``.

    ``maps``: per layer ``[B, Q, T]``; ``token_object`` ``[B, T]`` (-1: no object);
    ``masks`` ``[B, K, 16, 16]``. ``share inside``: the fraction of a token's spatial
    attention that falls on its object; the squared term on the map scaled to peak 1
    asks the token to cover the whole object, not just a point of it.
    """
    valid = token_object >= 0  # [B, T]
    if not bool(valid.any()):
        return torch.zeros((), device=masks.device)
    b_idx, t_idx = valid.nonzero(as_tuple=True)
    total = torch.zeros((), device=masks.device)
    for layer in maps:
        layer = layer.float()  # bf16 under autocast
        side = math.isqrt(layer.shape[1])
        cells = masks if side == masks.shape[-1] else F.adaptive_avg_pool2d(masks, side)
        target = cells[b_idx, token_object[b_idx, t_idx]].flatten(1)  # [n, Q]
        attn = layer[b_idx, :, t_idx]  # [n, Q]
        inside = (attn * target).sum(dim=1) / attn.sum(dim=1).clamp_min(1e-8)
        peaked = attn / attn.amax(dim=1, keepdim=True).clamp_min(1e-8)
        total = total + (1.0 - inside).mean() + ((peaked - target) ** 2).mean()
    return total / len(maps)


def cell_weights(masks: torch.Tensor, object_weight: float, edge_weight: float) -> torch.Tensor:
    """Per-cell diffusion-loss weights ``[B, 1, 16, 16]`` from objects' coverage ``masks``
    ``[B, K, 16, 16]``: 1, plus ``object_weight`` times the covered share, plus
    ``edge_weight`` where an object covers a cell only in part; scaled to mean 1 per
    sample, so that the loss keeps its size.

    Objects are a few percent of the latent, and the cells where a star differs from a
    circle fewer still: unweighted, the loss barely notices which shape was drawn.
    """
    covered = masks.sum(dim=1, keepdim=True).clamp(max=1.0)
    partial = ((masks > 0) & (masks < 1)).any(dim=1, keepdim=True).float()
    weights = 1.0 + object_weight * covered + edge_weight * partial
    return weights / weights.mean(dim=(2, 3), keepdim=True)


def shape_swap_table(tokenizer: Any, shapes: Sequence[str]) -> torch.Tensor:
    """``[vocab]`` token ids: each shape word's id maps to the next shape's, others to
    themselves (index a caption's ids with it to swap every shape). Each shape must be
    one whole-word token (CLIP's ``</w>`` suffix). Looked up in the vocabulary rather
    than tokenized: a tokenizer call resets the padding state that ``save_pretrained``
    writes into ``tokenizer.json``, and the training saves this very tokenizer."""
    vocab = tokenizer.get_vocab()
    missing = [s for s in shapes if f"{s}</w>" not in vocab]
    if missing:
        raise ValueError(f"not one token of this tokenizer: {missing}")
    table = torch.arange(len(tokenizer))
    ids = [vocab[f"{s}</w>"] for s in shapes]
    for i, token in enumerate(ids):
        table[token] = ids[(i + 1) % len(ids)]
    return table


def shape_contrast(right: torch.Tensor, swapped: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean hinge ``relu((1 + margin) * right - swapped)`` over samples: zero once the
    denoiser's error ``swapped`` (per sample, shape words swapped) exceeds its error
    ``right`` with the true caption by ``margin`` of it. The margin is taken from the
    detached error, so the hinge only ever pushes the two apart."""
    return F.relu(right + margin * right.detach() - swapped).mean()


def min_snr_weights(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Min-SNR-gamma loss weights for v-prediction: ``min(snr, gamma) / (snr + 1)``;
    ``gamma`` 0: ones (the plain v-loss)."""
    if gamma <= 0:
        return torch.ones(timesteps.shape)
    a = alphas_cumprod[timesteps]
    snr = a / (1.0 - a)
    return snr.clamp(max=gamma) / (snr + 1.0)


class EMA:
    """Exponential moving average of a module's parameters (with warm-up)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow.parameters(), module.parameters(), strict=True):
            s.lerp_(p.detach(), 1.0 - d)
