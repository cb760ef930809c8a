"""One writer for both stores: validates and encodes a sample's fields (``fields.check_rows``) and hands
the stored parts to the store's backend (``zarr_store.ZarrBackend`` / ``wds_store.TarBackend``). A shard
is written to a temporary sibling (:func:`pipeline.atomic.tmp_name`), fsynced, then renamed into place:
a reader sees no shard or the whole shard. Leftover temporaries of killed writers are removed by
:func:`pipeline.atomic.remove_stale_tmp`."""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ...pipeline import atomic, faults
from .fields import CacheSpec, check_rows, to_numpy

SCHEMA_VERSION = 2
DEFAULT_CHUNK_ROWS = 1024


class CacheCorruptError(RuntimeError):
    """A shard's bytes do not match its checksum, or the shard cannot be decoded."""


def shard_meta(spec: CacheSpec, n_samples: int, n_rows: int) -> dict:
    """What a shard records about itself (Zarr group attribute / tar trailer)."""
    meta = {k: v for k, v in spec.to_meta().items() if k != "store"}
    return {"schema_version": SCHEMA_VERSION, **meta, "n_samples": int(n_samples), "n_rows": int(n_rows)}


def check_shard_spec(path: Path, found: dict, spec: Optional[CacheSpec]) -> None:
    """``ValueError`` when the shard's recorded spec differs from ``spec`` (any declared key but ``store``)."""
    if found.get("schema_version") != SCHEMA_VERSION:
        raise CacheCorruptError(f"teacher cache shard {path}: schema_version {found.get('schema_version')!r}, "
                                f"this code reads {SCHEMA_VERSION}")
    if spec is None:
        return
    for key, want in spec.to_meta().items():
        if key != "store" and found.get(key) != want:
            raise ValueError(f"teacher cache shard {path}: {key} is {found.get(key)!r}, expected {want!r}")


def encode_sample_fields(spec: CacheSpec, sample_id: str, sample: Optional[dict]) -> dict[str, np.ndarray]:
    """Per-sample fields → stored values (each an array of the field's ``ndim``; an absent value is an
    empty array of that ``ndim``). Raises ``ValueError`` for an undeclared or mis-shaped field."""
    sample = dict(sample or {})
    out = {}
    for f in spec.sample_fields():
        v = sample.pop(f.name, None)
        a = np.zeros((0,) * f.ndim) if v is None else to_numpy(v)
        if a.ndim != f.ndim:
            raise ValueError(f"{sample_id}: {f.name} must have {f.ndim} dimension(s), got shape {tuple(a.shape)}")
        (part,) = f.codec.encode(a).values()
        out[f.name] = part
    if sample:
        raise ValueError(f"{sample_id}: per-sample fields {sorted(sample)} are not declared by this cache")
    return out


def rm(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def publish(tmp: Path, final: Path) -> None:
    """Rename the finished temporary shard (file or directory) over ``final``."""
    if tmp.is_file():
        atomic.commit(tmp, final)
        return
    faults.maybe_inject_current("commit")  # tests: a failing write (ENOSPC) of a directory store
    atomic.fsync_tree(tmp)
    old = None
    if final.exists():  # directories cannot be replaced in one rename: move the old one aside
        old = final.with_name(f"{final.name}{atomic.TMP_MARK}old-{socket.gethostname()}-{os.getpid()}")
        rm(old)
        os.replace(final, old)
    os.replace(tmp, final)
    atomic.fsync_dir(final.parent)
    if old is not None:
        rm(old)


class CacheShardWriter:
    """Collects the samples of one shard and publishes it atomically on :meth:`close`.

    ``add(sample_id, rows, sample=None)``: ``rows`` maps every row field of ``spec.row_fields()`` to its
    values (``[n] + tail``, numpy or torch; ``n`` may be 0), ``sample`` the per-sample fields. Zarr buffers
    the encoded rows and writes them at close, one Zarr shard at a time; WebDataset streams each sample
    into the temporary tar. Raises ``ValueError`` (shape, undeclared field, duplicate id) before anything
    of the sample is kept."""

    def __init__(self, final_path, spec: CacheSpec, *, chunk_rows: int = DEFAULT_CHUNK_ROWS):
        from .wds_store import TarBackend
        from .zarr_store import ZarrBackend

        self.final = Path(final_path)
        self.spec = spec
        self.tmp = atomic.tmp_name(self.final)
        backend = ZarrBackend if spec.store == "zarr" else TarBackend
        self._backend = backend(self.tmp, spec, int(chunk_rows))
        self._seen: set[str] = set()
        self._n_rows = 0
        self._closed = False

    def add(self, sample_id: str, rows: dict[str, Any], sample: Optional[dict] = None) -> None:
        if self._closed:
            raise RuntimeError(f"writer for {self.final} is closed")
        if not isinstance(sample_id, str):
            raise TypeError(f"sample_id must be str, got {type(sample_id).__name__}")
        if sample_id in self._seen:
            raise ValueError(f"duplicate sample_id {sample_id!r} in shard {self.final}")
        parts = check_rows(self.spec, sample_id, rows)
        n = int(parts["position"].shape[0])
        sparts = encode_sample_fields(self.spec, sample_id, sample)
        self._backend.add(sample_id, n, parts, sparts)
        self._seen.add(sample_id)
        self._n_rows += n

    @property
    def n_samples(self) -> int:
        return len(self._seen)

    @property
    def n_rows(self) -> int:
        return self._n_rows

    def close(self) -> dict:
        """Finish the temporary shard, fsync, rename into place. Returns
        ``{"file", "n_samples", "n_rows", "bytes", "sha256"}``."""
        if self._closed:
            raise RuntimeError(f"writer for {self.final} is already closed")
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self._backend.finish(shard_meta(self.spec, self.n_samples, self._n_rows))
            publish(self.tmp, self.final)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return {"file": self.final.name, "n_samples": self.n_samples, "n_rows": self._n_rows,
                "bytes": dir_bytes(self.final), "sha256": atomic.sha256_path(self.final)}

    def abort(self) -> None:
        """Drop everything: close and remove the temporary; the final path is not touched."""
        self._backend.abort()
        rm(self.tmp)
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()
