"""Image and heat-map codecs shared by the workers, with limits for hostile input.

Heat map format (the blob behind ``image-ready.heatmaps[target]``): a 16-bit
grayscale PNG (PIL mode ``I;16``) whose aspect ratio is the image's, usually at
the latent resolution (height/8 x width/8). Values are min-max normalised: 0 is
the least attended position, 65535 the peak (1.0 after :func:`decode_heatmap`).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from plumbing.errors import PermanentError

PNG = "image/png"
HEATMAP_MEDIA_TYPE = "image/png"


class InvalidImage(PermanentError):
    """An image blob that cannot be decoded safely (truncated, not an image, too large)."""

    error_type = "invalid_image"


def png_byte_limit(max_pixels: int) -> int:
    """Largest plausible PNG of ``max_pixels`` pixels: 8 bytes a pixel (16-bit RGBA) + 1 MiB.

    Readers pass it as ``max_bytes`` so a reference claiming a huge blob is refused
    before anything is read.
    """
    return max_pixels * 8 + 2**20


#: zlib level of every PNG the workers write. Level 1 encodes a 512x512 photo-like image
#: about 45 % faster than Pillow's default 6 (35 against 62 ms on the 2-core bench machine),
#: for files about 13 % larger; decoding is as fast. A worker on a GPU makes such an image
#: in a few hundred ms, so the encoding was a tenth of its time.
PNG_COMPRESS_LEVEL = 1


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of ``image``; deterministic for the same pixels (and the same Pillow and
    zlib: the bytes, not the pixels, change with :data:`PNG_COMPRESS_LEVEL`)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def decode_image(data: bytes, *, max_pixels: int, mode: str | None = "RGB") -> Image.Image:
    """Decode an image blob, refusing decompression bombs and truncated files.

    The pixel count is checked from the header before any pixel is decoded.
    """
    try:
        with warnings.catch_warnings():
            # Hostile input must not flood the logs with Pillow's warnings about corrupt
            # metadata; the bomb warning becomes an error (registered last, so it wins).
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidImage(
                    f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels"
                )
            image.load()
    except InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage(f"image refused as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"image could not be decoded: {exc}") from None
    return image.convert(mode) if mode and image.mode != mode else image


def encode_heatmap(heatmap: np.ndarray) -> bytes:
    """16-bit PNG of a float heat map ``[h, w]``, min-max normalised to 0..65535."""
    if heatmap.ndim != 2 or heatmap.size == 0:
        raise ValueError(f"heat map must be 2-D and not empty, got shape {heatmap.shape}")
    values = np.nan_to_num(heatmap.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(values.min()), float(values.max())
    if not np.isfinite(hi - lo):  # a span beyond float64: halve first so it fits
        values, lo, hi = values / 2, lo / 2, hi / 2
    scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    pixels = np.round(scaled * 65535).astype(np.uint16)
    return encode_png(Image.fromarray(pixels))


def decode_heatmap(data: bytes, *, max_pixels: int = 4096 * 4096) -> np.ndarray:
    """Float32 heat map ``[h, w]`` in 0..1 from :func:`encode_heatmap`'s PNG."""
    image = decode_image(data, max_pixels=max_pixels, mode=None)
    pixels = np.asarray(image, dtype=np.float64)
    if pixels.ndim != 2:
        raise InvalidImage(f"heat map must be single-channel, got mode {image.mode}")
    peak = 65535.0 if pixels.max(initial=0) > 255 or image.mode.startswith("I") else 255.0
    return (pixels / peak).astype(np.float32)


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x, y, w, h)`` of the set pixels of ``mask`` ``[H, W]``; None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    return x0, y0, x1 - x0 + 1, y1 - y0 + 1


def rgba_asset(
    image: np.ndarray, mask: np.ndarray, crop: tuple[int, int, int, int] | None
) -> np.ndarray:
    """RGBA ``[h, w, 4]`` uint8 cut-out of ``image`` ``[H, W, 3]``: alpha = 255 * mask,
    colour zeroed outside; cropped to ``crop`` = (x, y, w, h) when given."""
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[mask, :3] = image[mask]
    rgba[mask, 3] = 255
    if crop is not None:
        x, y, w, h = crop
        rgba = rgba[y : y + h, x : x + w]
    return rgba
