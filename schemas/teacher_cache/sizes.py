"""Bytes on disk of each stored array of a written cache (for the size estimate's compression ratios and
the README's bytes-per-row table): what every part's compressed data takes, and the rest (framing: Zarr
metadata and shard indexes, tar headers and padding, blob headers)."""
from __future__ import annotations

import json
import struct
import tarfile
from pathlib import Path

from .blob import BLOB_MAGIC
from .fields import CacheSpec
from .image_rows import IMAGE_DIR


def _blob_header(data: bytes) -> dict:
    if data[:4] != BLOB_MAGIC:
        return {"parts": []}
    (hl,) = struct.unpack("<I", data[4:8])
    return json.loads(data[8:8 + hl].decode("utf-8"))


def _blob_parts(data: bytes) -> dict[str, int]:
    return {name: int(ln) for name, _dt, _shape, ln in _blob_header(data)["parts"]}


def shard_part_bytes(path: Path) -> tuple[dict[str, int], int]:
    """(compressed data bytes by stored array name, framing bytes) of one shard (Zarr dir or tar)."""
    path = Path(path)
    parts: dict[str, int] = {}
    total = 0
    if path.is_dir():
        for p in path.rglob("*"):
            if not p.is_file():
                continue
            size = p.stat().st_size
            total += size
            rel = p.relative_to(path).parts
            if len(rel) > 1 and p.name != "zarr.json":
                parts[rel[0]] = parts.get(rel[0], 0) + size
        return parts, total - sum(parts.values())
    total = path.stat().st_size
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if m.isfile():
                for k, v in _blob_parts(tar.extractfile(m).read()).items():
                    parts[k] = parts.get(k, 0) + v
    return parts, total - sum(parts.values())


def image_part_bytes(cache_dir: Path) -> tuple[dict[str, int], int, int, int]:
    """(compressed data bytes by stored array name, framing bytes, entries, rows) of ``cache_dir/image_rows``
    (finished entries and per-shard copies alike)."""
    parts: dict[str, int] = {}
    total = n = rows = 0
    root = Path(cache_dir) / IMAGE_DIR
    if root.exists():
        for p in root.rglob("*.tcblob"):
            data = p.read_bytes()
            total += len(data)
            n += 1
            header = _blob_header(data)
            rows += int(header.get("n", 0))
            for name, _dt, _shape, ln in header["parts"]:
                parts[name] = parts.get(name, 0) + int(ln)
    return parts, total - sum(parts.values()), n, rows


def raw_part_bytes(spec: CacheSpec) -> dict[str, float]:
    """Uncompressed bytes per row of every stored row array (``hidden``, ``hidden.scale``, ``topk_ids`` …)."""
    import math

    return {name: float(p.dtype.itemsize * math.prod(p.tail)) for f in spec.row_fields() for name, p in f.stored()}
