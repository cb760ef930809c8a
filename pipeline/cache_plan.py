"""The teacher cache a config asks for, before any model loads: ``cache_teacher.*`` + the teacher's output
head shape (read from the safetensors headers) + its family's attention over image rows → a
``schemas.teacher_cache.CacheSpec``. Used by the stage, its size estimate and ``status``."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from .config import LlavadiConfig

_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                   "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class EstimateUnavailable(RuntimeError):
    """Nothing to estimate from yet (no source shards, no teacher); the message says why."""


def head_size(model_dir: str | Path) -> dict:
    """``{"vocab_size", "hidden_size", "dtype", "bytes"}`` of the output projection that
    cache-teacher copies into ``teacher_head.safetensors`` (``lm_head.weight`` [+ bias], else the tied
    ``embed_tokens.weight``, as ``models.engines.common.output_head`` picks it), read from the
    safetensors headers only. ``bytes`` = tensor bytes + the file's header (its JSON ≈ 200 B)."""
    from ..models.engines.common import safetensors_files

    d = Path(model_dir)
    headers = {}
    for f in safetensors_files(d):
        with open(d / f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            headers[f] = json.loads(fh.read(n))
    found = {}
    for suffix, name in (("lm_head.weight", "weight"), ("lm_head.bias", "bias")):
        for h in headers.values():
            key = next((k for k in h if k != "__metadata__" and k.endswith(suffix)), None)
            if key:
                found[name] = h[key]
                break
    if "weight" not in found:  # tied embeddings
        for h in headers.values():
            key = next((k for k in h if k != "__metadata__" and k.endswith("embed_tokens.weight")), None)
            if key:
                found["weight"] = h[key]
                break
    if "weight" not in found:
        raise EstimateUnavailable(f"no lm_head / embed_tokens weight in {d}'s safetensors")
    V, H = (int(x) for x in found["weight"]["shape"])
    nbytes = sum(math.prod(t["shape"]) * _ST_DTYPE_BYTES.get(t["dtype"], 4) for t in found.values())
    return {"vocab_size": V, "hidden_size": H, "dtype": found["weight"]["dtype"], "bytes": int(nbytes) + 8 + 256}


def cache_spec(cfg: LlavadiConfig, head: dict | None = None):
    """The ``CacheSpec`` of ``cfg``'s cache: its ``cache_teacher`` keys, the teacher head's V × H
    (``head``: :func:`head_size`, read when not given) and whether the teacher's family lets image rows be
    stored once per image (``models.base.Family.causal_image_rows``)."""
    from ..models import family_of
    from ..schemas.teacher_cache import CacheSpec

    c = cfg.cache_teacher
    head = head or head_size(cfg.teacher.model)
    return CacheSpec(hidden_size=head["hidden_size"], vocab_size=head["vocab_size"], positions=c.positions,
                     hidden_layers=tuple(c.hidden_layers), hidden_dtype=c.hidden_dtype, logits=c.logits,
                     top_k=c.top_k, logprob_dtype=c.logprob_dtype, samples=c.samples,
                     sample_temperature=c.sample_temperature, logit_stats=True, affinity=c.affinity,
                     image_dedup=family_of(cfg.teacher.model).causal_image_rows, store=c.store)
