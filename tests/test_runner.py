"""Shard-runner contracts: fingerprint refusal, --force, lock, stale lock, failed shards."""
import json
import os
import socket
import subprocess
import sys

import pytest

from llavadi.pipeline.locks import LockedError, StageLock

from conftest import cli, status_json, tree_bytes


def ingest(run, synth, *extra, check=True, env=None):
    train, root = synth
    return cli("ingest", run, "--input", train, "--image-root", root, "--shard-size", "30", "--executor", "local",
               *extra, check=check, env=env)


def test_done_markers_record_fingerprint_counts_checksum(tmp_path, synth):
    import hashlib

    run = tmp_path / "run"
    ingest(run, synth)
    data = run / "data"
    manifest = json.loads((data / "_stage.json").read_text())
    markers = sorted((data / "_done").glob("*.json"))
    assert [m.name for m in markers] == ["00000.json", "00001.json", "00002.json", "00003.json"]
    for m in markers:
        d = json.loads(m.read_text())
        assert d["fingerprint"] == manifest["fingerprint"]
        part = data / d["data_file"]
        assert d["sha256"] == hashlib.sha256(part.read_bytes()).hexdigest()
        assert d["counts"]["in"] == 30 and d["counts"]["out"] + sum(d["counts"]["rejected"].values()) == 30
    assert (run / "config.yaml").exists()
    assert not list(data.rglob("*.tmp-*")) and not list((data / "_staging").glob("*"))


def test_rerun_skips_done_shards(tmp_path, synth):
    run = tmp_path / "run"
    ingest(run, synth)
    before = tree_bytes(run / "data")
    p = ingest(run, synth)
    assert "(0 run, 4 already done)" in p.stdout
    assert tree_bytes(run / "data") == before


def test_changed_config_is_refused_naming_the_key_and_force_redoes(tmp_path, synth):
    run = tmp_path / "run"
    ingest(run, synth)
    p = ingest(run, synth, "ingest.max_chars=40", check=False)
    assert p.returncode == 2
    assert "changed: max_chars" in p.stderr and "--force" in p.stderr
    p = ingest(run, synth, "ingest.max_chars=40", "--force")
    assert "(4 run, 0 already done)" in p.stdout
    st = status_json(run)["stages"]["data"]
    assert st["rejected_by_reason"].get("too_long", 0) > 0  # the new setting took effect
    # RUN/config.yaml now holds the new value: a relaunch without the override resumes with
    # it; going back to the old value is a change again
    assert "(0 run, 4 already done)" in ingest(run, synth).stdout
    p = ingest(run, synth, "ingest.max_chars=65536", check=False)
    assert p.returncode == 2 and "changed: max_chars" in p.stderr


def test_live_lock_refuses_second_launch(tmp_path, synth):
    run = tmp_path / "run"
    lock = StageLock(run / "data" / "_lock.json", "ingest").acquire()  # held by this (live) process
    try:
        p = ingest(run, synth, check=False)
        assert p.returncode == 2 and "already running" in p.stderr and str(os.getpid()) in p.stderr
        with pytest.raises(LockedError):
            StageLock(run / "data" / "_lock.json", "ingest").acquire()
    finally:
        lock.release()
    assert not (run / "data" / "_lock.json").exists()
    ingest(run, synth)


def test_stale_lock_of_dead_process_is_taken_over(tmp_path, synth):
    run = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "data").mkdir(parents=True)
    (run / "data" / "_lock.json").write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "proc_start": 1.0, "started_at": "then", "stage": "ingest"}))
    p = ingest(run, synth)
    assert "4 shards" in p.stdout
    assert not (run / "data" / "_lock.json").exists()


def test_lock_with_reused_pid_is_stale(tmp_path):
    # our own pid, but recorded with another start time: the pid was reused, the holder is gone
    path = tmp_path / "_lock.json"
    path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "proc_start": 12.0}))
    lk = StageLock(path, "ingest").acquire()
    assert lk.took_over["proc_start"] == 12.0
    lk.release()


def test_failed_shard_fails_alone_and_is_retried_next_launch(tmp_path, synth):
    run = tmp_path / "run"
    p = ingest(run, synth, check=False, env={"LLAVADI_FAULTS": "ingest:2:raise"})
    assert p.returncode == 1
    assert "shard 00002: InjectedFault" in p.stderr and "1 shard(s) failed" in p.stderr
    st = status_json(run)["stages"]["data"]
    assert st["shards_done"] == 3 and not st["complete"]
    done_before = {i: (run / "data" / "_done" / f"0000{i}.json").stat().st_mtime_ns for i in (0, 1, 3)}
    p = ingest(run, synth)
    assert "(1 run, 3 already done)" in p.stdout
    assert {i: (run / "data" / "_done" / f"0000{i}.json").stat().st_mtime_ns for i in (0, 1, 3)} == done_before
    ref = tmp_path / "ref"
    ingest(ref, synth)
    assert tree_bytes(run / "data") == tree_bytes(ref / "data")


def test_status_text_and_missing_run(tmp_path, synth):
    run = tmp_path / "run"
    ingest(run, synth)
    out = cli("status", run).stdout
    assert "data" in out and "4/4" in out and "complete" in out
    p = cli("status", tmp_path / "nope", check=False)
    assert p.returncode == 2 and "does not exist" in p.stderr
