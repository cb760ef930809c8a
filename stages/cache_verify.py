"""``llavadi cache-teacher RUN --verify N``: recompute N random cached samples with the teacher (HF engine)
and report, per field the cache holds, how far the cache is from a fresh teacher pass."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from ..models.engines.common import max_model_len
from ..pipeline.config import LlavadiConfig
from ..pipeline.rundir import StageDir
from ..pipeline.stage import StageContext
from ..schemas.samples import iter_samples
from .cache_teacher import STAGE, sample_fields


def verify_cache(run_dir: Path | str, cfg: LlavadiConfig, n: int, seed: int = 0) -> dict:
    """``{"samples_checked", "rows_equal" (positions, kinds and next tokens), "<field>_max_abs"`` for every
    float field, ``topk_id_agreement`` (smallest mean overlap of the top-k sets), ``sampled_id_agreement``
    (fraction of equal draws)}``. Raises ``StageError`` when the cache is missing."""
    from ..models.engines.forcing import HFTeacherForcer
    from ..pipeline.runner import StageError
    from ..schemas.teacher_cache import CacheReader

    run_dir = Path(run_dir)
    sd = StageDir(run_dir, STAGE.dir_name)
    if not (sd.path / "index.json").exists():
        raise StageError(f"no teacher cache in {sd.path}: run `llavadi cache-teacher {run_dir}` first")
    reader = CacheReader(sd.path)
    src = StageDir(run_dir, reader.meta.get("source", cfg.cache_teacher.source))
    ids = [s["sample_id"] for s in reader]  # also verifies every shard's checksum
    pick = set(random.Random(seed).sample(ids, min(n, len(ids))))
    forcer = HFTeacherForcer(cfg.teacher, reader.spec, int(reader.meta.get("sample_seed", 0)))
    limit = max_model_len(cfg.teacher)
    ctx = StageContext(run_dir=run_dir, stage=sd, cfg=cfg, fingerprint="")
    rows = {}
    for i in src.done_indices():
        for row in iter_samples(src.data_file(i)):
            if row["id"] in pick:
                rows[row["id"]] = row
    err: dict = {"rows_equal": True}
    agree, sampled = [], []
    for s in CacheReader(sd.path, verify=False):
        if s["sample_id"] not in pick:
            continue
        p = STAGE.prepare(ctx, forcer, rows[s["sample_id"]], limit)
        fresh, sample = sample_fields(reader.spec, p, forcer.score([p.req])[0])
        fresh.update(sample)
        err["rows_equal"] &= (fresh["position"].tolist() == s["position"].tolist()
                              and fresh["kind"].tolist() == s["kind"].tolist()
                              and fresh["token_ids"].tolist() == s["token_ids"].tolist())
        for f in reader.spec.fields():
            a, b = fresh.get(f.name), s[f.name]
            if a is None or f.name in ("position", "kind", "token_ids", "image_key") or np.size(b) == 0:
                continue
            a = np.asarray(a)
            if f.name == "topk_ids":
                agree.append(float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a.tolist(), b.tolist())])))
            elif f.name == "sampled_ids":
                sampled.append(float(np.mean(a == b)))
            elif a.shape == b.shape:
                key = f"{f.name}_max_abs"
                err[key] = max(err.get(key, 0.0), float(np.abs(a - b).max()))
            else:
                err["rows_equal"] = False
    if agree:
        err["topk_id_agreement"] = min(agree)
    if sampled:
        err["sampled_id_agreement"] = min(sampled)
    return {"samples_checked": len(pick), "hidden_dtype": reader.spec.hidden_dtype,
            "logprob_dtype": reader.spec.logprob_dtype, **err}
