"""Each stage SIGKILLed at 10 random moments (seeded), relaunched each time, then run to the end:
the outputs equal an uninterrupted run's — shard files byte for byte (data, rejects, done
markers with their checksums), and for train-student the metrics and the final weights."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from campaign import Campaign, count_files, kill_window, timeline, unit_seconds  # noqa: E402
from conftest import cli, tree_bytes  # noqa: E402

pytestmark = pytest.mark.reliability

SHARD = 8  # 120 synthetic records -> 15 shards
REGEN = ["--engine", "hf", "regenerate.sampling.temperature=1.0", "regenerate.sampling.max_new_tokens=8"]
CACHE = ["--engine", "hf", "cache_teacher.source=regenerate", "cache_teacher.top_k=8"]
TRAIN = ["train_student.batch_size=8", "train_student.micro_batch_size=4", "train_student.lr=1e-3",
         "train_student.shuffle_buffer=16", "train_student.save_every_steps=2", "train_student.keep_checkpoints=3",
         "train_student.max_steps=16"]


def stage_args(stage: str, run: Path, env: dict, big: bool = False) -> list:
    if stage == "ingest":
        if big:  # the campaign on ingest itself: shards of ~0.1 s, so kills can land inside them
            return ["ingest", run, "--input", env["big"], "--image-root", env["big_root"], "--shard-size", 60,
                    "--executor", "local"]
        return ["ingest", run, "--input", env["train"], "--image-root", env["root"], "--shard-size", SHARD,
                "--executor", "local"]
    if stage == "regenerate":
        return ["regenerate", run, "--teacher", env["teacher"], "--executor", "local", *REGEN]
    if stage == "cache-teacher":
        return ["cache-teacher", run, "--teacher", env["teacher"], "--executor", "local", *CACHE]
    return ["train-student", run, "--student", env["student"], *TRAIN]


# ingest does ~20 ms of work per shard here, too little for kills to land inside shards: the
# campaign stretches the two windows that matter (before a shard's work, and between its data
# file's rename and its done marker) with sleeps; the bytes written are the same.
SLOW = {"ingest": {"LLAVADI_FAULTS": "ingest:*:sleep0.05:start,ingest:*:sleep0.05:before-done"}}

DIRS = {"ingest": "data", "regenerate": "regenerate", "cache-teacher": "cache_teacher", "train-student": "train_student"}
ORDER = list(DIRS)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, synth, tiny_teacher):
    """The uninterrupted reference: every stage run once, each in its own copy of the run dir,
    with its wall time."""
    from llavadi.stages.demo.synthetic_vqa import generate
    from llavadi.stages.demo.tiny_models import STUDENT, build_tiny_llava

    root = tmp_path_factory.mktemp("campaign")
    env = {"train": synth[0], "root": synth[1], "teacher": tiny_teacher,
           "student": build_tiny_llava(root / "student", STUDENT),
           "big": generate(root / "big", 1200, seed=5), "big_root": root / "big"}
    refs, times = {}, {}
    prev = None
    for stage in ORDER:
        run = root / f"ref-{stage}"
        if prev is not None:
            shutil.copytree(prev, run)
        times[stage] = timeline(stage_args(stage, run, env), run / DIRS[stage] / "_lock.json", progress_of(stage, run))
        refs[stage] = run
        prev = run
    run = root / "ref-ingest-big"
    times["ingest-big"] = timeline(stage_args("ingest", run, env, big=True), run / "data" / "_lock.json",
                                   progress_of("ingest", run), env=SLOW["ingest"])
    refs["ingest-big"] = run
    return env, refs, times


def progress_of(stage: str, run: Path):
    """Units of work kept: done shards, or the step of the newest checkpoint."""
    d = run / DIRS[stage]
    if stage != "train-student":
        return count_files(d / "_done", "*.json")

    def step() -> int:
        steps = [int(p.name.split("_")[1]) for p in (d / "checkpoints").glob("step_*") if p.name[5:].isdigit()]
        return max(steps, default=0)
    return step


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
    env, refs, times = pipeline
    i = ORDER.index(stage)
    run = tmp_path / "run"
    if i > 0:
        shutil.copytree(refs[ORDER[i - 1]], run)
    d = run / DIRS[stage]
    args = stage_args(stage, run, env, big=stage == "ingest")
    ref_key = "ingest-big" if stage == "ingest" else stage
    # alternately a random delay after taking the stage lock (up to the reference run's time to
    # its first unit of work) and a random moment inside the unit after one this launch kept:
    # ten kills spread over start-up and the stage's work
    t = times[ref_key]
    c = Campaign(args, d / "_lock.json", progress_of(stage, run), window_s=kill_window(t), unit_s=unit_seconds(t),
                 seed=seed, env=SLOW.get(stage, {}))
    log = c.run()
    assert c.killed >= 10, log  # ten kills really landed before the stage could finish
    assert c.killed_mid_work >= 5, log  # half of them inside the stage's work, after a kept unit
    cli(*args, timeout=900)  # the same command, to the end
    if stage == "train-student":
        got, ref = final_state(run), final_state(refs[stage])
        assert got["step"] == ref["step"] and got["metrics"] == ref["metrics"]
        assert got["weights"].keys() == ref["weights"].keys()
        assert all(torch.equal(got["weights"][k], ref["weights"][k]) for k in ref["weights"])
        assert all(torch.equal(got["projector"][k], ref["projector"][k]) for k in ref["projector"])
    else:
        got, ref = tree_bytes(d), tree_bytes(refs[ref_key] / DIRS[stage])
        assert sorted(got) == sorted(ref)
        assert [k for k in ref if got[k] != ref[k]] == [], log
