"""Image and heat-map codecs, including hostile input."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from consumers.stage import PermanentError
from plumbing.images import (
    InvalidImage,
    decode_heatmap,
    decode_image,
    encode_heatmap,
    encode_png,
)

MAX_PIXELS = 4096 * 4096


def png_bytes(image: Image.Image) -> bytes:
    return encode_png(image)


def rgb_image(width: int = 48, height: int = 32) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR (correct CRC) that claim ``width`` x ``height`` pixels."""
    data = bytearray(png_bytes(Image.new("L", (1, 1))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# --- heat maps -----------------------------------------------------------------------------------


def test_heatmap_round_trip() -> None:
    rng = np.random.default_rng(1)
    heatmap = rng.random((24, 40)) * 3.0 - 1.0  # latent resolution of a 320x192 image
    data = encode_heatmap(heatmap)
    # The format: a 16-bit grayscale PNG of the heat map's shape.
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, bit_depth, colour_type = struct.unpack(">IIBB", data[16:26])
    assert (width, height, bit_depth, colour_type) == (40, 24, 16, 0)
    decoded = decode_heatmap(data)
    assert decoded.shape == (24, 40)  # aspect preserved
    assert decoded.dtype == np.float32
    assert decoded.min() == 0.0 and decoded.max() == 1.0
    expected = (heatmap - heatmap.min()) / (heatmap.max() - heatmap.min())
    np.testing.assert_allclose(decoded, expected, atol=1 / 65535)
    assert encode_heatmap(heatmap) == data  # deterministic


def test_heatmap_peak_and_trough_positions_survive() -> None:
    heatmap = np.zeros((8, 16), dtype=np.float32)
    heatmap[2, 11] = 5.0
    heatmap[6, 1] = -5.0
    decoded = decode_heatmap(encode_heatmap(heatmap))
    assert np.unravel_index(decoded.argmax(), decoded.shape) == (2, 11)
    assert np.unravel_index(decoded.argmin(), decoded.shape) == (6, 1)
    assert decoded[0, 0] == pytest.approx(0.5, abs=1 / 65535)


@pytest.mark.parametrize(
    "heatmap",
    [
        np.full((4, 6), 0.3),
        np.full((4, 6), np.nan),
        np.array([[np.nan, 1.0], [np.inf, -np.inf]]),
    ],
    ids=["constant", "all-nan", "non-finite"],
)
def test_degenerate_heatmaps_decode_to_finite_values(heatmap: np.ndarray) -> None:
    decoded = decode_heatmap(encode_heatmap(heatmap))
    assert decoded.shape == heatmap.shape
    assert np.isfinite(decoded).all()
    assert decoded.min() >= 0.0 and decoded.max() <= 1.0


def test_heatmap_with_a_range_beyond_float64() -> None:
    big = np.finfo(np.float64).max
    decoded = decode_heatmap(encode_heatmap(np.array([[-big, big], [0.0, 1.0]])))
    assert decoded[0, 0] == 0.0 and decoded[0, 1] == 1.0
    assert decoded[1, 0] == pytest.approx(0.5, abs=1e-4)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), (0, 4), (4, 0)])
def test_heatmap_must_be_a_non_empty_matrix(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        encode_heatmap(np.ones(shape))


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
        elements=st.floats(allow_nan=True, allow_infinity=True),
    )
)
def test_heatmap_normalisation_property(heatmap: np.ndarray) -> None:
    decoded = decode_heatmap(encode_heatmap(heatmap))
    assert decoded.shape == heatmap.shape
    assert np.isfinite(decoded).all()
    assert decoded.min() >= 0.0 and decoded.max() <= 1.0
    finite = np.nan_to_num(heatmap, nan=0.0, posinf=0.0, neginf=0.0)
    if finite.max() > finite.min():
        assert decoded.min() == 0.0 and decoded.max() == 1.0
        # Order is kept: a hotter position never decodes colder.
        order = np.argsort(finite, axis=None, kind="stable")
        assert (np.diff(decoded.ravel()[order]) >= 0).all()
    else:
        assert (decoded == 0).all()


def test_decode_heatmap_refuses_colour_images() -> None:
    with pytest.raises(InvalidImage, match="single-channel"):
        decode_heatmap(png_bytes(rgb_image()))


def test_decode_heatmap_reads_8_bit_grayscale() -> None:
    pixels = np.array([[0, 51, 255]], dtype=np.uint8)
    decoded = decode_heatmap(png_bytes(Image.fromarray(pixels)))
    np.testing.assert_allclose(decoded, [[0.0, 0.2, 1.0]], atol=1e-6)


# --- decoding images ------------------------------------------------------------------------------


def test_decode_image_round_trip_and_mode() -> None:
    image = rgb_image()
    decoded = decode_image(png_bytes(image), max_pixels=MAX_PIXELS)
    assert decoded.mode == "RGB" and decoded.size == (48, 32)
    assert np.array_equal(np.asarray(decoded), np.asarray(image))
    rgba = png_bytes(image.convert("RGBA"))
    assert decode_image(rgba, max_pixels=MAX_PIXELS).mode == "RGB"
    assert decode_image(rgba, max_pixels=MAX_PIXELS, mode=None).mode == "RGBA"
    assert decode_image(rgba, max_pixels=MAX_PIXELS, mode="L").mode == "L"
    assert decode_image(png_bytes(image), max_pixels=48 * 32).size == (48, 32)  # at the limit


def test_invalid_image_is_a_permanent_error() -> None:
    assert issubclass(InvalidImage, PermanentError)
    assert InvalidImage("x").error_type == "invalid_image"


@pytest.mark.parametrize(
    ("width", "height", "max_pixels"),
    [
        (20000, 20000, MAX_PIXELS),  # beyond Pillow's own decompression-bomb limit
        (20000, 20000, 10**9),  # ... even when the caller allows more
        (5000, 5000, MAX_PIXELS),  # within Pillow's limit, beyond ours
        (49, 32, 48 * 32),
        (2**31 - 1, 1, MAX_PIXELS),
    ],
)
def test_decode_image_refuses_huge_dimensions_from_the_header(
    width: int, height: int, max_pixels: int
) -> None:
    data = png_claiming(width, height)
    assert struct.unpack(">II", data[16:24]) == (width, height)
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(InvalidImage):
            decode_image(data, max_pixels=max_pixels)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 1.0
    assert peak < 4 * 1024 * 1024  # refused before any pixel buffer was allocated


def test_the_crafted_header_is_a_readable_png() -> None:
    # The refusal above is about size, not about a broken header.
    with Image.open(io.BytesIO(png_claiming(3, 2))) as image:
        assert image.size == (3, 2)
    with pytest.raises(InvalidImage):  # ... whose pixel data is missing
        decode_image(png_claiming(3, 2), max_pixels=MAX_PIXELS)


@pytest.mark.parametrize("keep", [0.95, 0.75, 0.5, 0.25])
def test_decode_image_refuses_truncated_pngs(keep: float) -> None:
    data = png_bytes(rgb_image(64, 64))
    with pytest.raises(InvalidImage):
        decode_image(data[: int(len(data) * keep)], max_pixels=MAX_PIXELS)


@pytest.mark.parametrize("cut", [8, 16, 33, 40])
def test_decode_image_refuses_pngs_cut_in_the_header(cut: int) -> None:
    with pytest.raises(InvalidImage):
        decode_image(png_bytes(rgb_image())[:cut], max_pixels=MAX_PIXELS)


@pytest.mark.parametrize(
    "data",
    [b"", b"hello", b'{"id": "req-1"}', b"\x89PNG\r\n\x1a\n", b"GIF89a", bytes(range(256)) * 4],
    ids=["empty", "text", "json", "png-signature", "gif-signature", "noise"],
)
def test_decode_image_refuses_non_images(data: bytes) -> None:
    with pytest.raises(InvalidImage):
        decode_image(data, max_pixels=MAX_PIXELS)


def _samples() -> list[bytes]:
    out = []
    for fmt in ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]:
        buf = io.BytesIO()
        rgb_image(24, 16).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


SAMPLES = _samples()


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from(SAMPLES),
    st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=8),
    st.floats(0.05, 1.0),
)
def test_decode_image_on_corrupted_files_raises_only_invalid_image(
    sample: bytes, flips: list[tuple[float, int]], keep: float
) -> None:
    data = bytearray(sample[: max(1, int(len(sample) * keep))])
    for where, value in flips:
        data[min(int(where * len(data)), len(data) - 1)] = value
    try:
        image = decode_image(bytes(data), max_pixels=MAX_PIXELS)
    except InvalidImage:
        return
    assert image.mode == "RGB"
    assert image.size[0] * image.size[1] <= MAX_PIXELS
