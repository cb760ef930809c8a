"""Teacher cache (design §5): the on-disk contract between the teacher pass and student training.

A cache directory (``RUN/cache_teacher``) holds ``index.json`` (:mod:`.index`), one file/directory per
shard — ``part-NNNNN.zarr`` (:mod:`.zarr_store`) or ``part-NNNNN.tar`` (:mod:`.wds_store`) — written
from input shard ``NNNNN``, the image-row store ``image_rows/`` (:mod:`.image_rows`, ``positions: all``
on causal families) and ``teacher_head.safetensors`` (the output projection, for the exact
full-vocabulary path). What a cache holds is declared once in :mod:`.fields` (:meth:`CacheSpec.fields`):
rows = positions of the teacher-forced sequence with their kind (``image`` / ``prompt`` / ``answer``) on a
flat row axis (sample ``j``'s rows are ``offsets[j]:offsets[j+1]``), and per-sample fields. The README's
format table is :func:`format_table` of these declarations.

Public API: :class:`CacheReader` (iterate samples: every field under its name, ``position`` and ``kind``
per row, image rows back in every sample), :class:`CacheShardWriter`, :class:`CacheSpec`,
:func:`write_index` / :func:`read_index`, :func:`iter_cache_shard`, :func:`decode_sample`.
"""
from __future__ import annotations

from .blob import decode_blob_raw, encode_blob
from .fields import (HIDDEN_DTYPES, KIND_ANSWER, KIND_IMAGE, KIND_PROMPT, KINDS, LOGITS, LOGPROB_DTYPES, POSITIONS,
                     STORES, CacheSpec, Codec, Field, bf16_bits, bf16_to_float32, hidden_field_name, id_bits,
                     int8_quantise, pack_ids, unpack_ids)
from .image_rows import IMAGE_DIR, ImageRowStore, image_key
from .index import INDEX_NAME, CacheReader, CacheVersionError, iter_cache_shard, read_index, write_index
from .wds_store import BLOB_EXT, TRAILER_NAME, decode_sample
from .writer import DEFAULT_CHUNK_ROWS, SCHEMA_VERSION, CacheCorruptError, CacheShardWriter
from .zarr_store import ATTR_KEY, DEFAULT_BLOCK_ROWS

__all__ = [
    "ATTR_KEY", "BLOB_EXT", "DEFAULT_BLOCK_ROWS", "DEFAULT_CHUNK_ROWS", "HIDDEN_DTYPES", "IMAGE_DIR", "INDEX_NAME",
    "KINDS", "KIND_ANSWER", "KIND_IMAGE", "KIND_PROMPT", "LOGITS", "LOGPROB_DTYPES", "POSITIONS", "SCHEMA_VERSION",
    "STORES", "TRAILER_NAME", "CacheCorruptError", "CacheReader", "CacheShardWriter", "CacheSpec",
    "CacheVersionError", "Codec", "Field", "ImageRowStore", "bf16_bits", "bf16_to_float32", "decode_blob_raw",
    "decode_sample", "encode_blob", "format_table", "hidden_field_name", "id_bits", "image_key", "int8_quantise",
    "iter_cache_shard", "pack_ids", "read_index", "unpack_ids", "write_index",
]


def format_table() -> str:
    """The README's table of every field a cache can hold (Markdown), from the declarations of two specs
    that between them switch every field on (layer 12 stands for any ``hidden@L``)."""
    specs = [CacheSpec(hidden_size=1, vocab_size=70000, hidden_layers=(-1, 12), logits="topk", affinity=True,
                       positions="all"),
             CacheSpec(hidden_size=1, vocab_size=70000, hidden_layers=(), logits="sampled", sample_temperature=0.8,
                       positions="all")]
    how = {"ids": "uint16 when V ≤ 65 536, else ⌈log₂V⌉-bit ids packed per row (uint8)",
           "float16": "float16", "hidden": "`hidden_dtype`: float16 / bfloat16 (uint16 bits) / int8 + `<name>.scale` "
                                            "[T] float32", "logprobs": "`logprob_dtype`: float32 / float16"}
    lines = ["| field | axis | stored as | meaning |", "|---|---|---|---|",
             "| `offsets`, `sample_id` | per sample | int64 [n+1]; utf-8 bytes + int64 offsets | sample j's rows are "
             "`offsets[j]:offsets[j+1]`; its id joins the source sample shard |"]
    seen = set()
    for spec in specs:
        for f in spec.fields():
            name = "hidden@L" if f.name.startswith("hidden@") else f.name
            if name in seen:
                continue
            seen.add(name)
            kind = ("hidden" if f.name.startswith("hidden") else
                    "logprobs" if f.name.endswith("logprobs") else f.codec.kind)
            stored = how.get(kind) or ", ".join(p.dtype.name for _, p in f.stored())
            doc = f.doc.replace("output_hidden_states[12]", "output_hidden_states[L]")
            lines.append(f"| `{name}` | {'per row' if f.axis == 'row' else 'per sample'} | {stored} | {doc} |")
    return "\n".join(lines)
