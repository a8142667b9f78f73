"""The toy SAM's training forward pass and losses.

``Sam.forward`` runs under ``no_grad``, so the training forward is written here from
the model's own parts: ``Sam.preprocess`` (normalise and pad), the image encoder, the
prompt encoder and the mask decoder's layers (:func:`decode`, which is
``MaskDecoder.predict_masks`` with one image embedding per prompt instead of one image
for all prompts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from toy.sam_data import Prompts


def encode(model: Sam, images: torch.Tensor) -> torch.Tensor:
    """Image embeddings of ``images`` [B, 3, H, W] float 0..255 (H, W = img_size)."""
    return model.image_encoder(model.preprocess(images))


def decode(
    model: Sam, embeddings: torch.Tensor, prompts: Prompts
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-res mask logits [P, 4, h, w] and predicted IoUs [P, 4] of all four outputs.

    ``MaskDecoder.predict_masks``, with ``embeddings[prompts.image]`` as the image
    embedding of each prompt instead of one image repeated for every prompt.
    """
    points = None if prompts.points is None else (prompts.points, prompts.labels)
    sparse, dense = model.prompt_encoder(points=points, boxes=prompts.boxes, masks=None)
    dec = model.mask_decoder
    tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    tokens = torch.cat((tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
    src = embeddings[prompts.image] + dense
    pos = model.prompt_encoder.get_dense_pe().expand(src.shape[0], -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = dec.transformer(src, pos, tokens)
    iou_out = hs[:, 0, :]
    mask_out = hs[:, 1 : 1 + dec.num_mask_tokens, :]
    up = dec.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper = torch.stack(
        [mlp(mask_out[:, i, :]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1
    )
    b, c, h, w = up.shape
    masks = (hyper @ up.view(b, c, h * w)).view(b, -1, h, w)
    return masks, dec.iou_prediction_head(iou_out)


def mask_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + dice per prompt and output: ``logits`` [P, C, H, W], ``target`` [P, H, W]."""
    t = target[:, None].expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none").mean(dim=(2, 3))
    prob = logits.sigmoid()
    inter = (prob * t).sum(dim=(2, 3))
    dice = 1.0 - (2.0 * inter + 1.0) / (prob.sum(dim=(2, 3)) + t.sum(dim=(2, 3)) + 1.0)
    return bce + dice


def true_iou(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """IoU [P, C] of each output's mask (logit > threshold) with ``target``; 0 where the
    target is empty (a background prompt should score low)."""
    pred = logits.detach() > threshold
    t = target[:, None].bool()
    inter = (pred & t).sum(dim=(2, 3)).float()
    union = (pred | t).sum(dim=(2, 3)).float()
    empty = t.sum(dim=(2, 3)) == 0
    return torch.where(empty, torch.zeros_like(union), inter / union.clamp_min(1.0))


def prompt_loss(
    model: Sam, embeddings: torch.Tensor, prompts: Prompts, iou_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mask loss (the best multimask output; plus the single output on unambiguous
    prompts) + ``iou_weight`` x the IoU head's MSE, and their values for the log."""
    masks, iou_pred = decode(model, embeddings, prompts)
    size = model.image_encoder.img_size
    if masks.shape[-1] != size:
        masks = F.interpolate(masks, (size, size), mode="bilinear", align_corners=False)
    losses = mask_losses(masks, prompts.target)  # [P, 4]
    multi = losses[:, 1:].min(dim=1).values
    mask_loss = multi.mean()
    if not prompts.ambiguous:
        mask_loss = mask_loss + losses[:, 0].mean()
    ious = true_iou(masks, prompts.target, model.mask_threshold)
    iou_loss = F.mse_loss(iou_pred, ious)
    stats = {
        "mask": float(mask_loss.detach()),
        "iou_mse": float(iou_loss.detach()),
        "iou": float(ious.max(1)[0].mean()),
    }
    return mask_loss + iou_weight * iou_loss, stats
