"""One checksummed blob of named arrays: a WebDataset sample (``.tcblob`` member) and an image-row entry
(``image_rows/…/<key>.tcblob``) are both this.

Layout: ``b"LTCB"`` · ``uint32 LE`` header length · header (utf-8 JSON, sorted keys: the caller's keys +
``v`` (= 2), ``parts`` = ``[[name, numpy dtype str, shape, compressed length], …]`` in payload order,
``crc32`` = zlib crc32 of the payload) · payload = each array's raw little-endian C-order bytes,
Blosc-compressed (zstd, clevel 3, byte-shuffle, typesize = item size; an empty array is an empty
segment). Deterministic: the same arrays and keys give the same bytes.
"""
from __future__ import annotations

import json
import struct
import zlib

import numpy as np

BLOB_MAGIC = b"LTCB"
BLOB_VERSION = 2


def blosc():
    import numcodecs

    return numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)


def encode_blob(header: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """``header`` (JSON-able, without ``v``/``parts``/``crc32``) + named arrays → blob bytes."""
    codec = blosc()
    segs, parts = [], []
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        seg = codec.encode(a) if a.size else b""
        segs.append(seg)
        parts.append([name, a.dtype.str, list(a.shape), len(seg)])
    payload = b"".join(segs)
    h = dict(header, v=BLOB_VERSION, parts=parts, crc32=zlib.crc32(payload))
    hb = json.dumps(h, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return BLOB_MAGIC + struct.pack("<I", len(hb)) + hb + payload


def decode_blob_raw(blob: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """Blob bytes → (header, arrays by name). Raises ``ValueError`` on a bad magic, version, length,
    checksum or segment size."""
    if blob[:4] != BLOB_MAGIC:
        raise ValueError("bad blob magic")
    (hl,) = struct.unpack("<I", blob[4:8])
    header = json.loads(blob[8:8 + hl].decode("utf-8"))
    if header.get("v") != BLOB_VERSION:
        raise ValueError(f"blob version {header.get('v')!r}, this code reads {BLOB_VERSION}")
    payload = memoryview(blob)[8 + hl:]
    if len(payload) != sum(p[3] for p in header["parts"]) or zlib.crc32(payload) != header["crc32"]:
        raise ValueError("blob payload length/crc32 mismatch")
    codec = blosc()
    out, pos = {}, 0
    for name, dt, shape, ln in header["parts"]:
        dt = np.dtype(dt)
        data = bytes(codec.decode(payload[pos:pos + ln])) if ln else b""
        pos += ln
        if len(data) != int(np.prod(shape)) * dt.itemsize:
            raise ValueError(f"blob segment {name} has {len(data)} bytes, expected shape {shape} {dt}")
        out[name] = np.frombuffer(data, dtype=dt).reshape(shape)
    return header, out
