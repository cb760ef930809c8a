"""SIGKILL ``llavadi ingest`` at several points, rerun the same command: the shard files are
byte-identical to an uninterrupted run; nothing duplicated or missing."""
import os
import signal
import subprocess
import sys
import time

import pytest

from llavadi.schemas.samples import iter_samples

from conftest import cli, tree_bytes


def args(run, synth, executor="local"):
    train, root = synth
    return ["ingest", run, "--input", train, "--image-root", root, "--shard-size", "10", "--executor", executor]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synth):
    run = tmp_path_factory.mktemp("ref") / "run"
    cli(*args(run, synth))
    return tree_bytes(run / "data")


def _kill_when(run, synth, cond, executor="local", env=None, timeout=120):
    # every shard sleeps 0.1 s first: with small images a 10-record shard can finish within one
    # 5-ms poll, and "killed after N shards" must land before the stage ends (it once did not)
    e = {**os.environ, "LLAVADI_FAULTS": "ingest:*:sleep0.1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "llavadi.cli", *map(str, args(run, synth, executor))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=e, start_new_session=True)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        if cond():
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started
            break
        time.sleep(0.005)
    proc.wait()
    return proc.returncode


def _n_done(run):
    d = run / "data" / "_done"
    return len(list(d.glob("*.json"))) if d.exists() else 0


def _check(run, synth, reference, executor="local"):
    cli(*args(run, synth, executor))
    got = tree_bytes(run / "data")
    assert got == reference
    ids = [r["id"] for f in sorted((run / "data").glob("part-*.parquet")) for r in iter_samples(f)]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("after_done", [0, 1, 5, 11])
def test_sigkill_after_n_shards_then_rerun_is_identical(tmp_path, synth, reference, after_done):
    run = tmp_path / "run"
    if after_done == 0:  # as soon as the stage directory appears (staging / first shard)
        rc = _kill_when(run, synth, lambda: (run / "data" / "_stage.json").exists())
    else:
        rc = _kill_when(run, synth, lambda: _n_done(run) >= after_done)
    assert rc == -signal.SIGKILL
    assert _n_done(run) < 12
    _check(run, synth, reference)


@pytest.mark.parametrize("point", ["start", "before-done"])
def test_death_between_writes_then_rerun_is_identical(tmp_path, synth, reference, point):
    # os._exit inside shard 4 at a precise point: after the data file is renamed into place but
    # before its _done marker ("before-done") is the window that must not count as done
    run = tmp_path / "run"
    p = cli(*args(run, synth), env={"LLAVADI_FAULTS": f"ingest:4:exit:{point}"}, check=False)
    assert p.returncode == 137
    assert not (run / "data" / "_done" / "00004.json").exists()
    _check(run, synth, reference)


def test_sigkill_ray_driver_then_rerun_is_identical(tmp_path, synth, reference):
    run = tmp_path / "run"
    rc = _kill_when(run, synth, lambda: _n_done(run) >= 3, executor="ray", env={"RAY_AUTH_MODE": "disabled"})
    assert rc == -signal.SIGKILL
    _check(run, synth, reference, executor="ray")
