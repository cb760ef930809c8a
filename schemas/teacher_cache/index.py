"""``index.json`` and the public reader.

``index.json`` (written atomically by :func:`write_index`)::

    {"schema_version": 2,
     "meta": {<CacheSpec fields: hidden_size, vocab_size, positions, hidden_layers, hidden_dtype, logits,
               top_k, logprob_dtype, samples, sample_temperature, logit_stats, affinity, image_dedup, store>,
              "fields": [{"name", "axis", "codec", "doc"}, ...],        # what the cache holds
              "teacher": {"model", "weights_sha256"}, "tokenizer_sha256", ..., "image_rows": {"images", "bytes"}},
     "shards": [{"shard": 0, "file": "part-00000.zarr", "n_samples": ..., "n_rows": ...,
                 "sha256": <pipeline.atomic.sha256_path of the shard>}, ...]}

A cache of schema version 1 (before rows carried positions and kinds) is refused with the command that
rebuilds it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from ...pipeline import atomic
from .fields import CacheSpec
from .image_rows import ImageRowStore
from .wds_store import iter_tar
from .writer import SCHEMA_VERSION, CacheCorruptError
from .zarr_store import DEFAULT_BLOCK_ROWS, iter_zarr

INDEX_NAME = "index.json"
SHARD_KEYS = ("shard", "file", "n_samples", "n_rows", "sha256")


class CacheVersionError(ValueError):
    """The cache was written by an older llavadi in a format this one does not read."""


def fields_meta(spec: CacheSpec) -> list[dict]:
    """The declared fields, as ``index.json`` lists them."""
    return [{"name": f.name, "axis": f.axis, "codec": f.codec.kind, "doc": f.doc} for f in spec.fields()]


def write_index(cache_dir, meta: dict, shards: list[dict]) -> Path:
    """Atomically write ``cache_dir/index.json``. ``meta`` must hold the :class:`CacheSpec` fields (the
    declared ``fields`` list is added); each shard entry the keys ``shard, file, n_samples, n_rows,
    sha256``. Returns the path."""
    spec = CacheSpec.from_meta(meta)
    rows = []
    for s in shards:
        missing = [k for k in SHARD_KEYS if k not in s]
        if missing:
            raise ValueError(f"shard entry {s} lacks {missing}")
        rows.append({k: s[k] for k in SHARD_KEYS} | {k: v for k, v in s.items() if k not in SHARD_KEYS})
    if len({r["shard"] for r in rows}) != len(rows):
        raise ValueError("duplicate shard numbers in index")
    final = Path(cache_dir) / INDEX_NAME
    atomic.write_json(final, {"schema_version": SCHEMA_VERSION, "meta": {**meta, "fields": fields_meta(spec)},
                              "shards": rows})
    return final


def read_index(cache_dir) -> dict:
    """``{"schema_version", "meta", "shards"}`` from ``cache_dir/index.json``. Raises
    :class:`CacheVersionError` for another schema version, naming the command that rebuilds it."""
    p = Path(cache_dir) / INDEX_NAME
    idx = json.loads(p.read_text())
    v = idx.get("schema_version")
    if v != SCHEMA_VERSION:
        run = Path(cache_dir).resolve().parent
        raise CacheVersionError(
            f"{p}: teacher cache schema version {v!r}; this llavadi reads version {SCHEMA_VERSION} (rows with "
            f"positions and kinds, declared fields). Rebuild the cache: `llavadi cache-teacher {run} --force`")
    return idx


def iter_cache_shard(path, spec_or_None: Optional[CacheSpec] = None, expected_sha256: Optional[str] = None, *,
                     block_rows: int = DEFAULT_BLOCK_ROWS) -> Iterator[dict]:
    """The samples of one shard in add order, with the shard's own rows only (image rows kept in the
    image-row store are merged by :class:`CacheReader`). The store is told by the path (directory →
    Zarr, file → tar). Raises :class:`CacheCorruptError` naming the shard on a checksum mismatch or any
    decode error, ``ValueError`` when ``spec_or_None`` disagrees with the shard."""
    path = Path(path)
    if not path.exists():
        raise CacheCorruptError(f"teacher cache shard {path} is missing")
    if expected_sha256 is not None:
        got = atomic.sha256_path(path)
        if got != expected_sha256:
            raise CacheCorruptError(f"teacher cache shard {path}: sha256 {got} != expected {expected_sha256}")
    if path.is_dir():
        return iter_zarr(path, spec_or_None, block_rows)
    return iter_tar(path, spec_or_None)


def merge_image_rows(sample: dict, image: dict, row_names: list[str]) -> dict:
    """``sample`` with the rows of ``image`` put back in position order (both sorted by position)."""
    pos = np.concatenate([image["position"], sample["position"]])
    order = np.argsort(pos, kind="stable")
    for k in row_names:
        sample[k] = np.concatenate([image[k], sample[k]])[order]
    return sample


class CacheReader:
    """Iterate a cache directory's samples shard by shard, in index order or in the order of ``shards``
    (a list of the index's ``shard`` numbers). Each sample is a dict with ``sample_id``, every field of
    ``spec.fields()`` under its name (row fields ``[T, …]`` on the sample's rows in position order,
    including its image rows wherever they are stored) — ``position`` and ``kind`` among them. With
    ``verify`` each shard's sha256 is checked against the index before it is read, and its sample/row
    counts after."""

    def __init__(self, cache_dir, verify: bool = True, shards: Optional[Iterable[int]] = None,
                 block_rows: int = DEFAULT_BLOCK_ROWS):
        self.cache_dir = Path(cache_dir)
        self.index = read_index(self.cache_dir)
        self.meta: dict = self.index["meta"]
        self.spec = CacheSpec.from_meta(self.meta)
        self.verify, self.block_rows = verify, block_rows
        self.images = ImageRowStore(self.cache_dir, self.spec) if self.spec.image_rows_separate else None
        self._row_names = [f.name for f in self.spec.row_fields()]
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
    def n_rows(self) -> int:
        """Rows held in the shards (image rows stored once per image not included)."""
        return sum(int(s["n_rows"]) for s in self.shards)

    def __len__(self) -> int:
        return self.n_samples

    def iter_shard(self, entry: dict) -> Iterator[dict]:
        path = self.cache_dir / entry["file"]
        n = t = 0
        for sample in iter_cache_shard(path, self.spec, entry["sha256"] if self.verify else None,
                                       block_rows=self.block_rows):
            n += 1
            t += len(sample["position"])
            if self.images is not None:
                key = sample["image_key"]
                if key.size:
                    sample = merge_image_rows(sample, self.images.read(key.tobytes()), self._row_names)
            yield sample
        if n != entry["n_samples"] or t != entry["n_rows"]:
            raise CacheCorruptError(f"teacher cache shard {path}: read {n} samples / {t} rows, index says "
                                    f"{entry['n_samples']} / {entry['n_rows']}")

    def __iter__(self) -> Iterator[dict]:
        for entry in self.shards:
            yield from self.iter_shard(entry)
