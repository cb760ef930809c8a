"""Ray (real embedded cluster) and local executors produce the same bytes; a Ray actor that
dies mid-shard is replaced and the shard retried; one that keeps dying fails only its shard."""
from conftest import cli, status_json, tree_bytes

RAY = {"RAY_AUTH_MODE": "disabled"}


def ingest(run, synth, executor, env=None, check=True):
    train, root = synth
    return cli("ingest", run, "--input", train, "--image-root", root, "--shard-size", "25", "--executor", executor,
               "run.max_retries=1", env={**RAY, **(env or {})}, check=check, timeout=600)


def test_ray_with_actor_death_equals_local(tmp_path, synth):
    ingest(tmp_path / "local", synth, "local")
    once = tmp_path / "faults"
    # shard 1's actor process dies once (os._exit, like an OOM kill): it must be retried
    p = ingest(tmp_path / "ray", synth, "ray", env={"LLAVADI_FAULTS": "ingest:1:exit", "LLAVADI_FAULT_ONCE_DIR": str(once)})
    assert (once / "ingest-1-exit-start").exists(), "the fault did not fire"
    assert "5 shards (5 run" in p.stdout
    assert tree_bytes(tmp_path / "ray" / "data") == tree_bytes(tmp_path / "local" / "data")
    pids = {__import__("json").loads(f.read_text())["pid"] for f in (tmp_path / "ray" / "data" / "stats").glob("*.json")}
    assert len(pids) >= 2  # shards really ran in Ray worker processes


def test_ray_shard_that_keeps_dying_fails_alone(tmp_path, synth):
    p = ingest(tmp_path / "ray", synth, "ray", env={"LLAVADI_FAULTS": "ingest:3:exit"}, check=False)
    assert p.returncode == 1 and "shard 00003: worker died 2 times" in p.stderr
    st = status_json(tmp_path / "ray")["stages"]["data"]
    assert st["shards_done"] == 4 and st["shards_total"] == 5 and not st["complete"]
