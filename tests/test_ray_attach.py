"""Issue #22 class 5: every way a Ray user attaches llavadi to a cluster works, against a real
local cluster (``ray start --head`` on 127.0.0.1): ``--ray-address``, ``run.ray_address``,
``RAY_ADDRESS`` (as ``ray job submit`` sets it), ``auto``, and a driver that already called
``ray.init``. Whether a launch really ran on that cluster is read from the cluster's own session
logs (one ``python-core-driver-*`` log per driver that connected); the outputs must equal a
local-executor run byte for byte.

The cluster lives in a private ``RAY_TMPDIR`` (so no other Ray user of this machine finds it) and
is stopped by killing its own process group — never ``ray stop``, which stops every Ray on the host.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import cli, tree_bytes


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Cluster:
    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="r22", dir="/tmp")  # short: Ray's socket paths are length-limited
        gcs, dash, client, agent = _free_ports(4)
        self.address = f"127.0.0.1:{gcs}"
        self.env = {**os.environ, "RAY_TMPDIR": self.tmp}
        self.env.pop("RAY_ADDRESS", None)
        self.start = subprocess.Popen(
            [str(Path(sys.executable).with_name("ray")), "start", "--head", "--node-ip-address=127.0.0.1",
             f"--port={gcs}", "--num-cpus=2", "--include-dashboard=false", f"--dashboard-port={dash}",
             f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}", "--disable-usage-stats"],
            env=self.env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = self.start.communicate(timeout=120)
        assert self.start.returncode == 0, out[-3000:]
        # the session of this cluster (session_latest moves if an embedded cluster starts here later)
        self.logs = (Path(self.tmp) / "ray" / "session_latest").resolve() / "logs"

    def drivers(self) -> int:
        """Drivers that have connected to this cluster so far."""
        return len(list(self.logs.glob("python-core-driver-*")))

    def stop(self):
        try:
            os.killpg(self.start.pid, signal.SIGKILL)  # ray start's daemons stay in its process group
        except ProcessLookupError:
            pass
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synth):
    train, root = synth
    run = tmp_path_factory.mktemp("ref") / "run"
    cli("ingest", run, "--input", train, "--image-root", root, "--shard-size", "60", "--executor", "local")
    return tree_bytes(run / "data")


def ingest(run, synth, *extra, env):
    train, root = synth
    return cli("ingest", run, "--input", train, "--image-root", root, "--shard-size", "60", "--executor", "ray",
               *extra, env=env, timeout=240)


@pytest.mark.parametrize("how", ["--ray-address", "run.ray_address", "RAY_ADDRESS", "auto"])
def test_a_stage_joins_the_named_cluster(cluster, reference, synth, tmp_path, how):
    env = dict(cluster.env)
    extra: tuple = ()
    if how == "--ray-address":
        extra = ("--ray-address", cluster.address)
    elif how == "run.ray_address":
        extra = (f"run.ray_address={json.dumps(cluster.address)}",)
    elif how == "RAY_ADDRESS":
        env["RAY_ADDRESS"] = cluster.address  # what `ray job submit` gives its entrypoint
    else:
        extra = ("--ray-address", "auto")  # the cluster running on this machine (found via RAY_TMPDIR)
    before = cluster.drivers()
    p = ingest(tmp_path / "run", synth, *extra, env=env)
    assert "2 shards (2 run" in p.stdout, p.stdout + p.stderr
    assert cluster.drivers() == before + 1  # it ran on this cluster, not an embedded one
    assert tree_bytes(tmp_path / "run" / "data") == reference


DRIVER = r"""
import json, sys
import ray
from llavadi.pipeline.config import load_config
from llavadi.pipeline.runner import run_stage
from llavadi.stages import ingest

address, run, train, root = sys.argv[1:]
ray.init(address=address)
cfg = load_config({}, [f"ingest.inputs=[{json.dumps(train)}]", f"ingest.image_root={json.dumps(root)}",
                       "ingest.shard_size=60", "run.executor=ray"])
rep = run_stage(ingest.STAGE, run, cfg, progress=False)
still = ray.is_initialized()
print("RESULT " + json.dumps({"shards_run": rep.shards_run, "still_connected": still,
                              "nodes": len(ray.nodes()) if still else 0}))
"""


def test_a_driver_that_already_called_ray_init_keeps_its_connection(cluster, reference, synth, tmp_path):
    train, root = synth
    before = cluster.drivers()
    p = subprocess.run([sys.executable, "-c", DRIVER, cluster.address, str(tmp_path / "run"), str(train), str(root)],
                       env=cluster.env, capture_output=True, text=True, timeout=240)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    got = json.loads(line[0][len("RESULT "):])
    assert got == {"shards_run": 2, "still_connected": True, "nodes": 1}  # llavadi neither re-inits nor disconnects it
    assert cluster.drivers() == before + 1  # the caller's one connection, no other
    assert tree_bytes(tmp_path / "run" / "data") == reference


def test_without_an_address_a_running_cluster_is_not_joined_by_accident(cluster, reference, synth, tmp_path):
    # Ray's own ray.init() would join the cluster recorded in RAY_TMPDIR (and, given num_cpus, fail)
    before = cluster.drivers()
    p = ingest(tmp_path / "run", synth, env=cluster.env)
    assert "2 shards (2 run" in p.stdout
    assert cluster.drivers() == before  # an embedded cluster ran it
    assert tree_bytes(tmp_path / "run" / "data") == reference


def test_an_unreachable_address_stops_with_a_message(synth, tmp_path, cluster):
    env = {**cluster.env, "RAY_ADDRESS": "not a host:port:at all"}
    t0 = time.monotonic()
    train, root = synth
    p = cli("ingest", tmp_path / "run", "--input", train, "--image-root", root, env=env, check=False, timeout=240)
    assert p.returncode == 2 and "cannot join the Ray cluster" in p.stderr and "RAY_ADDRESS" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and time.monotonic() - t0 < 120
