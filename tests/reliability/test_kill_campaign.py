"""Each stage SIGKILLed at 10 random moments (seeded), relaunched each time, then run to the end:
the outputs equal an uninterrupted run's — shard files byte for byte (data, rejects, done
markers with their checksums), and for train-student the metrics and the final weights."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from campaign import Campaign, count_files, count_lines  # noqa: E402
from conftest import cli, tree_bytes  # noqa: E402

pytestmark = pytest.mark.reliability

SHARD = 8  # 120 synthetic records -> 15 shards
REGEN = ["--engine", "hf", "regenerate.sampling.temperature=1.0", "regenerate.sampling.max_new_tokens=8"]
CACHE = ["--engine", "hf", "cache_teacher.source=regenerate", "cache_teacher.top_k=8"]
TRAIN = ["train_student.batch_size=8", "train_student.micro_batch_size=4", "train_student.lr=1e-3",
         "train_student.shuffle_buffer=16", "train_student.save_every_steps=2", "train_student.keep_checkpoints=3",
         "train_student.max_steps=10"]


def stage_args(stage: str, run: Path, env: dict) -> list:
    if stage == "ingest":
        return ["ingest", run, "--input", env["train"], "--image-root", env["root"], "--shard-size", SHARD,
                "--executor", "local"]
    if stage == "regenerate":
        return ["regenerate", run, "--teacher", env["teacher"], "--executor", "local", *REGEN]
    if stage == "cache-teacher":
        return ["cache-teacher", run, "--teacher", env["teacher"], "--executor", "local", *CACHE]
    return ["train-student", run, "--student", env["student"], *TRAIN]


DIRS = {"ingest": "data", "regenerate": "regenerate", "cache-teacher": "cache_teacher", "train-student": "train_student"}
ORDER = list(DIRS)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, synth, tiny_teacher):
    """The uninterrupted reference: every stage run once, each in its own copy of the run dir,
    with its wall time."""
    from llavadi.stages.demo.tiny_models import STUDENT, build_tiny_llava

    root = tmp_path_factory.mktemp("campaign")
    env = {"train": synth[0], "root": synth[1], "teacher": tiny_teacher,
           "student": build_tiny_llava(root / "student", STUDENT)}
    refs, seconds = {}, {}
    prev = None
    for stage in ORDER:
        run = root / f"ref-{stage}"
        if prev is not None:
            shutil.copytree(prev, run)
        t0 = time.time()
        cli(*stage_args(stage, run, env), timeout=900)
        seconds[stage] = time.time() - t0
        refs[stage] = run
        prev = run
    return env, refs, seconds


def final_state(run: Path) -> dict:
    from safetensors.torch import load_file

    sd = run / "train_student"
    ckpt = sd / "checkpoints" / json.loads((sd / "_stage.json").read_text())["final_checkpoint"]
    metrics = [{k: r[k] for k in ("step", "loss", "ce", "kd", "feat", "lr", "tokens")}
               for r in map(json.loads, (sd / "metrics.jsonl").read_text().splitlines())]
    return {"weights": load_file(ckpt / "model.safetensors"),
            "projector": torch.load(ckpt / "training_state.pt", weights_only=False)["projector"],
            "metrics": metrics, "step": ckpt.name}


@pytest.mark.parametrize("stage,seed", [("ingest", 101), ("regenerate", 202), ("cache-teacher", 303),
                                        ("train-student", 404)])
def test_ten_random_sigkills_then_identical_outputs(pipeline, tmp_path, stage, seed):
    env, refs, seconds = pipeline
    i = ORDER.index(stage)
    run = tmp_path / "run"
    if i > 0:
        shutil.copytree(refs[ORDER[i - 1]], run)
    d = run / DIRS[stage]
    if stage == "train-student":
        progress, units = count_lines(d / "metrics.jsonl"), 10
    else:
        progress = count_files(d / "_done", "*.json")
        units = len(list((refs[stage] / DIRS[stage] / "_done").glob("*.json")))
    args = stage_args(stage, run, env)
    c = Campaign(args, progress, units=units, unit_s=seconds[stage] / units, seed=seed)
    log = c.run()
    assert c.killed >= 10, log  # ten kills really landed before the stage could finish
    cli(*args, timeout=900)  # the same command, to the end
    if stage == "train-student":
        got, ref = final_state(run), final_state(refs[stage])
        assert got["step"] == ref["step"] and got["metrics"] == ref["metrics"]
        assert got["weights"].keys() == ref["weights"].keys()
        assert all(torch.equal(got["weights"][k], ref["weights"][k]) for k in ref["weights"])
        assert all(torch.equal(got["projector"][k], ref["projector"][k]) for k in ref["projector"])
    else:
        got, ref = tree_bytes(d), tree_bytes(refs[stage] / DIRS[stage])
        assert sorted(got) == sorted(ref)
        assert [k for k in ref if got[k] != ref[k]] == [], log
