"""``llavadi sweep`` (issue #21): 3 arms × 2 seeds from one tiny cache, one after another and as Ray tasks;
every arm × seed trained and scored; a SIGKILL mid-sweep and the same command again give the uninterrupted
sweep's results and students, retraining only what was unfinished; bad arms refused before any training."""
from __future__ import annotations

import json
import shutil
import signal

import pytest

from conftest import cli, kill_when

ARMS = """\
base: {batch_size: 4, micro_batch_size: 4, max_steps: 3, lr: 1.0e-3, save_every_steps: 1, keep_checkpoints: 1}
arms:
  ce: {kd_weight: 0, feature_weight: 0}
  kd-rkl: {feature_weight: 0, kd: {kind: rkl}}
  llavadi: {}
"""


def _copy(cached_run, tmp_path, name):
    run = tmp_path / name
    shutil.copytree(cached_run[0], run)
    arms = tmp_path / "arms.yaml"
    arms.write_text(ARMS.replace("base: {", f"base: {{student: {json.dumps(str(cached_run[1]))}, "))
    return run, arms


def _rows(run):
    res = json.loads((run / "sweep" / "results.json").read_text())
    return [{k: v for k, v in r.items() if k not in ("train_seconds", "final_checkpoint")} for r in res["results"]]


def _weights(run, arm, seed):
    ckpt = sorted((run / "sweep" / arm / f"seed{seed}" / "checkpoints").glob("step_*"))[-1]
    return (ckpt / "model.safetensors").read_bytes()


def test_sweep_trains_every_arm_and_seed_and_a_killed_sweep_resumes_to_the_same_results(cached_run, tmp_path):
    a, arms = _copy(cached_run, tmp_path, "a")
    p = cli("sweep", a, "--arms", arms, "--seeds", "2", "--cache", a / "cache_teacher", "--executor", "local",
            timeout=900)
    rows = _rows(a)
    assert [(r["arm"], r["seed"]) for r in rows] == [(x, k) for x in ("ce", "kd-rkl", "llavadi") for k in (0, 1)]
    assert all(r["steps"] == 3 and r["kl_to_teacher"] > 0 and r["perplexity"] > 1 for r in rows)
    for arm in ("ce", "kd-rkl", "llavadi"):  # the seed is the sweep's: another shuffle order, another student
        assert _weights(a, arm, 0) != _weights(a, arm, 1)
        cfg = (a / "sweep" / arm / "seed1" / "config.yaml").read_text()
        assert "seed: 1" in cfg
    assert _weights(a, "ce", 0) != _weights(a, "llavadi", 0)
    assert "kd_weight: 0.0" in (a / "sweep" / "ce" / "seed0" / "config.yaml").read_text()
    report = (a / "sweep" / "report.md").read_text()
    assert all(f"| {arm} |" in report for arm in ("ce", "kd-rkl", "llavadi")) and (a / "sweep" / "report.png").exists()
    assert "| llavadi |" in p.stdout

    b, _ = _copy(cached_run, tmp_path, "b")
    args = ["sweep", b, "--arms", arms, "--seeds", "2", "--cache", b / "cache_teacher", "--executor", "local"]
    mid = b / "sweep" / "ce" / "seed1" / "metrics.jsonl"  # the second of six: a finished arm-seed before it
    assert kill_when(args, lambda: mid.exists() and mid.read_text().count("\n") >= 1) == -signal.SIGKILL
    assert not (b / "sweep" / "results.json").exists()
    first = {arm: (b / "sweep" / arm / "seed0" / "_stage.json").stat().st_mtime_ns for arm in ("ce",)}
    cli(*args, timeout=900)
    assert _rows(b) == rows
    for arm in ("ce", "kd-rkl", "llavadi"):
        for k in (0, 1):
            assert _weights(b, arm, k) == _weights(a, arm, k), (arm, k)
    for arm, t in first.items():  # finished before the kill: not trained again
        assert (b / "sweep" / arm / "seed0" / "_stage.json").stat().st_mtime_ns == t

    # as Ray tasks (two at a time here): the same arms trained and scored; equal up to float summation order (a
    # Ray worker runs torch on one thread: other rounding in the student's updates)
    c, _ = _copy(cached_run, tmp_path, "c")
    one = tmp_path / "one.yaml"
    one.write_text(arms.read_text().split("  kd-rkl")[0])
    cli("sweep", c, "--arms", one, "--seeds", "2", "--cache", c / "cache_teacher", "--executor", "ray", timeout=900)
    for r, want in zip(_rows(c), rows[:2]):
        assert r.keys() == want.keys() and r["kl_to_teacher"] == pytest.approx(want["kl_to_teacher"], rel=1e-5)
    assert (c / "sweep" / "ce" / "seed1" / "config.yaml").exists() and not (c / "sweep" / "kd-rkl").exists()


def test_bad_arms_are_refused_before_any_training(cached_run, tmp_path):
    run, _ = _copy(cached_run, tmp_path, "run")
    bad = tmp_path / "bad.yaml"
    for text, want in (("arms: {}\n", "has no `arms:`"),
                       ("arms: {ok: {}, typo: {kd_wieght: 0}}\n", "arm 'typo'"),
                       ("arms: {x: {kd: {kind: kl}}}\n", "kd.kind"),
                       ("arms: {'a/b': {}}\n", "plain directory names")):
        bad.write_text(text)
        p = cli("sweep", run, "--arms", bad, "--executor", "local", check=False)
        assert p.returncode == 2 and want in p.stderr, (text, p.stderr[-600:])
    assert not (run / "sweep").exists()
