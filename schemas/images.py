"""Every image a stage shows a model goes through here: file → 8-bit RGB, one rule per Pillow mode.

Why one function: a user's image folder holds whatever Pillow can open (16-bit PNG scans, float
TIFFs, palette GIFs with transparency, CMYK JPEGs, phone photos with an EXIF rotation). A plain
``im.convert("RGB")`` clips 16-bit and float pixels to 255 (issue #13: a 16-bit grayscale
gradient became a 2-level, ~98 % white image), drops transparency onto black, and ignores the
EXIF rotation. ``ingest`` (``schemas.samples.check_image``) decodes each image with the same
``to_rgb`` the teacher and student stages use, so an image that ingest accepted is exactly the
image the models see, and one that cannot be mapped faithfully is rejected there with a reason.

Rules of ``to_rgb`` (applied in this order; output is always mode ``"RGB"``, 8 bits/channel):

1. **EXIF orientation** (tag 0x0112, values 2–8) is applied first with
   ``PIL.ImageOps.exif_transpose`` (the EXIF 2.3 table: 3 = rotate 180°, 6 = rotate 90° clockwise,
   8 = rotate 90° counter-clockwise, 2/4/5/7 = the mirrored variants). EXIF that cannot be parsed
   counts as orientation 1.
2. **Per mode:**

   | mode | rule |
   |---|---|
   | ``RGB`` | unchanged |
   | ``1`` | 0 → 0, 1 → 255 (Pillow) |
   | ``L`` | gray replicated to R, G, B (Pillow) |
   | ``P`` | palette lookup (Pillow); with transparency: as ``RGBA`` |
   | ``RGBX`` | X dropped (Pillow) |
   | ``YCbCr``, ``HSV`` | Pillow's colour conversion (JPEG/JFIF YCbCr; HSV→RGB) |
   | ``CMYK`` | Pillow's: ``R = round((255 − C)(255 − K) / 255)``, same for G/M, B/Y; embedded ICC profiles are not applied |
   | ``LAB`` | CIE L*a*b* (D50) → sRGB through LittleCMS (``PIL.ImageCms``); refused when ImageCms is missing |
   | ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` | unsigned 16-bit, any byte order: ``v8 = round(v × 255 / 65535)`` = ``round(v / 257)`` (nearest; ties cannot occur), replicated to R, G, B. Not ``v >> 8``: that truncates, darkening by up to one level |
   | ``I`` (32-bit signed) | scaled by the **declared** bit depth ``b``: ``v8 = round(v × 255 / (2^b − 1))``. ``b`` = the TIFF's BitsPerSample (a 32-bit *unsigned* TIFF, which Pillow hands back as signed, is reinterpreted as unsigned, ``2^32 − 1``; a 32-bit *signed* one uses ``2^31 − 1``; a 32-bit TIFF whose values all fit in 16 bits is 16-bit data — what Pillow writes when it saves mode ``I`` — and uses ``2^16 − 1``, issue #22); PNM files with maxval > 255 are 16-bit (Pillow already rescales them to 0–65535); otherwise 16 if every value ≤ 65535, else 31 (int32's maximum). Negative values are refused |
   | ``F`` (32-bit float) | NaN/±inf or negative values are refused; if max ≤ 1 the values are taken as [0, 1] and ``v8 = floor(v × 255 + 0.5)``; else if max ≤ 255 as [0, 255] and ``v8 = floor(v + 0.5)``; larger values are refused (the scale is unknowable) |
   | ``RGBA``, ``LA``, ``PA``, ``P``/``L``/``RGB``/``I;16`` with a ``transparency`` key | composited on ``BACKGROUND`` (white): ``out = round((c·a + bg·(255 − a)) / 255)`` per channel with straight alpha ``a`` in 0–255 (PNG tRNS colour keys: the keyed pixels get ``a = 0``) |
   | ``La``, ``RGBa`` (premultiplied) | ``out = min(255, c' + round(bg·(255 − a) / 255))`` — the same composite, since ``c' = c·a/255`` |

   Any other mode is refused. Multi-frame files (GIF, APNG, multi-page TIFF) give their first
   frame. 48-bit RGB / 64-bit RGBA / 32-bit LA PNGs already arrive as 8-bit ``RGB``/``RGBA``/``LA``
   from Pillow's PNG decoder, which keeps each sample's high byte.
3. **No collapse into black** (issue #22). A conversion that reduces depth (``I;16``, ``I``, ``F``,
   and Pillow's high byte of a 16-bit colour PNG) must not turn an image into a near-black flat
   one: when every output value is ≤ ``BLACK_LEVELS`` (4 of 255) and the image had more distinct
   levels than the output keeps, the values used far less than the depth they were scaled by (8-bit
   data in a 16-bit file, 19-bit data in a 32-bit TIFF, a float image slightly above 1) and the
   image is refused (``unsupported_image``, naming the mode, the depth used and the levels lost).
   An image that *is* black, or flat at any brightness, is kept as it is.

Errors: ``ImageLoadError`` (a ``ValueError``) with ``.reason`` — one of ingest's reject keys:
``missing_image`` (no such file / not readable), ``undecodable_image`` (Pillow cannot decode the
bytes: not an image, truncated, decompression bomb), ``unsupported_image`` (it decodes, but this
module's rules refuse it) — and ``.detail``, a human-readable explanation.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

BACKGROUND = (255, 255, 255)  # what transparent pixels are composited onto (white, as most viewers show them)
_EXIF_ORIENTATION = 0x0112
_PILLOW_RGB = {"1", "L", "P", "RGBX", "YCbCr", "HSV", "CMYK"}  # Pillow's own convert("RGB") is right for these
_ALPHA = {"RGBA", "LA", "PA"}
_KEYED = {"1", "L", "P", "RGB"}  # modes whose info["transparency"] Pillow's convert("RGBA") applies
_PREMULTIPLIED = {"La", "RGBa"}
_I16 = {"I;16", "I;16L", "I;16B", "I;16N"}


class ImageLoadError(ValueError):
    """An image that cannot become 8-bit RGB. ``reason``: ``missing_image`` | ``undecodable_image``
    | ``unsupported_image`` (stable keys, ingest's reject reasons); ``detail``: human text."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


def load_rgb(image_root: str | Path | None, rel: str, run_dir: str | Path | None = None) -> Image.Image:
    """Open ``image_root / rel`` (``rel`` alone when ``image_root`` is None; a store reference
    ``run:data/images/…`` under ``run_dir``: ``schemas.image_store``), decode it and return
    ``to_rgb`` of it: a loaded PIL image, mode ``"RGB"``, 8 bits per channel, independent of the file.

    Raises ``ImageLoadError`` (reason ``missing_image``, ``undecodable_image`` or
    ``unsupported_image``). ``rel`` is not checked for ``..`` here: ingest has refused such paths
    before any stage reads them."""
    from .image_store import resolve

    try:
        data = resolve(image_root, rel, run_dir).read_bytes()
    except (OSError, ValueError) as e:  # no such file, a directory, no permission, I/O; a store ref without a run
        raise ImageLoadError("missing_image", f"{rel}: {type(e).__name__}: {getattr(e, 'strerror', None) or e}") from None
    return decode_rgb(data, rel)


def decode_rgb(data: bytes, name: str = "<bytes>") -> Image.Image:
    """The bytes of an image file → ``to_rgb`` of its first frame (``"RGB"``, uint8). ``name`` only
    labels error messages. Raises ``ImageLoadError`` (``undecodable_image``/``unsupported_image``)."""
    buf = io.BytesIO(data)
    try:
        im = Image.open(buf)
        im.load()
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
        # Pillow names the buffer by its memory address: not in a reject (rerun bytes must match)
        msg = str(e).replace(" " + repr(buf), "").replace(repr(buf), "the image")
        raise ImageLoadError("undecodable_image", f"{name}: {type(e).__name__}: {msg}") from None
    try:
        _check_16_bit_png(data, im)
        return to_rgb(im)
    except ImageLoadError as e:
        raise ImageLoadError(e.reason, f"{name}: {e.detail}") from None
    except Exception as e:  # noqa: BLE001 - a conversion Pillow cannot do for this file
        raise ImageLoadError("unsupported_image", f"{name}: mode {im.mode}: {type(e).__name__}: {e}") from None


def to_rgb(im: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """A decoded PIL image of any mode → mode ``"RGB"`` (uint8 [H, W, 3] as a numpy array), by the
    per-mode rules in this module's docstring (EXIF orientation applied first; high bit depths
    scaled by their declared depth; transparency composited on ``background``). Returns ``im``
    itself (loaded) when it is already upright RGB, so it stays usable after its file is closed.
    Raises ``ImageLoadError``: ``undecodable_image`` if the pixels cannot be loaded,
    ``unsupported_image`` for modes or values the rules refuse."""
    try:  # pixels in memory: the result stays valid after the caller's ``with Image.open`` closes the file
        im.load()
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file handed over unloaded
        raise ImageLoadError("undecodable_image", f"{type(e).__name__}: {e}") from None
    fmt = im.format  # exif_transpose / convert return images without .format; keep it for "I"
    tiff_tags = dict(getattr(im, "tag_v2", {}) or {}) if fmt == "TIFF" else {}
    im = _upright(im)
    mode = im.mode
    keyed = "transparency" in im.info and mode in _KEYED  # palette / colour-key transparency
    if mode == "RGB" and not keyed:
        return im
    if mode in _ALPHA or keyed:
        return _composite(np.asarray(im.convert("RGBA")), background)
    if mode in _PILLOW_RGB:
        return im.convert("RGB")
    if mode in _PREMULTIPLIED:
        a = np.asarray(im).astype(np.int64)
        color = a[..., :-1] if mode == "RGBa" else np.repeat(a[..., :1], 3, axis=-1)
        alpha = a[..., -1:]
        bg = np.asarray(background, dtype=np.int64)
        out = np.minimum(255, color + (bg * (255 - alpha) + 127) // 255)
        return Image.fromarray(out.astype(np.uint8), "RGB")
    if mode in _I16:
        v = np.asarray(im).astype(np.int64)
        v8 = _not_collapsed(v, _scale_int(v, 65535), mode, "16-bit: 65535")
        return _gray(v8, v, im.info.get("transparency"), background)
    if mode == "I":
        v8, v, depth = _scale_i32(np.asarray(im), fmt, tiff_tags)
        return _gray(_not_collapsed(v, v8, mode, depth), v, im.info.get("transparency"), background)
    if mode == "F":
        f = np.asarray(im, dtype=np.float64)
        v8, depth = _scale_float(f)
        return _gray(_not_collapsed(f, v8, mode, depth), None, None, background)
    if mode == "LAB":
        try:
            from PIL import ImageCms
        except ImportError:
            raise ImageLoadError("unsupported_image", "mode LAB needs PIL.ImageCms (LittleCMS), not installed") from None
        t = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return ImageCms.applyTransform(im, t)
    raise ImageLoadError("unsupported_image", f"mode {mode!r} has no rule for 8-bit RGB")


def _upright(im: Image.Image) -> Image.Image:
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - broken EXIF must not cost the image: treat as upright
        return im
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return im
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001
        return im


def _scale_int(v: np.ndarray, full: int) -> np.ndarray:
    """Integers in [0, full] → uint8, ``floor(v·255/full + 1/2)`` in exact integer arithmetic."""
    return ((v * 510 + full) // (2 * full)).astype(np.uint8)


def _scale_i32(a: np.ndarray, fmt: Optional[str], tags: dict) -> tuple[np.ndarray, np.ndarray, str]:
    """Mode ``I`` (int32 [H, W]) → (uint8 [H, W], the values as int64, the depth used, in words)
    by the declared depth; a 32-bit TIFF whose values all fit in 16 bits is 16-bit data."""
    v = a.astype(np.int64)
    bits, declared = None, "no declared depth"
    if fmt == "TIFF":
        bps = tags.get(258)
        bits = int(bps[0] if isinstance(bps, tuple) else bps) if bps else None
        sample_format = tags.get(339, 1)
        sample_format = sample_format[0] if isinstance(sample_format, tuple) else sample_format
        if bits == 32 and sample_format == 1:  # unsigned 32-bit: Pillow's int32 wrapped the top half
            v = a.astype(np.int32).view(np.uint32).astype(np.int64)
        declared = f"TIFF {bits}-bit {'unsigned' if sample_format == 1 else 'signed'}" if bits else "TIFF"
        if bits == 32 and v.size and 0 <= v.min() and v.max() <= 65535:
            # 16-bit data in a 32-bit container — what Pillow writes when it saves mode I (e.g. a
            # 16-bit PNG opened as I) — scaled as 16-bit: by 2^31 - 1 every pixel became 0 (issue #22)
            return _scale_int(v, 65535), v, f"{declared} holding 16-bit values: read as 16-bit"
        if bits == 32 and sample_format == 1:
            return _scale_int(v, 2**32 - 1), v, f"{declared}: 2^32 - 1"
        if bits == 32:
            bits = 31  # signed: the positive range
    elif fmt in ("PPM", "PGM", "PNM"):
        bits, declared = 16, "PNM maxval > 255"  # Pillow rescales any maxval > 255 to 0..65535
    if v.size and v.min() < 0:
        raise ImageLoadError("unsupported_image", f"mode I with negative values (min {int(v.min())}): "
                                                  "no faithful 8-bit mapping")
    if bits is None or bits <= 8:
        bits = 16 if not v.size or v.max() <= 65535 else 31
    full = 2**bits - 1
    if v.size and v.max() > full:
        raise ImageLoadError("unsupported_image", f"mode I value {int(v.max())} exceeds the declared {bits}-bit range")
    return _scale_int(v, full), v, f"{declared}: {bits}-bit, 2^{bits} - 1"


# Output levels 0..BLACK_LEVELS of 255 read as black. A conversion whose whole result lies there,
# from an image with more distinct levels than the result keeps, collapsed the image (issue #22:
# a 32-bit TIFF of 16-bit data scaled by 2^31 - 1 became all 0) — content loss, never silent.
BLACK_LEVELS = 4


def _not_collapsed(raw: np.ndarray, v8: np.ndarray, mode: str, depth: str) -> np.ndarray:
    """``v8`` (uint8, the 8-bit form of ``raw``) unless it collapsed ``raw`` into black — every
    value ≤ ``BLACK_LEVELS`` with fewer distinct levels than ``raw`` — then ``ImageLoadError``
    (``unsupported_image``) naming the mode, the depth used and the levels lost."""
    if v8.size == 0 or int(v8.max()) > BLACK_LEVELS:
        return v8
    n_out = int(np.count_nonzero(np.bincount(v8.ravel(), minlength=256)))
    n_in = len(np.unique(raw))  # only for a near-black result: rare, so the sort is affordable
    if n_in <= n_out:
        return v8
    raise ImageLoadError("unsupported_image", (
        f"mode {mode} ({depth}): {n_in} distinct levels in {raw.min():g}–{raw.max():g} would become {n_out} "
        f"level(s) ≤ {BLACK_LEVELS} of 255, a near-black image: its content would be lost. The values use far "
        f"less than that depth; save the image at the depth they use (8-bit, or 16-bit spanning 0–65535)"))


def _check_16_bit_png(data: bytes, im: Image.Image) -> None:
    """Pillow decodes a colour PNG of 16 bits per sample (48-bit RGB, 64-bit RGBA, 32-bit LA) to
    8 bits by keeping each sample's high byte. When every colour high byte is near black, the
    picture may sit in the low bytes (8-bit data in a 16-bit container): read those with the same
    decoder (little-endian unpacking of the same rows) and refuse the image if it collapsed."""
    if not (data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 25 and data[24] == 16 and data[25] in (2, 4, 6)):
        return
    hi = np.asarray(im)
    n_color = hi.shape[-1] - (im.mode in ("RGBA", "LA")) if hi.ndim == 3 else 1
    color = hi[..., :n_color] if hi.ndim == 3 else hi
    if color.size == 0 or int(color.max()) > BLACK_LEVELS:
        return
    mode, depth = f"{im.mode} (PNG, 16 bits per sample)", "Pillow keeps each sample's high byte"
    try:
        low = Image.open(io.BytesIO(data))
        low.tile = [t._replace(args=t.args.replace(";16B", ";16L")) for t in low.tile]
        low.load()
        lo = np.asarray(low)
        lo = lo[..., :n_color] if lo.ndim == 3 else lo
    except Exception:  # noqa: BLE001 - no little-endian unpacker for this mode (LA): cannot check
        raise ImageLoadError("unsupported_image", (
            f"mode {mode}: every high byte is ≤ {BLACK_LEVELS} and the low bytes cannot be read to tell a "
            f"black image from one whose values use under 8 bits: content may be lost; save it as 8-bit")) from None
    _not_collapsed(color.astype(np.int64) * 256 + lo, color, mode, depth)


def _scale_float(f: np.ndarray) -> tuple[np.ndarray, str]:
    """Mode ``F`` → (uint8, the range it was read as, in words)."""
    if f.size == 0:
        return f.astype(np.uint8), "empty"
    if not np.isfinite(f).all():
        raise ImageLoadError("unsupported_image", "mode F with NaN or infinite values")
    lo, hi = float(f.min()), float(f.max())
    if lo < 0:
        raise ImageLoadError("unsupported_image", f"mode F with negative values (min {lo:g}): scale unknown")
    if hi <= 1.0:
        return np.floor(f * 255.0 + 0.5).astype(np.uint8), "32-bit float read as [0, 1]"
    if hi <= 255.0:
        return np.floor(f + 0.5).astype(np.uint8), "32-bit float read as [0, 255]"
    raise ImageLoadError("unsupported_image", f"mode F with values up to {hi:g}: neither [0, 1] nor [0, 255]")


def _gray(v8: np.ndarray, raw: Optional[np.ndarray], key, background) -> Image.Image:
    """uint8 [H, W] → RGB; pixels whose raw value equals a tRNS colour ``key`` become ``background``."""
    rgb = np.repeat(v8[..., None], 3, axis=-1)
    if raw is not None and isinstance(key, int):
        rgb[raw == key] = np.asarray(background, dtype=np.uint8)
    return Image.fromarray(rgb, "RGB")


def _composite(rgba: np.ndarray, background) -> Image.Image:
    """uint8 [H, W, 4] straight alpha → RGB on ``background``: ``round((c·a + bg·(255−a)) / 255)``."""
    x = rgba.astype(np.int64)
    a = x[..., 3:]
    bg = np.asarray(background, dtype=np.int64)
    out = (x[..., :3] * a + bg * (255 - a) + 127) // 255
    return Image.fromarray(out.astype(np.uint8), "RGB")
