"""The demo's contact sheet: image | heat map | mask overlay | asset on a checkerboard.

Pure PIL and numpy; one row per cut-out object (or one row with the image and
heat map alone when nothing matched).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

TILE = 256
PAD = 8
LABEL_H = 18
OVERLAY_RGB = (255, 64, 32)


def colorize_heatmap(heatmap: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A heat map ``[h, w]`` in 0..1 as an RGB 'inferno-like' image of ``size`` (w, h)."""
    v = np.clip(heatmap.astype(np.float32), 0.0, 1.0)
    rgb = np.stack([np.clip(1.5 * v, 0, 1), np.clip(1.5 * v - 0.5, 0, 1), np.clip(v * v, 0, 1)])
    pixels = (np.moveaxis(rgb, 0, -1) * 255).astype(np.uint8)
    return Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR)


def mask_overlay(image: Image.Image, mask: Image.Image, alpha: float = 0.5) -> Image.Image:
    """``image`` with ``mask`` (L, white = object) tinted, and the rest dimmed to stand back."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    m = (np.asarray(mask.convert("L").resize(image.size), dtype=np.float32) / 255.0)[..., None]
    tint = np.array(OVERLAY_RGB, dtype=np.float32)
    inside = base * (1 - alpha) + tint * alpha
    outside = base * 0.3
    out = inside * m + outside * (1 - m)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def on_checkerboard(rgba: Image.Image, square: int = 8) -> Image.Image:
    """An RGBA image composited on a grey checkerboard, so transparency is visible."""
    w, h = rgba.size
    ys, xs = np.mgrid[0:h, 0:w]
    board = np.where(((xs // square) + (ys // square)) % 2 == 0, 204, 153).astype(np.uint8)
    background = Image.fromarray(board).convert("RGBA")
    return Image.alpha_composite(background, rgba.convert("RGBA")).convert("RGB")


def _fit(image: Image.Image) -> Image.Image:
    """Scale to fit a TILE x TILE box (nearest for tiny images, so pixels stay crisp)."""
    w, h = image.size
    scale = TILE / max(w, h)
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)


def contact_sheet(
    image: Image.Image,
    heatmap: Image.Image | None,
    rows: list[tuple[str, Image.Image, Image.Image]],
) -> Image.Image:
    """Build the sheet. ``rows``: (label, mask L image, RGBA asset) per object."""
    headers = ["image", "heat map", "mask overlay", "asset"]
    lines = rows or [("no match", None, None)]
    width = PAD + len(headers) * (TILE + PAD)
    height = PAD + len(lines) * (TILE + LABEL_H + PAD)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (label, mask, asset) in enumerate(lines):
        top = PAD + r * (TILE + LABEL_H + PAD)
        tiles = [
            image,
            heatmap,
            mask_overlay(image, mask) if mask is not None else None,
            on_checkerboard(asset) if asset is not None else None,
        ]
        for c, tile in enumerate(tiles):
            left = PAD + c * (TILE + PAD)
            caption = headers[c] if c != 3 else f"asset: {label}"
            draw.text((left, top), caption, fill=(0, 0, 0))
            if tile is None:
                draw.rectangle(
                    (left, top + LABEL_H, left + TILE - 1, top + LABEL_H + TILE - 1),
                    outline=(200, 200, 200),
                )
                continue
            sheet.paste(_fit(tile.convert("RGB")), (left, top + LABEL_H))
    return sheet
