"""``llavadi demo``: builds the tiny teacher/student and synthetic visual-QA data, ingests it
and prints ``llavadi status``. Later stages (regenerate, cache-teacher, train-student, eval)
join as they land. Reruns reuse what exists (models, data, done shards)."""
from __future__ import annotations

import json
from pathlib import Path

from ...pipeline import status as status_mod
from ...pipeline.runner import run_stage
from ...pipeline.session import resolve


def run_demo(root: Path | str, *, quick: bool = False, executor: str = "ray") -> dict:
    from . import synthetic_vqa, tiny_models
    from ..ingest import STAGE as INGEST

    root = Path(root)
    n_train = 400 if quick else 2000
    models = root / "models"
    for name, spec in (("teacher", tiny_models.TEACHER), ("student", tiny_models.STUDENT)):
        if not (models / name / "config.json").exists():
            print(f"[demo] building tiny {name} in {models / name}")
            tiny_models.build_tiny_llava(models / name, spec)
    data = root / "synthetic"
    train_json = data / "train.json"
    if not train_json.exists():
        print(f"[demo] generating {n_train} synthetic visual-QA conversations in {data}")
        synthetic_vqa.generate(data, n_train, seed=0, split="train")
    run = root / "run"
    cfg = resolve(run, None, [f"run.executor={executor}", "ingest.inputs=" + json.dumps([str(train_json.resolve())]),
                              "ingest.image_root=" + json.dumps(str(data.resolve())), "ingest.shard_size=500"])
    rep = run_stage(INGEST, run, cfg, progress=True)
    print(f"[demo] ingest: {rep.shards_total} shards ({rep.shards_run} run, {rep.shards_skipped} reused)")
    st = status_mod.collect(run)
    print(status_mod.render(st))
    return st
