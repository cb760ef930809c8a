"""WebDataset store (``CacheSpec.store == "webdataset"``): one POSIX ustar file ``part-NNNNN.tar`` per
shard, members with mtime 0, uid/gid 0, empty uname/gname, mode 0644:

* ``{i:09d}.tcblob`` for sample ``i`` (0-based, in add order; WebDataset key ``{i:09d}``): one
  :mod:`blob` per sample, header keys ``i``, ``sample_id``, ``n`` (rows); arrays = the stored parts of every
  row field (``fields.Field.stored``) then every per-sample field, by name. Decode with :func:`decode_sample`
  (e.g. ``sample["tcblob"]`` from a ``webdataset.WebDataset`` pipeline).
* ``__end__.json`` last (WebDataset key ``__end__``): :func:`writer.shard_meta`. A tar cut at a member
  boundary lacks it and is reported corrupt.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Iterator, Optional

from .blob import decode_blob_raw, encode_blob
from .fields import CacheSpec, decode_rows
from .writer import CacheCorruptError, check_shard_spec, rm

BLOB_EXT = "tcblob"
TRAILER_NAME = "__end__.json"


class TarBackend:
    """Streams each sample's blob into the temporary tar as it is added; ``finish`` adds the trailer."""

    def __init__(self, tmp: Path, spec: CacheSpec, chunk_rows: int):
        self.tmp, self.spec = tmp, spec
        self.i = 0
        self._tar = self._f = None

    def _open(self) -> None:
        if self._tar is None:
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            rm(self.tmp)
            self._f = open(self.tmp, "wb")
            self._tar = tarfile.open(fileobj=self._f, mode="w", format=tarfile.USTAR_FORMAT)

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        self._tar.addfile(info, io.BytesIO(data))

    def add(self, sample_id: str, n: int, parts: dict, sparts: dict) -> None:
        self._open()
        blob = encode_blob({"i": self.i, "sample_id": sample_id, "n": n}, {**parts, **sparts})
        self._member(f"{self.i:09d}.{BLOB_EXT}", blob)
        self.i += 1

    def finish(self, meta: dict) -> None:
        self._open()
        self._member(TRAILER_NAME, json.dumps(meta, sort_keys=True).encode())
        self._tar.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._tar = self._f = None

    def abort(self) -> None:
        try:
            if self._f is not None:
                self._f.close()
        except OSError:
            pass
        self._tar = self._f = None


def decode_sample(blob: bytes, spec: CacheSpec) -> dict:
    """A ``.tcblob`` → the reader's sample dict (decoded fields of ``spec``)."""
    header, arrays = decode_blob_raw(blob)
    return _finish(header, arrays, spec)


def _finish(header: dict, arrays: dict, spec: CacheSpec) -> dict:
    out = {"sample_id": header["sample_id"], **decode_rows(spec, arrays)}
    for f in spec.sample_fields():
        out[f.name] = f.codec.decode({"": arrays[f.name]})
    return out


def _corrupt(path: Path, e: BaseException) -> CacheCorruptError:
    return CacheCorruptError(f"teacher cache shard {path} cannot be decoded: {type(e).__name__}: {e}")


def iter_tar(path: Path, spec: Optional[CacheSpec]) -> Iterator[dict]:
    """The shard's samples in add order. The trailer (with the shard's spec) is last, so each sample is
    decoded with ``spec`` (the index's) and the trailer is checked against it at the end; without
    ``spec`` the first blob's arrays are decoded against the trailer read up front."""
    if spec is None:
        spec = _trailer_spec(path)
    with open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r|")
        except Exception as e:
            raise _corrupt(path, e) from e
        i = n_rows = 0
        trailer = None
        while True:
            try:
                m = tar.next()
                if m is None:
                    break
                if trailer is not None:
                    raise ValueError(f"member {m.name} after {TRAILER_NAME}")
                data = tar.extractfile(m).read() if m.isfile() else None
                if data is None or len(data) != m.size:
                    raise ValueError(f"member {m.name} is not a complete regular file")
                if m.name == TRAILER_NAME:
                    trailer = json.loads(data.decode("utf-8"))
                    continue
                if m.name != f"{i:09d}.{BLOB_EXT}":
                    raise ValueError(f"unexpected member {m.name} (expected sample {i})")
                header, arrays = decode_blob_raw(data)
                if header["i"] != i:
                    raise ValueError(f"blob {m.name} says it is sample {header['i']}")
                sample = _finish(header, arrays, spec)
            except CacheCorruptError:
                raise
            except Exception as e:
                raise _corrupt(path, e) from e
            n_rows += header["n"]
            i += 1
            yield sample
        if trailer is None:
            raise CacheCorruptError(f"teacher cache shard {path} is truncated: no {TRAILER_NAME} after {i} samples")
        check_shard_spec(path, trailer, spec)
        if trailer.get("n_samples") != i or trailer.get("n_rows") != n_rows:
            raise CacheCorruptError(f"teacher cache shard {path}: trailer says {trailer.get('n_samples')} samples / "
                                    f"{trailer.get('n_rows')} rows, read {i} / {n_rows}")


def _trailer_spec(path: Path) -> CacheSpec:
    """The spec recorded in a tar shard's trailer (read without decoding the samples)."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            m = tar.getmember(TRAILER_NAME)
            meta = json.loads(tar.extractfile(m).read().decode("utf-8"))
        return CacheSpec.from_meta(dict(meta, store="webdataset"))
    except KeyError:
        raise CacheCorruptError(f"teacher cache shard {path} is truncated: no {TRAILER_NAME}") from None
    except Exception as e:
        raise _corrupt(path, e) from e
