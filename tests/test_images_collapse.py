"""Issue #22 class 9: a conversion that collapses an image's many distinct levels into black is
content loss — the image is kept by a documented rule (a 32-bit TIFF of 16-bit values is 16-bit
data) or refused with a reason naming mode and depth; never a silent flat image. Expected images
are computed here with exact integer arithmetic from the raw values; files are written by Pillow
itself or, where Pillow cannot write them (16-bit colour PNG), byte by byte from the PNG spec."""
from __future__ import annotations

import io
import struct
import zlib
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from llavadi.schemas.images import ImageLoadError, decode_rgb
from llavadi.schemas.samples import Reject, validate_record

RAMP16 = np.tile(np.linspace(0, 65535, 300).round().astype(np.int64), (3, 1))  # 300 levels, 3 rows


def saved(im: Image.Image, fmt: str) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt)
    return b.getvalue()


def rgb_of(data: bytes) -> np.ndarray:
    return np.asarray(decode_rgb(data, "test"))


def by(v: np.ndarray, full: int) -> np.ndarray:
    """round(v · 255 / full), exact; replicated to R, G, B."""
    g = np.array([round(Fraction(int(x) * 255, full)) for x in v.ravel()], dtype=np.uint8).reshape(v.shape)
    return np.repeat(g[..., None], 3, axis=-1)


def tiff_i32(v: np.ndarray, unsigned: bool = False) -> bytes:
    """A 32-bit TIFF as Pillow saves mode I (SampleFormat 2, signed); optionally marked unsigned."""
    data = bytearray(saved(Image.fromarray(v.astype(np.int32)), "TIFF"))
    assert Image.open(io.BytesIO(bytes(data))).tag_v2[258] in (32, (32,))
    if unsigned:
        entry = struct.pack("<HHIH", 339, 3, 1, 2)
        at = data.find(entry)
        data[at:at + len(entry)] = struct.pack("<HHIH", 339, 3, 1, 1)
    return bytes(data)


def png16(samples: np.ndarray, color_type: int) -> bytes:
    """A PNG of 16 bits per sample, [H, W, C] big-endian, rows filtered alternately None and Up."""
    h, w, c = samples.shape
    rows = samples.astype(">u2").view(np.uint8).reshape(h, w * c * 2).astype(np.int32)
    out = b""
    for y in range(h):
        if y % 2:  # Up: the byte minus the byte above, mod 256
            out += b"\x02" + ((rows[y] - rows[y - 1]) % 256).astype(np.uint8).tobytes()
        else:
            out += b"\x00" + rows[y].astype(np.uint8).tobytes()

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(out)) + chunk(b"IEND", b""))


# ---------------------------------------------------------------- kept by a documented rule

def test_issue_pillow_saved_mode_I_tiff_of_16_bit_data_keeps_its_levels():
    data = tiff_i32(RAMP16)
    got = rgb_of(data)
    assert np.array_equal(got, by(RAMP16, 65535))  # 16-bit data: v / 257
    assert len(np.unique(got)) > 250  # not the all-0 image of the issue


def test_16_bit_png_resaved_by_pillow_as_tiff_keeps_its_levels():
    png = saved(Image.fromarray(RAMP16.astype(np.uint16)), "PNG")
    tif = saved(Image.open(io.BytesIO(png)).convert("I"), "TIFF")  # what a user's script does
    assert Image.open(io.BytesIO(tif)).mode == "I"
    assert np.array_equal(rgb_of(tif), by(RAMP16, 65535))


def test_32_bit_unsigned_tiff_of_16_bit_data_keeps_its_levels():
    assert np.array_equal(rgb_of(tiff_i32(RAMP16, unsigned=True)), by(RAMP16, 65535))


# ---------------------------------------------------------------- refused, naming mode and depth

def _refused(data: bytes, *words: str) -> str:
    with pytest.raises(ImageLoadError) as e:
        rgb_of(data)
    assert e.value.reason == "unsupported_image"
    for w in words:
        assert w in e.value.detail, e.value.detail
    return e.value.detail


def test_32_bit_tiff_of_19_bit_data_is_refused_not_blackened():
    v = np.tile(np.linspace(0, 300_000, 200).round().astype(np.int64), (2, 1))
    assert int(by(v, 2**31 - 1).max()) == 0  # the declared scale would blacken every pixel
    _refused(tiff_i32(v), "mode I", "TIFF 32-bit signed", "31-bit", "200 distinct levels", "1 level")


def test_16_bit_png_of_8_bit_data_is_refused():
    v = np.tile(np.arange(256, dtype=np.int64), (2, 1))
    assert set(np.unique(by(v, 65535))) == {0, 1}
    _refused(saved(Image.fromarray(v.astype(np.uint16)), "PNG"), "mode I;16", "16-bit", "256 distinct levels")


def test_float_tiff_slightly_over_1_is_refused():
    f = np.linspace(0, 1.5, 100, dtype=np.float32).reshape(1, 100)  # read as [0, 255]: 0..2
    _refused(saved(Image.fromarray(f, "F"), "TIFF"), "mode F", "[0, 255]", "100 distinct levels")


@pytest.mark.parametrize("color_type,channels,mode", [(2, 3, "RGB"), (6, 4, "RGBA")])
def test_16_bit_colour_png_of_8_bit_data_is_refused(color_type, channels, mode):
    rng = np.random.default_rng(22)
    s = rng.integers(0, 256, size=(6, 9, channels))
    if channels == 4:
        s[..., 3] = 65535  # opaque
    _refused(png16(s, color_type), f"mode {mode} (PNG, 16 bits per sample)", "high byte")


# ---------------------------------------------------------------- no false alarms

def test_black_flat_and_bright_images_are_kept_as_they_are():
    black = np.zeros((4, 5), dtype=np.int64)
    assert np.array_equal(rgb_of(saved(Image.fromarray(black.astype(np.uint16)), "PNG")), by(black, 65535))
    assert np.array_equal(rgb_of(tiff_i32(black)), by(black, 65535))
    wall = 32000 + np.random.default_rng(1).integers(0, 40, size=(8, 8))  # a flat grey wall with noise
    assert np.array_equal(rgb_of(saved(Image.fromarray(wall.astype(np.uint16)), "PNG")), by(wall, 65535))
    s = np.zeros((3, 4, 3), dtype=np.int64)  # a black 48-bit PNG: nothing in the low bytes either
    assert np.array_equal(rgb_of(png16(s, 2)), np.zeros((3, 4, 3), dtype=np.uint8))
    full = np.random.default_rng(2).integers(0, 65536, size=(5, 6, 3))  # real 16-bit colour data
    assert np.array_equal(rgb_of(png16(full, 2)), (full >> 8).astype(np.uint8))  # Pillow's high byte


def test_ingest_keeps_the_issue_tiff_and_rejects_the_collapsing_one(tmp_path):
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Gray."}]
    (tmp_path / "i32_16bit.tif").write_bytes(tiff_i32(RAMP16))
    v = np.tile(np.linspace(0, 300_000, 200).round().astype(np.int64), (2, 1))
    (tmp_path / "i32_19bit.tif").write_bytes(tiff_i32(v))
    assert validate_record({"id": "a", "image": "i32_16bit.tif", "conversations": conv}, tmp_path, 1000)["image_sha256"]
    with pytest.raises(Reject) as e:
        validate_record({"id": "b", "image": "i32_19bit.tif", "conversations": conv}, tmp_path, 1000)
    assert e.value.reason == "unsupported_image" and "i32_19bit.tif" in e.value.detail and "mode I" in e.value.detail
