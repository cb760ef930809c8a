"""Zarr v3 store (``CacheSpec.store == "zarr"``): one directory ``part-NNNNN.zarr`` per shard.

One Zarr group whose attribute ``llavadi_teacher_cache`` holds :func:`writer.shard_meta` (schema version,
the spec, ``n_samples``, ``n_rows``) and ``chunk_rows``. Arrays:

* ``offsets`` [n+1] int64 — sample ``j``'s rows are ``offsets[j]:offsets[j+1]`` on the flat row axis;
* ``sample_id_offsets`` [n+1] int64 + ``sample_id_utf8`` [B] uint8 — id ``j`` is
  ``sample_id_utf8[sample_id_offsets[j]:sample_id_offsets[j+1]].decode("utf-8")`` (Zarr v3 has no ragged dtype);
* one array per stored part of every row field (``fields.Field.stored``: ``hidden``, ``hidden.scale``,
  ``topk_ids`` …), ``[T] + tail`` in its storage dtype, *sharded* along the row axis: inner chunks of
  ``chunk_rows`` rows inside Zarr shards of 16 chunks (one file per 16k rows per array);
* per-sample fields (``affinity``, ``image_key``): ``<name>`` flat [F] in storage dtype (chunks of
  :data:`SAMPLE_CHUNK` values) + ``<name>.shape`` [n, ndim] int32; sample ``j``'s value is the next
  ``prod(shape[j])`` values, reshaped.

Codecs on every chunk: ``bytes`` (little-endian) → ``blosc`` (zstd, clevel 3, byte-shuffle) → ``crc32c``
(a flipped byte fails to decode); the shard index has Zarr's default crc32c. Metadata holds no
timestamps, so identical adds give byte-identical stores. Readers go through windows of whole chunks
(Zarr per-sample reads are slow: ~100/s).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .fields import CacheSpec, decode_rows
from .writer import CacheCorruptError, check_shard_spec, rm

ATTR_KEY = "llavadi_teacher_cache"
CHUNKS_PER_SHARD = 16
SAMPLE_CHUNK = 1 << 18  # values per chunk of a flat per-sample array
DEFAULT_BLOCK_ROWS = 4096


def _codecs():
    from zarr.codecs import BloscCodec, Crc32cCodec

    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec()]


def _gather(parts: list[np.ndarray], offsets: np.ndarray, a: int, b: int) -> np.ndarray:
    """Rows ``a:b`` of the concatenation of ``parts`` (part j holds rows offsets[j]:offsets[j+1])."""
    tail, dtype = parts[0].shape[1:], parts[0].dtype
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


class ZarrBackend:
    """Buffers a shard's encoded parts and writes the Zarr group at ``finish`` (one whole Zarr shard per
    write: small writes into a sharded array would rewrite the shard)."""

    def __init__(self, tmp: Path, spec: CacheSpec, chunk_rows: int):
        self.tmp, self.spec, self.chunk_rows = tmp, spec, chunk_rows
        self.ids: list[bytes] = []
        self.counts: list[int] = []
        self.rows: dict[str, list[np.ndarray]] = {}
        self.samples: dict[str, list[np.ndarray]] = {f.name: [] for f in spec.sample_fields()}

    def add(self, sample_id: str, n: int, parts: dict, sparts: dict) -> None:
        self.ids.append(sample_id.encode("utf-8"))
        self.counts.append(n)
        for k, a in parts.items():
            self.rows.setdefault(k, []).append(a)
        for k, a in sparts.items():
            self.samples[k].append(a)

    def finish(self, meta: dict) -> None:
        import zarr
        from zarr.storage import LocalStore

        rm(self.tmp)
        T, n = int(meta["n_rows"]), len(self.ids)
        C = max(1, min(self.chunk_rows, T))
        S = C * max(1, min(CHUNKS_PER_SHARD, -(-T // C)))
        g = zarr.open_group(store=LocalStore(self.tmp), mode="w", zarr_format=3,
                            attributes={ATTR_KEY: dict(meta, chunk_rows=C)})
        cfg = {"write_empty_chunks": True}

        def flat(name: str, data: np.ndarray, chunk: int) -> None:
            a = g.create_array(name, shape=data.shape, dtype=data.dtype, chunks=(max(1, min(chunk, data.shape[0])),)
                               + data.shape[1:], compressors=_codecs(), fill_value=0, config=cfg)
            if data.size:
                a[:] = data

        offsets = np.zeros(n + 1, dtype="<i8")
        np.cumsum(self.counts, out=offsets[1:])
        id_off = np.zeros(n + 1, dtype="<i8")
        np.cumsum([len(b) for b in self.ids], out=id_off[1:])
        flat("offsets", offsets, n + 1)
        flat("sample_id_offsets", id_off, n + 1)
        flat("sample_id_utf8", np.frombuffer(b"".join(self.ids), dtype=np.uint8), len(b"".join(self.ids)))
        for f in self.spec.row_fields():
            for name, part in f.stored():
                arr = g.create_array(name, shape=(T,) + part.tail, dtype=part.dtype, chunks=(C,) + part.tail,
                                     shards=(S,) + part.tail, compressors=_codecs(), fill_value=0, config=cfg)
                pieces = self.rows.get(name, [])
                for a in range(0, T, S):
                    arr[a:min(T, a + S)] = _gather(pieces, offsets, a, min(T, a + S))
        for f in self.spec.sample_fields():
            vals = self.samples[f.name]
            (part,) = f.codec.parts()
            shapes = np.asarray([v.shape for v in vals], dtype="<i4").reshape(n, f.ndim)
            data = np.concatenate([v.reshape(-1) for v in vals]) if vals else np.zeros(0)
            flat(f.name, data.astype(part.dtype), SAMPLE_CHUNK)
            flat(f.name + ".shape", shapes, n)
        self.rows, self.samples = {}, {}

    def abort(self) -> None:
        self.rows, self.samples = {}, {}


class _Window:
    """Sequential reads of ``arr[a:b]`` with increasing ``a``: whole chunks, at least ``block`` rows at a
    time; the rows before the current ``a`` are dropped."""

    def __init__(self, arr, block: int):
        self.arr = arr
        self.C = max(1, int(arr.chunks[0]))
        self.B = max(self.C, (max(1, block) // self.C) * self.C)
        self.N = int(arr.shape[0])
        self.w0 = self.w1 = 0
        self.buf = np.empty((0,) + tuple(arr.shape[1:]), dtype=arr.dtype)

    def take(self, a: int, b: int) -> np.ndarray:
        if b > self.w1:
            new_w1 = min(self.N, max(-(-b // self.C) * self.C, self.w1 + self.B))
            fresh = self.arr[self.w1:new_w1]
            if self.w1 > a:  # requests are contiguous (a >= w0): keep [a, w1), append the fresh rows
                self.buf = np.concatenate([self.buf[a - self.w0:], fresh])
                self.w0 = a
            else:
                self.buf, self.w0 = fresh, self.w1
            self.w1 = new_w1
        return self.buf[a - self.w0:b - self.w0]


def _corrupt(path: Path, e: BaseException) -> CacheCorruptError:
    return CacheCorruptError(f"teacher cache shard {path} cannot be decoded: {type(e).__name__}: {e}")


def iter_zarr(path: Path, spec: Optional[CacheSpec], block_rows: int = DEFAULT_BLOCK_ROWS) -> Iterator[dict]:
    """The shard's samples in add order: ``{"sample_id", <row fields>, <sample fields>}`` (decoded)."""
    import zarr
    from zarr.storage import LocalStore

    try:
        g = zarr.open_group(store=LocalStore(path, read_only=True), mode="r", zarr_format=3)
        attrs = dict(g.attrs[ATTR_KEY])
    except Exception as e:
        raise _corrupt(path, e) from e
    check_shard_spec(path, attrs, spec)
    try:
        found = CacheSpec.from_meta(dict(attrs, store="zarr"))
        rfields, sfields = found.row_fields(), found.sample_fields()
        names = [name for f in rfields for name, _ in f.stored()]
        rows = {k: _Window(g[k], block_rows) for k in names}
        offsets = np.asarray(g["offsets"][:], dtype=np.int64)
        id_off = np.asarray(g["sample_id_offsets"][:], dtype=np.int64)
        id_bytes = np.asarray(g["sample_id_utf8"][:], dtype=np.uint8).tobytes()
        n, T = int(attrs["n_samples"]), int(attrs["n_rows"])
        shapes = {f.name: np.asarray(g[f.name + ".shape"][:], dtype=np.int64).reshape(n, f.ndim) for f in sfields}
        svals = {f.name: _Window(g[f.name], SAMPLE_CHUNK) for f in sfields}
        sstart = {f.name: np.concatenate([[0], np.cumsum(np.prod(shapes[f.name], axis=1))]) for f in sfields}
        if (offsets.shape != (n + 1,) or id_off.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != T
                or np.any(np.diff(offsets) < 0) or id_off[-1] != len(id_bytes)
                or any(w.N != T for w in rows.values())
                or any(sstart[k][-1] != svals[k].N for k in svals)):
            raise ValueError("inconsistent offsets / array lengths")
        ids = [id_bytes[id_off[j]:id_off[j + 1]].decode("utf-8") for j in range(n)]
    except CacheCorruptError:
        raise
    except Exception as e:
        raise _corrupt(path, e) from e
    for j in range(n):
        s, e = int(offsets[j]), int(offsets[j + 1])
        try:
            stored = {k: w.take(s, e) for k, w in rows.items()}
            out = {"sample_id": ids[j], **decode_rows(found, stored, rfields)}
            for f in sfields:
                a, b = int(sstart[f.name][j]), int(sstart[f.name][j + 1])
                out[f.name] = f.codec.decode({"": svals[f.name].take(a, b).reshape(tuple(shapes[f.name][j]))})
        except Exception as ex:
            raise _corrupt(path, ex) from ex
        yield out
