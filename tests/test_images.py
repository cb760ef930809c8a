"""Issue #13, class 2: every mode Pillow hands back becomes 8-bit RGB faithfully (``schemas.images``)
or is refused with a reason. Each expected image is computed here with numpy (or the stdlib) from
the raw pixel data and a published formula — never by the code under test or by Pillow's
``convert`` on the same image."""
from __future__ import annotations

import colorsys
import io
import struct
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from llavadi.schemas.images import ImageLoadError, decode_rgb, load_rgb, to_rgb
from llavadi.schemas.samples import Reject, validate_record

RNG = np.random.default_rng(13)


def file_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def rgb_of(data: bytes) -> np.ndarray:
    out = decode_rgb(data, "test")
    assert out.mode == "RGB"
    a = np.asarray(out)
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    return a


def gray3(v: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(v, dtype=np.uint8)[..., None], 3, axis=-1)


def exact_scale(v: np.ndarray, full: int) -> np.ndarray:
    """round(v * 255 / full) with exact rational arithmetic (no ties can occur: full is odd)."""
    return np.array([round(Fraction(int(x) * 255, full)) for x in v.ravel()], dtype=np.uint8).reshape(v.shape)


def over_white(c: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Straight-alpha 'over' onto white, in floating point: c·α + 255·(1 − α), α = a/255, rounded."""
    alpha = a.astype(np.float64)[..., None] / 255.0
    return np.round(c.astype(np.float64) * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


# ------------------------------------------------------------------ high bit depths

def test_issue_13_a_16_bit_gradient_keeps_its_levels(tmp_path):
    raw = np.tile(np.linspace(0, 65535, 1024).round().astype(np.uint16), (4, 1))  # a horizontal ramp
    (tmp_path / "ramp.png").write_bytes(file_bytes(Image.frombytes("I;16", (1024, 4), raw.astype("<u2").tobytes()), "PNG"))
    out = np.asarray(load_rgb(tmp_path, "ramp.png"))
    assert np.array_equal(out, gray3(np.round(raw / 257.0)))  # v/257 = v·255/65535; never a .5 tie
    assert len(np.unique(out)) == 256 and (out == 255).mean() < 0.01  # not the 2-level, 98 % white image


@pytest.mark.parametrize("mode,dtype,fmt", [("I;16", "<u2", "PNG"), ("I;16B", ">u2", "TIFF"), ("I;16", "<u2", "TIFF"),
                                            ("I;16L", "<u2", None), ("I;16N", "=u2", None), ("I;16B", ">u2", None)])
def test_16_bit_modes_scale_by_257(mode, dtype, fmt):
    raw = RNG.integers(0, 65536, size=(5, 7)).astype(np.uint16)
    raw[0, :3] = [0, 65535, 32896]  # the ends and 128·257
    im = Image.frombytes(mode, (7, 5), raw.astype(dtype).tobytes())
    if fmt:
        re = Image.open(io.BytesIO(file_bytes(im, fmt)))
        assert re.mode.startswith("I;16"), re.mode
        got = rgb_of(file_bytes(im, fmt))
    else:
        got = np.asarray(to_rgb(im))
    assert np.array_equal(got, gray3(np.round(raw / 257.0)))


def _tiff_int32(values: np.ndarray, sample_format: int) -> bytes:
    data = bytearray(file_bytes(Image.frombytes("I", values.shape[::-1], values.astype("<i4").tobytes()), "TIFF"))
    entry = struct.pack("<HHIH", 339, 3, 1, 2)  # SampleFormat SHORT = 2 (signed), as Pillow writes it
    at = data.find(entry)
    assert at > 0
    data[at:at + len(entry)] = struct.pack("<HHIH", 339, 3, 1, sample_format)
    return bytes(data)


def test_32_bit_signed_tiff_scales_by_int32_max():
    v = np.array([[0, 2**31 - 1, 1_000_000, 70_000, 2**30, 12345678]], dtype=np.int64)
    got = rgb_of(_tiff_int32(v, 2))
    assert np.array_equal(got, gray3(exact_scale(v, 2**31 - 1)))


def test_32_bit_unsigned_tiff_scales_by_uint32_max():
    v = np.array([[0, 2**32 - 5, 2**31, 2**31 - 1, 4_000_000_000, 5]], dtype=np.int64)
    got = rgb_of(_tiff_int32(v.astype(np.uint32).view(np.int32), 1))  # the file holds the uint32 bits
    assert np.array_equal(got, gray3(exact_scale(v, 2**32 - 1)))


def test_16_bit_pgm_arrives_as_I_and_scales_as_16_bit():
    v = np.array([[0, 300, 65535, 40000, 257]], dtype=np.uint16)
    pgm = b"P5\n5 1\n65535\n" + v.astype(">u2").tobytes()
    assert Image.open(io.BytesIO(pgm)).mode == "I"
    assert np.array_equal(rgb_of(pgm), gray3(np.round(v / 257.0)))


def test_in_memory_I_infers_16_or_31_bits():
    small = np.array([[0, 65535, 1000]], dtype=np.int64)
    large = np.array([[0, 65536, 2**31 - 1]], dtype=np.int64)
    for v, full in ((small, 65535), (large, 2**31 - 1)):
        got = np.asarray(to_rgb(Image.frombytes("I", (3, 1), v.astype("<i4").tobytes())))
        assert np.array_equal(got, gray3(exact_scale(v, full)))


def test_negative_integers_are_refused():
    with pytest.raises(ImageLoadError) as e:
        rgb_of(_tiff_int32(np.array([[5, -1]]), 2))
    assert e.value.reason == "unsupported_image" and "negative" in e.value.detail


def test_float_images_by_range():
    unit = np.array([[0.0, 0.25, 0.5, 1.0, 0.1, 0.999]], dtype=np.float32)
    wide = np.array([[0.0, 2.5, 254.4, 255.0, 17.6, 1.5]], dtype=np.float32)
    for f, scale in ((unit, 255.0), (wide, 1.0)):
        got = rgb_of(file_bytes(Image.frombytes("F", (6, 1), f.tobytes()), "TIFF"))
        assert np.array_equal(got, gray3(np.floor(f.astype(np.float64) * scale + 0.5)))


@pytest.mark.parametrize("bad,word", [(np.nan, "NaN"), (np.inf, "NaN"), (-0.5, "negative"), (300.0, "300")])
def test_float_images_without_a_known_scale_are_refused(bad, word):
    f = np.array([[0.0, 0.5, bad]], dtype=np.float32)
    with pytest.raises(ImageLoadError) as e:
        rgb_of(file_bytes(Image.frombytes("F", (3, 1), f.tobytes()), "TIFF"))
    assert e.value.reason == "unsupported_image" and word in e.value.detail


# ------------------------------------------------------------------ palettes and transparency

def _palette_image(n_colors=6, size=(7, 4)):
    pal = RNG.integers(0, 256, size=(n_colors, 3)).astype(np.uint8)
    idx = RNG.integers(0, n_colors, size=size[::-1]).astype(np.uint8)
    im = Image.frombytes("P", size, idx.tobytes())
    im.putpalette(pal.ravel().tolist())
    return im, pal, idx


def test_palette_without_transparency_is_a_lookup():
    im, pal, idx = _palette_image()
    assert np.array_equal(rgb_of(file_bytes(im, "PNG")), pal[idx])


def test_palette_with_per_entry_alpha_is_composited_on_white():
    im, pal, idx = _palette_image()
    alpha = np.array([255, 0, 128, 64, 200, 1], dtype=np.uint8)
    got = rgb_of(file_bytes(im, "PNG", transparency=alpha.tobytes()))  # PNG tRNS: one alpha per entry
    assert np.array_equal(got, over_white(pal[idx], alpha[idx]))


def test_palette_with_one_transparent_index_gif():
    im, pal, idx = _palette_image()
    data = file_bytes(im, "GIF", transparency=2)
    want = pal[idx].copy()
    want[idx == 2] = 255
    assert np.array_equal(rgb_of(data), want)


def test_rgba_la_pa_composited_on_white():
    c = RNG.integers(0, 256, size=(4, 6, 3)).astype(np.uint8)
    a = RNG.integers(0, 256, size=(4, 6)).astype(np.uint8)
    a[0, :3] = [0, 255, 128]
    rgba = Image.frombytes("RGBA", (6, 4), np.dstack([c, a]).tobytes())
    assert np.array_equal(rgb_of(file_bytes(rgba, "PNG")), over_white(c, a))
    la = Image.frombytes("LA", (6, 4), np.dstack([c[..., 0], a]).tobytes())
    assert np.array_equal(rgb_of(file_bytes(la, "PNG")), over_white(gray3(c[..., 0]), a))
    im, pal, idx = _palette_image(size=(6, 4))
    pa = Image.frombytes("PA", (6, 4), np.dstack([idx, a]).tobytes())
    pa.putpalette(pal.ravel().tolist())
    assert np.array_equal(np.asarray(to_rgb(pa)), over_white(pal[idx], a))


def test_premultiplied_modes():
    a = np.array([[0, 255, 128, 51]], dtype=np.uint8)
    c = np.array([[0, 200, 64, 51]], dtype=np.uint8)  # premultiplied: c' <= a
    la = Image.frombytes("La", (4, 1), np.dstack([c, a]).tobytes())
    # over white with premultiplied colour: c' + 255·(1 − α) = c' + 255 − a exactly
    want = gray3(c.astype(int) + 255 - a.astype(int))
    assert np.array_equal(np.asarray(to_rgb(la)), want)
    rgba_p = Image.frombytes("RGBa", (4, 1), np.dstack([c, c, c, a]).tobytes())
    assert np.array_equal(np.asarray(to_rgb(rgba_p)), want)


def test_colour_key_transparency_in_gray_rgb_and_16_bit_png():
    g = np.array([[0, 7, 200, 7]], dtype=np.uint8)
    assert np.array_equal(rgb_of(file_bytes(Image.frombytes("L", (4, 1), g.tobytes()), "PNG", transparency=7)),
                          gray3(np.where(g == 7, 255, g)))
    rgb = np.array([[[1, 2, 3], [9, 9, 9], [1, 2, 3]]], dtype=np.uint8)
    want = rgb.copy()
    want[0, [0, 2]] = 255
    assert np.array_equal(rgb_of(file_bytes(Image.frombytes("RGB", (3, 1), rgb.tobytes()), "PNG", transparency=(1, 2, 3))),
                          want)
    v = np.array([[5, 65535, 5, 1000]], dtype=np.uint16)
    got = rgb_of(file_bytes(Image.frombytes("I;16", (4, 1), v.astype("<u2").tobytes()), "PNG", transparency=5))
    assert np.array_equal(got, gray3(np.where(v == 5, 255, np.round(v / 257.0))))


# ------------------------------------------------------------------ other colour modes

def test_one_bit_gray_and_rgbx():
    bits = RNG.integers(0, 2, size=(3, 9)).astype(bool)
    im = Image.frombytes("1", (9, 3), np.packbits(bits, axis=1).tobytes())
    assert np.array_equal(rgb_of(file_bytes(im, "PNG")), gray3(bits * 255))
    g = RNG.integers(0, 256, size=(3, 5)).astype(np.uint8)
    assert np.array_equal(rgb_of(file_bytes(Image.frombytes("L", (5, 3), g.tobytes()), "PNG")), gray3(g))
    x = RNG.integers(0, 256, size=(2, 3, 4)).astype(np.uint8)
    assert np.array_equal(np.asarray(to_rgb(Image.frombytes("RGBX", (3, 2), x.tobytes()))), x[..., :3])


def test_cmyk_tiff():
    cmyk = RNG.integers(0, 256, size=(4, 5, 4)).astype(np.int64)
    cmyk[0, 0], cmyk[0, 1] = [0, 0, 0, 0], [255, 255, 255, 255]
    got = rgb_of(file_bytes(Image.frombytes("CMYK", (5, 4), cmyk.astype(np.uint8).tobytes()), "TIFF"))
    # (255 − C)(255 − K)/255, one channel per ink; no .5 ties (an odd divisor of an even product)
    want = np.round((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255.0)
    assert np.array_equal(got, want.astype(np.uint8))


def test_ycbcr_hsv_lab():
    ycc = RNG.integers(16, 240, size=(3, 4, 3)).astype(np.float64)
    got = np.asarray(to_rgb(Image.frombytes("YCbCr", (4, 3), ycc.astype(np.uint8).tobytes()))).astype(int)
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128, ycc[..., 2] - 128  # JFIF (ITU-R BT.601 full range)
    want = np.clip(np.round(np.dstack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb])), 0, 255)
    assert np.abs(got - want).max() <= 1

    hsv = RNG.integers(0, 256, size=(3, 4, 3)).astype(np.uint8)
    got = np.asarray(to_rgb(Image.frombytes("HSV", (4, 3), hsv.tobytes()))).astype(int)
    want = np.array([[colorsys.hsv_to_rgb(*(p / 255.0)) for p in row] for row in hsv]) * 255
    assert np.abs(got - want).max() <= 1.5

    # neutral greys: L* → sRGB needs no white point (CIE 1976 inverse, then the sRGB curve)
    lstar = np.array([100.0, 75.0, 50.0, 25.0])
    # raw LAB bytes (as in a CIELab TIFF): L* scaled to 0-255, a* and b* signed bytes (0 = neutral)
    lab = np.stack([np.round(lstar * 255 / 100), np.zeros(4), np.zeros(4)], axis=-1).astype(np.uint8)[None]
    got = np.asarray(to_rgb(Image.frombytes("LAB", (4, 1), lab.tobytes()))).astype(int)[0]
    L = lab[0, :, 0].astype(np.float64) * 100 / 255.0
    Y = np.where(L > 8, ((L + 16) / 116) ** 3, L / 903.3)
    srgb = np.where(Y <= 0.0031308, 12.92 * Y, 1.055 * Y ** (1 / 2.4) - 0.055) * 255
    assert np.abs(got - srgb[:, None]).max() <= 2
    assert np.abs(got[:, 0] - got[:, 2]).max() <= 2  # still grey


# ------------------------------------------------------------------ EXIF orientation

def _with_orientation(im: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return file_bytes(im, fmt, exif=exif)


# EXIF 2.3 tag 0x0112: how the stored rows/columns map to the displayed image. Each expected
# transform is derived from where the stored pixel (0, 0) must appear: 1 top-left, 2 top-right,
# 3 bottom-right, 4 bottom-left, 5 top-left (rows become columns), 6 top-right, 7 bottom-right,
# 8 bottom-left.
DISPLAY = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_png(orientation):
    a = RNG.integers(0, 256, size=(3, 5, 3)).astype(np.uint8)
    data = _with_orientation(Image.frombytes("RGB", (5, 3), a.tobytes()), "PNG", orientation)
    assert np.array_equal(rgb_of(data), DISPLAY[orientation](a))


def test_exif_orientation_jpeg_and_16_bit_png_together():
    a = np.zeros((16, 32, 3), dtype=np.uint8)
    a[:8, :16] = (255, 0, 0)
    a[:8, 16:] = (0, 255, 0)
    a[8:, :16] = (0, 0, 255)
    a[8:, 16:] = (255, 255, 0)
    got = rgb_of(_with_orientation(Image.frombytes("RGB", (32, 16), a.tobytes()), "JPEG", 6)).astype(int)
    want = np.rot90(a, -1).astype(int)
    assert got.shape == (32, 16, 3)
    centres = [(4, 4), (4, 12), (28, 4), (28, 12)]  # away from JPEG's block edges
    assert max(np.abs(got[y, x] - want[y, x]).max() for y, x in centres) <= 12
    raw = RNG.integers(0, 65536, size=(3, 4)).astype(np.uint16)
    data = _with_orientation(Image.frombytes("I;16", (4, 3), raw.astype("<u2").tobytes()), "PNG", 8)
    assert np.array_equal(rgb_of(data), np.rot90(gray3(np.round(raw / 257.0)), 1))


# ------------------------------------------------------------------ files, errors, ingest

def test_first_frame_of_an_animation():
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:])
    assert (rgb_of(b.getvalue()) == np.array([255, 0, 0], dtype=np.uint8)).all()


def test_load_rgb_errors_carry_reasons(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    png = file_bytes(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    (tmp_path / "cut.png").write_bytes(png[:len(png) // 2])
    (tmp_path / "dir.png").mkdir()
    for rel, reason in (("none.png", "missing_image"), ("dir.png", "missing_image"),
                        ("text.png", "undecodable_image"), ("cut.png", "undecodable_image")):
        with pytest.raises(ImageLoadError) as e:
            load_rgb(str(tmp_path), rel)
        assert e.value.reason == reason and rel in e.value.detail, (rel, e.value)


def test_ingest_accepts_or_rejects_by_the_same_rules(tmp_path):
    raw = np.array([[0, 65535, 30000]], dtype=np.uint16)
    (tmp_path / "deep.png").write_bytes(file_bytes(Image.frombytes("I;16", (3, 1), raw.astype("<u2").tobytes()), "PNG"))
    f = np.array([[0.0, 1000.0]], dtype=np.float32)
    (tmp_path / "hdr.tif").write_bytes(file_bytes(Image.frombytes("F", (2, 1), f.tobytes()), "TIFF"))
    conv = [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "a ramp"}]
    row = validate_record({"id": "a", "image": "deep.png", "conversations": conv}, tmp_path, 1000)
    assert row["image"] == "deep.png" and len(row["image_sha256"]) == 64
    with pytest.raises(Reject) as e:
        validate_record({"id": "b", "image": "hdr.tif", "conversations": conv}, tmp_path, 1000)
    assert e.value.reason == "unsupported_image" and "hdr.tif" in e.value.detail


def test_to_rgb_on_an_open_file_outlives_it_and_names_a_truncated_one(tmp_path):
    (tmp_path / "x.png").write_bytes(file_bytes(Image.new("RGB", (4, 4), (1, 2, 3)), "PNG"))
    with Image.open(tmp_path / "x.png") as im:
        out = to_rgb(im)
    assert (np.asarray(out) == [1, 2, 3]).all()
    png = file_bytes(Image.fromarray(RNG.integers(0, 256, size=(64, 64, 3)).astype(np.uint8)), "PNG")
    with Image.open(io.BytesIO(png[: len(png) // 2])) as im, pytest.raises(ImageLoadError) as e:
        to_rgb(im)
    assert e.value.reason == "undecodable_image"
