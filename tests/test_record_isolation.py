"""One record a model call cannot take never fails a shard (issue #13 class 3): regenerate and
cache-teacher reject it with its id and the reason, and the other records of its batch go on."""
from __future__ import annotations

import json

import pytest

RECORDS = [
    {"id": "a", "conversations": [{"from": "human", "value": "Say one."}, {"from": "gpt", "value": "One."}]},
    {"id": "poison", "conversations": [{"from": "human", "value": "POISON here."}, {"from": "gpt", "value": "No."}]},
    {"id": "b", "conversations": [{"from": "human", "value": "Say two."}, {"from": "gpt", "value": "Two."},
                                  {"from": "human", "value": "Again."}, {"from": "gpt", "value": "Two."}]},
    {"id": "c", "conversations": [{"from": "human", "value": "Say three."}, {"from": "gpt", "value": "Three."}]},
]


@pytest.fixture()
def run_cfg(tmp_path, tiny_teacher):
    from llavadi.pipeline.config import load_config
    from llavadi.pipeline.runner import run_stage
    from llavadi.stages import ingest

    data = tmp_path / "in.json"
    data.write_text(json.dumps(RECORDS))
    run = tmp_path / "run"
    cfg = load_config({}, [f"ingest.inputs=[{data}]", f"ingest.image_root={tmp_path}", "run.executor=local", f"teacher.model={tiny_teacher}",
                           "regenerate.engine=hf", "regenerate.sampling.max_new_tokens=3",
                           "cache_teacher.engine=hf",
                           "cache_teacher.source=data", "cache_teacher.top_k=4", "cache_teacher.batch_size=4"])
    run_stage(ingest.STAGE, run, cfg, progress=False)
    return run, cfg


def _poisoned(fn, text_of):
    def wrapped(self, reqs, *a, **k):
        if any("POISON" in text_of(r) for r in reqs):
            raise RuntimeError("this model cannot take the poisoned record")
        return fn(self, reqs, *a, **k)
    return wrapped


def _shard(run, stage):
    done = json.loads((run / stage / "_done" / "00000.json").read_text())
    rejects = [json.loads(x) for x in (run / stage / "rejects" / "00000.jsonl").read_text().splitlines()]
    return done["counts"], rejects


def test_regenerate_rejects_the_record_the_engine_fails_on(run_cfg, monkeypatch):
    from llavadi.pipeline.runner import run_stage
    from llavadi.stages import regenerate

    run, cfg = run_cfg
    from llavadi.models.engines.generate import HFEngine

    monkeypatch.setattr(HFEngine, "generate", _poisoned(HFEngine.generate, lambda r: r.prompt))
    run_stage(regenerate.STAGE, run, cfg, progress=False)
    counts, rejects = _shard(run, "regenerate")
    assert counts["in"] == 4 and counts["out"] == 3 and counts["rejected"] == {"model_error": 1}
    assert [(r["id"], r["reason"]) for r in rejects] == [("poison", "model_error")]
    assert "cannot take the poisoned record" in rejects[0]["detail"]


def test_cache_teacher_rejects_the_record_the_teacher_fails_on(run_cfg, monkeypatch):
    from llavadi.pipeline.runner import run_stage
    from llavadi.schemas.teacher_cache import CacheReader
    from llavadi.stages import cache_teacher

    run, cfg = run_cfg
    from llavadi.models.engines.forcing import HFTeacherForcer

    monkeypatch.setattr(HFTeacherForcer, "forward", _poisoned(HFTeacherForcer.forward, lambda r: r.prompt))
    run_stage(cache_teacher.STAGE, run, cfg, progress=False)
    counts, rejects = _shard(run, "cache_teacher")
    assert counts["in"] == 4 and counts["out"] == 3 and counts["rejected"] == {"model_error": 1}
    assert [(r["id"], r["reason"]) for r in rejects] == [("poison", "model_error")]
    rd = CacheReader(run / "cache_teacher")
    assert [s["sample_id"] for e in rd.shards for s in rd.iter_shard(e)] == ["a", "b", "c"]
