"""Image rows stored once per unique image (issue #20 item 3), in ``cache_teacher/image_rows/``.

Under causal attention the rows at the image positions depend only on the tokens up to them and the
image; in every supported prompt format those are the same for every conversation about one image. So
with ``positions: all`` an image's rows are keyed by :func:`image_key` — sha256 of the token ids through
the token after the last image position (that token is the last image row's ``token_ids``) and the
processor's pixel inputs — and written once per run; each sample records its key (``image_key``) and
the reader gives it the rows back. Families whose image rows can depend on later text (bidirectional
prefix attention: PaliGemma, Gemma3 — ``models.base.Family.causal_image_rows``) keep them per sample.

Layout: while the stage runs, shard ``i`` writes ``image_rows/<h[:2]>/<h>/<i:05d>.tcblob`` (``h`` = the
key in hex; a :mod:`blob` with header keys ``key``, ``n`` and the stored parts of every row field) unless a
copy from a shard ``<= i`` is there already; ``finalize`` (the stage's end) keeps the copy of the lowest
shard as ``image_rows/<h[:2]>/<h>.tcblob`` and removes the rest. The lowest shard's copy is the same
bytes whatever order shards ran in, so a killed and resumed run ends with the bytes of an uninterrupted
one. Whether an image was written is asked of the file system, not of an in-memory set (memory stays flat
as the dataset grows).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from ...pipeline import atomic
from .blob import decode_blob_raw, encode_blob
from .fields import CacheSpec, decode_rows
from .writer import CacheCorruptError

IMAGE_DIR = "image_rows"
EXT = ".tcblob"


def image_key(ids: Sequence[int], inputs: dict) -> bytes:
    """32-byte key of an image's rows: sha256 over ``ids`` (int64 LE) and, by sorted name, every forward
    input that is not sequence-aligned (``pixel_values``, ``image_sizes``, ``image_grid_thw``,
    ``pixel_attention_mask`` …: name, dtype, shape, bytes)."""
    from ...models.base import SEQ_KEYS
    from .fields import to_numpy

    h = hashlib.sha256()
    h.update(np.asarray(list(ids), dtype="<i8").tobytes())
    for name in sorted(k for k in inputs if k not in SEQ_KEYS):
        a = np.ascontiguousarray(to_numpy(inputs[name]))
        h.update(f"|{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.digest()


class ImageRowStore:
    """The image-row store of one cache directory (module doc)."""

    def __init__(self, cache_dir: Path | str, spec: CacheSpec):
        self.root = Path(cache_dir) / IMAGE_DIR
        self.spec = spec

    def _keydir(self, h: str) -> Path:
        return self.root / h[:2] / h

    def path(self, key: bytes) -> Path:
        """The finished entry of ``key`` (after ``finalize``)."""
        h = key.hex()
        return self.root / h[:2] / f"{h}{EXT}"

    def has_copy(self, key: bytes, shard: int) -> bool:
        """Whether ``key``'s rows are on disk from shard ``<= shard`` (or finished)."""
        if self.path(key).exists():
            return True
        d = self._keydir(key.hex())
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return False
        return any(n.endswith(EXT) and atomic.TMP_MARK not in n and int(n[:-len(EXT)]) <= shard for n in names)

    def put(self, key: bytes, shard: int, parts: dict[str, np.ndarray], n: int) -> int:
        """Write shard ``shard``'s copy of ``key`` (stored parts of ``n`` rows) unless one from a shard
        ``<= shard`` exists. Returns the bytes written (0 when skipped)."""
        if self.has_copy(key, shard):
            return 0
        d = self._keydir(key.hex())
        d.mkdir(parents=True, exist_ok=True)
        data = encode_blob({"key": key.hex(), "n": int(n)}, parts)
        atomic.write_bytes(d / f"{int(shard):05d}{EXT}", data)
        return len(data)

    def read(self, key: bytes) -> dict[str, np.ndarray]:
        """The decoded row fields of ``key``'s image rows. Raises ``CacheCorruptError`` when the entry is
        missing or cannot be decoded."""
        p = self.path(key)
        try:
            header, arrays = decode_blob_raw(p.read_bytes())
            if header.get("key") != key.hex():
                raise ValueError(f"entry says it is {header.get('key')}")
            return decode_rows(self.spec, arrays)
        except FileNotFoundError:
            raise CacheCorruptError(f"teacher cache image rows {p} are missing") from None
        except Exception as e:
            raise CacheCorruptError(f"teacher cache image rows {p} cannot be decoded: {type(e).__name__}: {e}") from e

    def finalize(self) -> dict:
        """Keep the lowest shard's copy of every key as its finished entry; drop the rest (idempotent:
        a finalize killed half-way is finished by the next). Returns ``{"images", "bytes"}``."""
        n = size = 0
        if not self.root.exists():
            return {"images": 0, "bytes": 0}
        for sub in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for entry in sorted(sub.iterdir()):
                if entry.is_dir():
                    final = sub / f"{entry.name}{EXT}"
                    copies = sorted(c for c in entry.iterdir() if c.name.endswith(EXT) and atomic.TMP_MARK not in c.name)
                    if copies and not final.exists():
                        os.replace(copies[0], final)
                    shutil.rmtree(entry, ignore_errors=True)
                    atomic.fsync_dir(sub)
            for entry in sub.iterdir():
                if entry.name.endswith(EXT) and entry.is_file():
                    n += 1
                    size += entry.stat().st_size
        return {"images": n, "bytes": size}
