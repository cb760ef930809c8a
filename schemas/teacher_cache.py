"""Teacher cache (design §5): the on-disk contract between the teacher pass and student training.

A cache directory holds ``index.json`` plus one file/directory per shard (and, written by the
teacher stage, ``teacher_head.safetensors``). Each shard stores **one row per answer token** on
a flat token axis; the rows of sample ``j`` are ``offsets[j]:offsets[j+1]``. Samples with zero
answer tokens are allowed (``offsets[j] == offsets[j+1]``).

Logical arrays of a shard (``n`` = samples in the shard, ``T`` = answer tokens in the shard,
``H`` = teacher hidden size, ``k`` = top-k):

=================  ========  =============================================  =====================
array              shape     dtype on disk                                  meaning
=================  ========  =============================================  =====================
``offsets``        [n+1]     int64                                          row ranges per sample
``sample_id``      [n]       utf-8 strings (see "strings" below)            joins to sample shard
``token_ids``      [T]       int32                                          answer token per row
``hidden``         [T, H]    ``float16`` | ``uint16`` (bfloat16 bits) |     teacher final-layer
                             ``int8``                                       (post-norm) hidden
``hidden_scale``   [T]       float32 — only when hidden is int8             per-row dequant scale
``topk_ids``       [T, k]    int32                                          teacher top-k ids
``topk_logprobs``  [T, k]    float32 | float16                              raw log-probs (T=1)
``logit_stats``    [T, 2]    float32                                        mean, std of logits
=================  ========  =============================================  =====================

Hidden-state encodings (``CacheSpec.hidden_dtype``):

* ``float16``  — IEEE half, numpy ``astype`` rounding (round-to-nearest-even).
* ``bfloat16`` — stored as ``uint16``: the top 16 bits of the float32 value after
  round-to-nearest-even (NaN kept NaN). Dequantised as ``(bits.astype(uint32) << 16).view(float32)``.
* ``int8``     — symmetric per row: ``scale = max|x| / 127`` (float32, 0 for an all-zero row),
  ``q = clip(rint(x / scale), -127, 127)``; dequantised as ``q * scale``; |error| <= scale / 2.

Readers always return float32 (dequantised) ``hidden``/``topk_logprobs``; both stores hold the
same quantised bits, so the Zarr and WebDataset readers yield bit-identical samples.

**Zarr v3 store** (``CacheSpec.store == "zarr"``, shard = directory ``part-NNNNN.zarr``):
one Zarr group whose attribute ``llavadi_teacher_cache`` holds ``schema_version``,
``hidden_size``, ``top_k``, ``hidden_dtype``, ``logprob_dtype``, ``n_samples``, ``n_tokens``,
``chunk_rows``. Arrays: ``offsets``, ``sample_id_offsets`` [n+1] int64 + ``sample_id_utf8`` [B]
uint8 (strings — Zarr v3 has no ragged dtype: id ``j`` is
``sample_id_utf8[sample_id_offsets[j]:sample_id_offsets[j+1]].decode("utf-8")``), and the
per-token arrays above (``hidden`` in its storage dtype; ``hidden_scale`` only for int8).
Per-token arrays are *sharded* along the token axis: inner chunks of ``chunk_rows`` rows (1024 by
default, whole rows) inside Zarr shards of ``16 * chunk_rows`` rows, so one file per 16k tokens
per array; per-sample arrays are one chunk. Codecs on every chunk: ``bytes`` (little-endian) →
``blosc`` (zstd, clevel 3, byte-shuffle, typesize = item size) → ``crc32c`` (a flipped byte in a
chunk fails to decode even without a checksum list); the shard index has Zarr's default crc32c.
Metadata holds no timestamps, so identical adds give byte-identical stores.

**WebDataset store** (``store == "webdataset"``, shard = file ``part-NNNNN.tar``): a POSIX
ustar archive, members with mtime 0, uid/gid 0, empty uname/gname, mode 0644:

* ``{i:09d}.tcblob`` for sample ``i`` (0-based, in add order; WebDataset key ``{i:09d}``) — one
  blob per sample: ``b"LTCB"`` · ``uint32 LE`` header length · header (utf-8 JSON, sorted keys:
  ``v`` (=1), ``i``, ``sample_id``, ``n``, ``H``, ``k``, ``hidden_dtype``, ``logprob_dtype``,
  ``seg`` = compressed byte length of each segment, ``crc32`` = zlib crc32 of the payload) ·
  payload = the segments ``token_ids, hidden, [hidden_scale,] topk_ids, topk_logprobs,
  logit_stats`` (raw little-endian C-order bytes, each Blosc-compressed like the Zarr chunks;
  an empty array is an empty segment). Decode with :func:`decode_blob`.
* ``__end__.json`` last (WebDataset key ``__end__``): ``schema_version``, spec fields,
  ``n_samples``, ``n_tokens``. A tar cut at a member boundary lacks it and is reported corrupt.

Shards are written to a temporary sibling (:func:`pipeline.atomic.tmp_name`), fsynced, then
renamed into place: a reader sees no shard or the whole shard. Leftover temporaries of killed
writers are removed by :func:`pipeline.atomic.remove_stale_tmp`.

``index.json`` (written atomically by :func:`write_index`)::

    {"schema_version": 1,
     "meta": {"hidden_size": H, "top_k": k, "hidden_dtype": ..., "logprob_dtype": ...,
              "store": "zarr" | "webdataset",                       # required (the CacheSpec)
              "vocab_size": V, "teacher": {"model": ..., "weights_sha256": ...},
              "tokenizer_sha256": ..., "chat_template_sha256": ..., ...},  # producer-defined
     "shards": [{"shard": 0, "file": "part-00000.zarr", "n_samples": ..., "n_tokens": ...,
                 "sha256": <pipeline.atomic.sha256_path of the shard>}, ...]}
"""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import struct
import tarfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Optional

import numpy as np

from ..pipeline import atomic, faults

SCHEMA_VERSION = 1
INDEX_NAME = "index.json"
ATTR_KEY = "llavadi_teacher_cache"
BLOB_EXT = "tcblob"
BLOB_MAGIC = b"LTCB"
TRAILER_NAME = "__end__.json"
DEFAULT_CHUNK_ROWS = 1024
CHUNKS_PER_SHARD = 16
DEFAULT_BLOCK_ROWS = 4096

HIDDEN_DTYPES = ("float16", "bfloat16", "int8")
LOGPROB_DTYPES = ("float32", "float16")
STORES = ("zarr", "webdataset")
_HIDDEN_NP = {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "int8": np.dtype("i1")}
_LOGPROB_NP = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
SPEC_KEYS = ("hidden_size", "top_k", "hidden_dtype", "logprob_dtype", "store")
SHARD_KEYS = ("shard", "file", "n_samples", "n_tokens", "sha256")


class CacheCorruptError(RuntimeError):
    """A shard's bytes do not match its checksum, or the shard cannot be decoded."""


# ----------------------------------------------------------------------------------------- spec
@dataclass
class CacheSpec:
    hidden_size: int
    top_k: int
    hidden_dtype: Literal["float16", "bfloat16", "int8"] = "float16"
    logprob_dtype: Literal["float32", "float16"] = "float32"
    store: Literal["zarr", "webdataset"] = "zarr"

    def __post_init__(self):
        if int(self.hidden_size) <= 0 or int(self.top_k) <= 0:
            raise ValueError(f"hidden_size and top_k must be positive, got {self.hidden_size}, {self.top_k}")
        self.hidden_size, self.top_k = int(self.hidden_size), int(self.top_k)
        if self.hidden_dtype not in HIDDEN_DTYPES:
            raise ValueError(f"hidden_dtype must be one of {HIDDEN_DTYPES}, got {self.hidden_dtype!r}")
        if self.logprob_dtype not in LOGPROB_DTYPES:
            raise ValueError(f"logprob_dtype must be one of {LOGPROB_DTYPES}, got {self.logprob_dtype!r}")
        if self.store not in STORES:
            raise ValueError(f"store must be one of {STORES}, got {self.store!r}")

    @property
    def ext(self) -> str:
        return "zarr" if self.store == "zarr" else "tar"

    def shard_name(self, i: int) -> str:
        """Shard ``i``'s file name, as the run directory names it (``part-NNNNN.zarr`` / ``.tar``)."""
        return f"part-{i:05d}.{self.ext}"

    def to_meta(self) -> dict:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict) -> "CacheSpec":
        missing = [k for k in SPEC_KEYS if k not in meta]
        if missing:
            raise ValueError(f"teacher cache meta lacks {missing}")
        return cls(**{k: meta[k] for k in SPEC_KEYS})


def token_array_bytes(spec: CacheSpec) -> dict[str, int]:
    """Uncompressed bytes each per-token array of the table above takes per answer token, in its
    storage dtype: ``token_ids`` 4, ``hidden`` H × (2 for float16/bfloat16, 1 for int8),
    ``hidden_scale`` 4 (int8 only), ``topk_ids`` 4·k, ``topk_logprobs`` (4 or 2)·k, ``logit_stats`` 8."""
    out = {"token_ids": 4, "hidden": spec.hidden_size * _HIDDEN_NP[spec.hidden_dtype].itemsize}
    if spec.hidden_dtype == "int8":
        out["hidden_scale"] = 4
    out.update(topk_ids=4 * spec.top_k, topk_logprobs=_LOGPROB_NP[spec.logprob_dtype].itemsize * spec.top_k,
               logit_stats=2 * 4)
    return out


def sample_array_bytes(sample_id: str) -> int:
    """Uncompressed bytes of one sample's per-sample arrays: an ``offsets`` and a
    ``sample_id_offsets`` entry (int64, 8 B each) plus the id's utf-8 bytes. A shard adds one more
    entry to each offsets array (16 B)."""
    return 16 + len(sample_id.encode("utf-8"))


def bytes_per_token(spec: CacheSpec) -> float:
    """Theoretical uncompressed bytes per answer token (per-sample offsets/ids excluded)."""
    return float(sum(token_array_bytes(spec).values()))


# --------------------------------------------------------------------------------- quantisation
def _to_numpy(x: Any) -> np.ndarray:
    if type(x).__module__.split(".")[0] == "torch":
        import torch

        x = x.detach().to("cpu")
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits (uint16), round-to-nearest-even; NaN stays a quiet NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    b = x.view(np.uint32)
    rounded = ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((b[nan] >> np.uint32(16)).astype(np.uint16) | np.uint16(0x0040))
    return rounded


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def int8_quantise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: returns (q [n,H] int8, scale [n] float32 = max|x|/127)."""
    x = np.asarray(x, dtype=np.float32)
    scale = (np.abs(x).max(axis=1) / np.float32(127)).astype(np.float32) if x.shape[0] else np.zeros(0, np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.rint(x / safe[:, None]), -127, 127).astype(np.int8)
    return q, scale


def quantise_hidden(x: np.ndarray, hidden_dtype: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
    x = np.asarray(x, dtype=np.float32)
    if hidden_dtype == "float16":
        return x.astype(np.float16), None
    if hidden_dtype == "bfloat16":
        return bf16_bits(x), None
    return int8_quantise(x)


def dequantise_hidden(stored: np.ndarray, scale: Optional[np.ndarray], hidden_dtype: str) -> np.ndarray:
    if hidden_dtype == "float16":
        return stored.astype(np.float32)
    if hidden_dtype == "bfloat16":
        return bf16_to_float32(stored)
    return stored.astype(np.float32) * np.asarray(scale, dtype=np.float32)[:, None]


# ------------------------------------------------------------------------------------- writing
def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        atomic.fsync_dir(Path(dirpath))


def _rm(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _blosc():
    import numcodecs

    return numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)


class CacheShardWriter:
    """Collects samples of one shard and publishes it atomically on :meth:`close`.

    Zarr: rows are buffered (already quantised) and written at close, one Zarr shard (16 inner
    chunks) at a time, so the extra memory is one Zarr shard of rows. WebDataset: each sample is
    streamed into the temporary tar as it is added. Either way the final path appears only at
    close (temporary sibling → fsync → rename)."""

    def __init__(self, final_path: Path, spec: CacheSpec, *, chunk_rows: int = DEFAULT_CHUNK_ROWS):
        self.final = Path(final_path)
        self.spec = spec
        self.chunk_rows = int(chunk_rows)
        self.tmp = atomic.tmp_name(self.final)
        self._ids: list[str] = []
        self._seen: set[str] = set()
        self._n_tokens = 0
        self._closed = False
        self._rows: dict[str, list[np.ndarray]] = {k: [] for k in
                                                  ("token_ids", "hidden", "hidden_scale", "topk_ids", "topk_logprobs", "logit_stats")}
        self._counts: list[int] = []
        self._tar: Optional[tarfile.TarFile] = None
        self._tarf = None

    # -- input checking / quantisation
    def _prepare(self, sample_id, token_ids, hidden, topk_ids, topk_logprobs, logit_stats) -> dict:
        H, k = self.spec.hidden_size, self.spec.top_k
        if not isinstance(sample_id, str):
            raise TypeError(f"sample_id must be str, got {type(sample_id).__name__}")
        if sample_id in self._seen:
            raise ValueError(f"duplicate sample_id {sample_id!r} in shard {self.final}")
        tok = _to_numpy(token_ids)
        n = int(tok.shape[0]) if tok.ndim else -1
        if tok.ndim != 1:
            raise ValueError(f"{sample_id}: token_ids must be 1-D, got shape {tok.shape}")

        def shaped(name, a, cols):
            a = _to_numpy(a)
            if a.size == 0 and n == 0:
                return a.reshape(0, cols)
            if a.shape != (n, cols):
                raise ValueError(f"{sample_id}: {name} must have shape {(n, cols)}, got {tuple(a.shape)}")
            return a

        hid = shaped("hidden", hidden, H)
        tids = shaped("topk_ids", topk_ids, k)
        tlp = shaped("topk_logprobs", topk_logprobs, k)
        ls = shaped("logit_stats", logit_stats, 2)
        for name, a in (("token_ids", tok), ("topk_ids", tids)):
            if a.size and (a.dtype.kind not in "iu" or a.min() < 0 or a.max() > np.iinfo(np.int32).max):
                raise ValueError(f"{sample_id}: {name} must be non-negative int32-range integers")
        q, scale = quantise_hidden(hid, self.spec.hidden_dtype)
        out = {"token_ids": tok.astype("<i4"), "hidden": np.ascontiguousarray(q.astype(_HIDDEN_NP[self.spec.hidden_dtype])),
               "topk_ids": tids.astype("<i4"), "topk_logprobs": tlp.astype(_LOGPROB_NP[self.spec.logprob_dtype]),
               "logit_stats": np.asarray(ls, dtype="<f4")}
        if scale is not None:
            out["hidden_scale"] = scale.astype("<f4")
        return out

    def add(self, sample_id: str, token_ids, hidden, topk_ids, topk_logprobs, logit_stats) -> None:
        if self._closed:
            raise RuntimeError(f"writer for {self.final} is closed")
        rows = self._prepare(sample_id, token_ids, hidden, topk_ids, topk_logprobs, logit_stats)
        n = int(rows["token_ids"].shape[0])
        if self.spec.store == "zarr":
            for key, a in rows.items():
                self._rows[key].append(a)
        else:
            self._write_blob(sample_id, rows)
        self._ids.append(sample_id)
        self._seen.add(sample_id)
        self._counts.append(n)
        self._n_tokens += n

    @property
    def n_samples(self) -> int:
        return len(self._ids)

    @property
    def n_tokens(self) -> int:
        return self._n_tokens

    # -- webdataset
    def _open_tar(self) -> None:
        if self._tar is None:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            _rm(self.tmp)
            self._tarf = open(self.tmp, "wb")
            self._tar = tarfile.open(fileobj=self._tarf, mode="w", format=tarfile.USTAR_FORMAT)

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        self._tar.addfile(info, io.BytesIO(data))

    def _write_blob(self, sample_id: str, rows: dict) -> None:
        self._open_tar()
        i = len(self._ids)
        self._add_member(f"{i:09d}.{BLOB_EXT}", encode_blob(i, sample_id, rows, self.spec))

    # -- zarr
    def _write_zarr(self, root: Path) -> None:
        import zarr
        from zarr.codecs import BloscCodec, Crc32cCodec
        from zarr.storage import LocalStore

        spec, T, n = self.spec, self._n_tokens, len(self._ids)
        C = max(1, min(self.chunk_rows, T))
        S = C * max(1, min(CHUNKS_PER_SHARD, -(-T // C)))
        ids = [s.encode("utf-8") for s in self._ids]
        id_off = np.zeros(n + 1, dtype="<i8")
        np.cumsum([len(b) for b in ids], out=id_off[1:])
        offsets = np.zeros(n + 1, dtype="<i8")
        np.cumsum(self._counts, out=offsets[1:])
        attrs = {ATTR_KEY: {"schema_version": SCHEMA_VERSION, "hidden_size": spec.hidden_size, "top_k": spec.top_k,
                            "hidden_dtype": spec.hidden_dtype, "logprob_dtype": spec.logprob_dtype,
                            "n_samples": n, "n_tokens": T, "chunk_rows": C}}
        g = zarr.open_group(store=LocalStore(root), mode="w", zarr_format=3, attributes=attrs)

        def codecs():
            return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec()]

        cfg = {"write_empty_chunks": True}

        def small(name, data):
            a = g.create_array(name, shape=data.shape, dtype=data.dtype, chunks=(max(1, data.shape[0]),),
                               compressors=codecs(), fill_value=0, config=cfg)
            if data.size:
                a[:] = data

        small("offsets", offsets)
        small("sample_id_offsets", id_off)
        small("sample_id_utf8", np.frombuffer(b"".join(ids), dtype=np.uint8))
        cols = {"token_ids": (), "hidden": (spec.hidden_size,), "topk_ids": (spec.top_k,),
                "topk_logprobs": (spec.top_k,), "logit_stats": (2,)}
        dtypes = {"token_ids": np.dtype("<i4"), "hidden": _HIDDEN_NP[spec.hidden_dtype], "topk_ids": np.dtype("<i4"),
                  "topk_logprobs": _LOGPROB_NP[spec.logprob_dtype], "logit_stats": np.dtype("<f4")}
        if spec.hidden_dtype == "int8":
            cols["hidden_scale"], dtypes["hidden_scale"] = (), np.dtype("<f4")
        for name, tail in cols.items():
            arr = g.create_array(name, shape=(T,) + tail, dtype=dtypes[name], chunks=(C,) + tail, shards=(S,) + tail,
                                 compressors=codecs(), fill_value=0, config=cfg,
                                 attributes={"encoding": "bfloat16-bits"} if name == "hidden" and spec.hidden_dtype == "bfloat16" else None)
            parts = self._rows[name]
            for a in range(0, T, S):  # one whole Zarr shard per write: no read-modify-write
                b = min(T, a + S)
                arr[a:b] = _gather(parts, offsets, a, b, tail, dtypes[name])

    # -- publish
    def close(self) -> dict:
        """Write/finish the temporary shard, fsync, rename into place. Returns
        ``{"file", "n_samples", "n_tokens", "bytes", "sha256"}``."""
        if self._closed:
            raise RuntimeError(f"writer for {self.final} is already closed")
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            if self.spec.store == "zarr":
                _rm(self.tmp)
                self._write_zarr(self.tmp)
                _fsync_tree(self.tmp)
            else:
                self._open_tar()
                trailer = {"schema_version": SCHEMA_VERSION, "n_samples": self.n_samples, "n_tokens": self._n_tokens,
                           **{k: v for k, v in self.spec.to_meta().items() if k != "store"}}
                self._add_member(TRAILER_NAME, json.dumps(trailer, sort_keys=True).encode())
                self._tar.close()
                self._tarf.flush()
                os.fsync(self._tarf.fileno())
                self._tarf.close()
                self._tar = self._tarf = None
            _publish(self.tmp, self.final)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._rows = {k: [] for k in self._rows}
        return {"file": self.final.name, "n_samples": self.n_samples, "n_tokens": self._n_tokens,
                "bytes": _dir_bytes(self.final), "sha256": atomic.sha256_path(self.final)}

    def abort(self) -> None:
        """Drop everything: close and remove the temporary; the final path is not touched."""
        try:
            if self._tar is not None:
                self._tarf.close()
        except OSError:
            pass
        self._tar = self._tarf = None
        _rm(self.tmp)
        self._rows = {k: [] for k in self._rows}
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def _gather(parts: list[np.ndarray], offsets: np.ndarray, a: int, b: int, tail: tuple, dtype) -> np.ndarray:
    """Rows ``a:b`` of the concatenation of ``parts`` (sample j holds rows offsets[j]:offsets[j+1])."""
    out = np.empty((b - a,) + tail, dtype=dtype)
    j = int(np.searchsorted(offsets, a, side="right")) - 1
    pos = a
    while pos < b:
        s, e = int(offsets[j]), int(offsets[j + 1])
        take = min(e, b) - pos
        if take > 0:
            out[pos - a:pos - a + take] = parts[j][pos - s:pos - s + take]
            pos += take
        j += 1
    return out


def _publish(tmp: Path, final: Path) -> None:
    if tmp.is_file():
        atomic.commit(tmp, final)
        return
    faults.maybe_inject_current("commit")  # tests: a failing write (ENOSPC) of a directory store
    old = None
    if final.exists():  # directories cannot be replaced in one rename: move the old one aside
        old = final.with_name(f"{final.name}{atomic.TMP_MARK}old-{socket.gethostname()}-{os.getpid()}")
        _rm(old)
        os.replace(final, old)
    os.replace(tmp, final)
    atomic.fsync_dir(final.parent)
    if old is not None:
        _rm(old)


# ------------------------------------------------------------------------------- blob encoding
def _segment_names(hidden_dtype: str) -> list[str]:
    names = ["token_ids", "hidden"] + (["hidden_scale"] if hidden_dtype == "int8" else [])
    return names + ["topk_ids", "topk_logprobs", "logit_stats"]


def encode_blob(i: int, sample_id: str, rows: dict, spec: CacheSpec) -> bytes:
    """One sample (already-quantised arrays, storage dtypes) → the ``.tcblob`` bytes."""
    codec = _blosc()
    segs = []
    for name in _segment_names(spec.hidden_dtype):
        a = np.ascontiguousarray(rows[name])
        segs.append(codec.encode(a) if a.size else b"")
    payload = b"".join(segs)
    header = {"v": 1, "i": int(i), "sample_id": sample_id, "n": int(rows["token_ids"].shape[0]),
              "H": spec.hidden_size, "k": spec.top_k, "hidden_dtype": spec.hidden_dtype,
              "logprob_dtype": spec.logprob_dtype, "seg": [len(s) for s in segs], "crc32": zlib.crc32(payload)}
    hb = json.dumps(header, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return BLOB_MAGIC + struct.pack("<I", len(hb)) + hb + payload


def _decode_blob_raw(blob: bytes) -> tuple[dict, dict]:
    if blob[:4] != BLOB_MAGIC:
        raise ValueError("bad blob magic")
    (hl,) = struct.unpack("<I", blob[4:8])
    header = json.loads(blob[8:8 + hl].decode("utf-8"))
    payload = memoryview(blob)[8 + hl:]
    if len(payload) != sum(header["seg"]) or zlib.crc32(payload) != header["crc32"]:
        raise ValueError("blob payload length/crc32 mismatch")
    n, H, k, hd = header["n"], header["H"], header["k"], header["hidden_dtype"]
    shapes = {"token_ids": ((n,), "<i4"), "hidden": ((n, H), _HIDDEN_NP[hd]), "hidden_scale": ((n,), "<f4"),
              "topk_ids": ((n, k), "<i4"), "topk_logprobs": ((n, k), _LOGPROB_NP[header["logprob_dtype"]]),
              "logit_stats": ((n, 2), "<f4")}
    codec = _blosc()
    raw, pos = {}, 0
    for name, ln in zip(_segment_names(hd), header["seg"]):
        shape, dt = shapes[name]
        dt = np.dtype(dt)
        seg = payload[pos:pos + ln]
        pos += ln
        data = bytes(codec.decode(seg)) if ln else b""
        if len(data) != int(np.prod(shape)) * dt.itemsize:
            raise ValueError(f"blob segment {name} has {len(data)} bytes, expected shape {shape} {dt}")
        raw[name] = np.frombuffer(data, dtype=dt).reshape(shape)
    return header, raw


def _finish(sample_id: str, raw: dict, hidden_dtype: str) -> dict:
    return {"sample_id": sample_id,
            "token_ids": np.ascontiguousarray(raw["token_ids"], dtype=np.int32),
            "hidden": dequantise_hidden(raw["hidden"], raw.get("hidden_scale"), hidden_dtype),
            "topk_ids": np.ascontiguousarray(raw["topk_ids"], dtype=np.int32),
            "topk_logprobs": raw["topk_logprobs"].astype(np.float32),
            "logit_stats": np.ascontiguousarray(raw["logit_stats"], dtype=np.float32)}


def decode_blob(blob: bytes) -> dict:
    """A ``.tcblob`` (e.g. ``sample["tcblob"]`` from a ``webdataset.WebDataset`` pipeline) →
    the reader's sample dict (float32 dequantised)."""
    header, raw = _decode_blob_raw(blob)
    return _finish(header["sample_id"], raw, header["hidden_dtype"])


# ------------------------------------------------------------------------------------- reading
def _check_spec(path: Path, found: dict, spec: Optional[CacheSpec]) -> None:
    if spec is None:
        return
    for key in ("hidden_size", "top_k", "hidden_dtype", "logprob_dtype"):
        if found.get(key) != getattr(spec, key):
            raise ValueError(f"teacher cache shard {path}: {key} is {found.get(key)!r}, expected {getattr(spec, key)!r}")


def iter_cache_shard(path, spec_or_None: Optional[CacheSpec] = None, expected_sha256: Optional[str] = None, *,
                     block_rows: int = DEFAULT_BLOCK_ROWS) -> Iterator[dict]:
    """Yield the samples of one shard in add order (see the module doc for the dict). The store
    is told by the path (directory → Zarr, file → tar). Zarr is read in row blocks of about
    ``block_rows`` tokens aligned to its chunks. Raises :class:`CacheCorruptError` naming the
    shard on a checksum mismatch or any decode error, ``ValueError`` when ``spec_or_None``
    disagrees with the shard."""
    path = Path(path)
    if not path.exists():
        raise CacheCorruptError(f"teacher cache shard {path} is missing")
    if expected_sha256 is not None:
        got = atomic.sha256_path(path)
        if got != expected_sha256:
            raise CacheCorruptError(f"teacher cache shard {path}: sha256 {got} != expected {expected_sha256}")
    if path.is_dir():
        return _iter_zarr(path, spec_or_None, block_rows)
    return _iter_tar(path, spec_or_None)


def _corrupt(path: Path, e: BaseException) -> CacheCorruptError:
    return CacheCorruptError(f"teacher cache shard {path} cannot be decoded: {type(e).__name__}: {e}")


def _iter_zarr(path: Path, spec: Optional[CacheSpec], block_rows: int) -> Iterator[dict]:
    import zarr
    from zarr.storage import LocalStore

    try:
        g = zarr.open_group(store=LocalStore(path, read_only=True), mode="r", zarr_format=3)
        attrs = dict(g.attrs[ATTR_KEY])
    except Exception as e:
        raise _corrupt(path, e) from e
    _check_spec(path, attrs, spec)
    try:
        hd = attrs["hidden_dtype"]
        names = ["token_ids", "hidden", "topk_ids", "topk_logprobs", "logit_stats"] + (["hidden_scale"] if hd == "int8" else [])
        arrs = {k: g[k] for k in names}
        offsets = np.asarray(g["offsets"][:], dtype=np.int64)
        id_off = np.asarray(g["sample_id_offsets"][:], dtype=np.int64)
        id_bytes = np.asarray(g["sample_id_utf8"][:], dtype=np.uint8).tobytes()
        n, T = int(attrs["n_samples"]), int(attrs["n_tokens"])
        if (offsets.shape != (n + 1,) or id_off.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != T
                or np.any(np.diff(offsets) < 0) or id_off[-1] != len(id_bytes)
                or any(a.shape[0] != T for a in arrs.values())):
            raise ValueError("inconsistent offsets / array lengths")
        ids = [id_bytes[id_off[j]:id_off[j + 1]].decode("utf-8") for j in range(n)]
        C = max(1, int(arrs["hidden"].chunks[0]))
    except Exception as e:
        raise _corrupt(path, e) from e
    B = max(C, (max(1, block_rows) // C) * C)

    w0, w1 = 0, 0  # rows [w0, w1) held in `win`
    win = {k: np.empty((0,) + tuple(arrs[k].shape[1:]), dtype=arrs[k].dtype) for k in names}
    for j in range(n):
        s, e = int(offsets[j]), int(offsets[j + 1])
        if e > w1:
            new_w1 = min(T, max(-(-e // C) * C, w1 + B))
            try:
                fresh = {k: arrs[k][w1:new_w1] for k in names}
            except Exception as ex:
                raise _corrupt(path, ex) from ex
            win = {k: (np.concatenate([win[k][s - w0:], fresh[k]]) if w1 > s else fresh[k]) for k in names}
            w0, w1 = (s if w1 > s else w1), new_w1
        raw = {k: win[k][s - w0:e - w0] for k in names}
        yield _finish(ids[j], raw, hd)


def _iter_tar(path: Path, spec: Optional[CacheSpec]) -> Iterator[dict]:
    f = open(path, "rb")
    try:
        try:
            tar = tarfile.open(fileobj=f, mode="r|")
        except Exception as e:
            raise _corrupt(path, e) from e
        i = 0
        trailer = None
        n_tokens = 0
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
                header, raw = _decode_blob_raw(data)
                if header["i"] != i:
                    raise ValueError(f"blob {m.name} says it is sample {header['i']}")
            except CacheCorruptError:
                raise
            except Exception as e:
                raise _corrupt(path, e) from e
            if i == 0:
                _check_spec(path, {"hidden_size": header["H"], "top_k": header["k"], "hidden_dtype": header["hidden_dtype"],
                                   "logprob_dtype": header["logprob_dtype"]}, spec)
            n_tokens += header["n"]
            i += 1
            yield _finish(header["sample_id"], raw, header["hidden_dtype"])
        if trailer is None:
            raise CacheCorruptError(f"teacher cache shard {path} is truncated: no {TRAILER_NAME} after {i} samples")
        if trailer.get("n_samples") != i or trailer.get("n_tokens") != n_tokens:
            raise CacheCorruptError(f"teacher cache shard {path}: trailer says {trailer.get('n_samples')} samples / "
                                    f"{trailer.get('n_tokens')} tokens, read {i} / {n_tokens}")
        if i == 0:
            _check_spec(path, trailer, spec)
    finally:
        f.close()


# ---------------------------------------------------------------------------------------- index
def write_index(cache_dir, meta: dict, shards: list[dict]) -> Path:
    """Atomically write ``cache_dir/index.json`` (see the module doc). ``meta`` must hold the
    :class:`CacheSpec` fields; each shard entry the keys ``shard, file, n_samples, n_tokens,
    sha256``. Returns the path."""
    CacheSpec.from_meta(meta)  # validates
    rows = []
    for s in shards:
        missing = [k for k in SHARD_KEYS if k not in s]
        if missing:
            raise ValueError(f"shard entry {s} lacks {missing}")
        rows.append({k: s[k] for k in SHARD_KEYS} | {k: v for k, v in s.items() if k not in SHARD_KEYS})
    if len({r["shard"] for r in rows}) != len(rows):
        raise ValueError("duplicate shard numbers in index")
    final = Path(cache_dir) / INDEX_NAME
    atomic.write_json(final, {"schema_version": SCHEMA_VERSION, "meta": meta, "shards": rows})
    return final


def read_index(cache_dir) -> dict:
    """``{"schema_version", "meta", "shards"}`` from ``cache_dir/index.json``."""
    p = Path(cache_dir) / INDEX_NAME
    idx = json.loads(p.read_text())
    if idx.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{p}: schema_version {idx.get('schema_version')!r}, this code reads {SCHEMA_VERSION}")
    return idx


class CacheReader:
    """Iterate a cache directory's samples shard by shard, in index order or in the order of
    ``shards`` (a list of the index's ``shard`` numbers). With ``verify`` each shard's sha256 is
    checked against the index before it is read, and its sample/token counts after."""

    def __init__(self, cache_dir, verify: bool = True, shards: Optional[Iterable[int]] = None,
                 block_rows: int = DEFAULT_BLOCK_ROWS):
        self.cache_dir = Path(cache_dir)
        self.index = read_index(self.cache_dir)
        self.meta: dict = self.index["meta"]
        self.spec = CacheSpec.from_meta(self.meta)
        self.verify, self.block_rows = verify, block_rows
        by_num = {s["shard"]: s for s in self.index["shards"]}
        if shards is None:
            self.shards = list(self.index["shards"])
        else:
            unknown = [s for s in shards if s not in by_num]
            if unknown:
                raise KeyError(f"shards {unknown} are not in {self.cache_dir / INDEX_NAME}")
            self.shards = [by_num[s] for s in shards]

    @property
    def n_samples(self) -> int:
        return sum(int(s["n_samples"]) for s in self.shards)

    @property
    def n_tokens(self) -> int:
        return sum(int(s["n_tokens"]) for s in self.shards)

    def __len__(self) -> int:
        return self.n_samples

    def iter_shard(self, entry: dict) -> Iterator[dict]:
        path = self.cache_dir / entry["file"]
        n = t = 0
        for sample in iter_cache_shard(path, self.spec, entry["sha256"] if self.verify else None,
                                       block_rows=self.block_rows):
            n += 1
            t += len(sample["token_ids"])
            yield sample
        if n != entry["n_samples"] or t != entry["n_tokens"]:
            raise CacheCorruptError(f"teacher cache shard {path}: read {n} samples / {t} tokens, index says "
                                    f"{entry['n_samples']} / {entry['n_tokens']}")

    def __iter__(self) -> Iterator[dict]:
        for entry in self.shards:
            yield from self.iter_shard(entry)
