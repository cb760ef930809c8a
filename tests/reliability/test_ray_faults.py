"""Ray failure modes: a worker killed from outside mid-shard; a two-node cluster losing a node
mid-stage; the whole cluster torn down mid-stage and a new one resuming from the done markers.
Each run must end with exactly the bytes of an uninterrupted local run."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from campaign import launch  # noqa: E402
from conftest import cli, tree_bytes  # noqa: E402

pytestmark = pytest.mark.reliability

RAY = {"RAY_AUTH_MODE": "disabled"}
SHARD = 8  # 120 records -> 15 shards


def ingest_args(run, synth, *extra):
    train, root = synth
    return ["ingest", run, "--input", train, "--image-root", root, "--shard-size", SHARD, *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synth):
    run = tmp_path_factory.mktemp("ray-ref") / "run"
    cli(*ingest_args(run, synth, "--executor", "local"))
    return tree_bytes(run / "data")


def n_done(run: Path) -> int:
    d = run / "data" / "_done"
    return len(list(d.glob("*.json"))) if d.exists() else 0


def wait_for(cond, proc=None, timeout=300.0, what="condition"):
    t0 = time.time()
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the stage exited {proc.returncode} before {what}:\n{proc.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def finish(proc, timeout=600) -> str:
    try:
        _, err = proc.communicate(timeout=timeout)
    except Exception:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, err[-3000:]
    return err


def test_worker_killed_from_outside_mid_shard_is_retried(tmp_path, synth, reference):
    run, once = tmp_path / "run", tmp_path / "faults"
    # shard 3's worker stops mid-shard and reports its pid; the test SIGKILLs that process
    env = {**RAY, "LLAVADI_FAULTS": "ingest:3:hang", "LLAVADI_FAULT_ONCE_DIR": str(once)}
    proc = launch(ingest_args(run, synth, "--executor", "ray", "run.max_retries=2"), env)
    pid_file = once / "ingest-3.pid"
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), proc, what="shard 3 to start")
    pid = int(pid_file.read_text())
    assert pid != proc.pid
    os.kill(pid, signal.SIGKILL)
    err = finish(proc)
    assert "shard 00003: worker died" in err
    assert tree_bytes(run / "data") == reference


@pytest.fixture
def cluster_factory():
    from ray.cluster_utils import Cluster

    made = []

    def make():
        # fast failure detection, so a lost node is noticed in ~2 s rather than ~30 s
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4}})
        worker = c.add_node(num_cpus=1)
        c.wait_for_nodes()
        made.append(c)
        return c, worker

    yield make
    for c in made:
        try:
            c.shutdown()
        except Exception:  # noqa: BLE001 - already torn down by the test
            pass


def test_node_lost_mid_stage_shards_finish_on_the_other_node(tmp_path, synth, reference, cluster_factory):
    cluster, worker = cluster_factory()
    run = tmp_path / "run"
    env = {**RAY, "LLAVADI_FAULTS": "ingest:*:sleep0.5"}  # slow shards, so the loss lands mid-stage
    proc = launch(ingest_args(run, synth, "--executor", "ray", "--ray-address", cluster.address,
                              "run.num_workers=2", "run.cpus_per_worker=1", "run.max_retries=3"), env)
    wait_for(lambda: n_done(run) >= 3, proc, what="3 shards")
    cluster.remove_node(worker, allow_graceful=False)  # the node and its worker processes are gone
    err = finish(proc)
    assert "worker died" in err  # the shard in flight on the lost node was retried
    assert tree_bytes(run / "data") == reference


def test_cluster_torn_down_mid_stage_then_new_cluster_resumes(tmp_path, synth, reference, cluster_factory):
    cluster, _ = cluster_factory()
    run = tmp_path / "run"
    env = {**RAY, "LLAVADI_FAULTS": "ingest:*:sleep0.5"}
    extra = ["--executor", "ray", "run.num_workers=2", "run.cpus_per_worker=1"]
    proc = launch(ingest_args(run, synth, *extra, "--ray-address", cluster.address), env)
    wait_for(lambda: n_done(run) >= 4, proc, what="4 shards")
    os.killpg(proc.pid, signal.SIGKILL)  # the driver goes with the cluster (a pre-empted head node)
    proc.wait()
    proc.stderr.close()
    cluster.shutdown()
    done_before = n_done(run)
    assert 4 <= done_before < 15

    cluster2, _ = cluster_factory()
    p = cli(*ingest_args(run, synth, *extra, "--ray-address", cluster2.address), env=RAY, timeout=600)
    assert f"{done_before} already done" in p.stdout, p.stdout
    assert tree_bytes(run / "data") == reference
