"""Storage faults: a full disk while a shard is written, truncated / bit-flipped shards in every
store (Parquet samples, Zarr and WebDataset caches), and two launches of one stage at once."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from campaign import launch  # noqa: E402
from conftest import cli, tree_bytes  # noqa: E402

pytestmark = pytest.mark.reliability

SHARD = 20  # 120 records -> 6 shards


def ingest_args(run, synth):
    train, root = synth
    return ["ingest", run, "--input", train, "--image-root", root, "--shard-size", SHARD, "--executor", "local"]


def cache_args(run, teacher, store):
    return ["cache-teacher", run, "--teacher", teacher, "--engine", "hf", "--executor", "local",
            "cache_teacher.source=data", "cache_teacher.top_k=8", f"cache_teacher.store={store}"]


@pytest.fixture(scope="module")
def refs(tmp_path_factory, synth, tiny_teacher):
    """Uninterrupted runs: ingest, and a cache in each store on top of it."""
    root = tmp_path_factory.mktemp("storage")
    out = {"ingest": root / "ingest"}
    cli(*ingest_args(out["ingest"], synth))
    for store in ("zarr", "webdataset"):
        out[store] = root / store
        shutil.copytree(out["ingest"], out[store])
        cli(*cache_args(out[store], tiny_teacher, store), timeout=900)
    return out


def copy_of(src: Path, tmp_path: Path, drop: str | None = None) -> Path:
    run = tmp_path / "run"
    shutil.copytree(src, run)
    if drop:
        shutil.rmtree(run / drop)
    return run


# ------------------------------------------------------------------------------ disk full
@pytest.mark.parametrize("stage", ["ingest", "cache-teacher:zarr", "cache-teacher:webdataset"])
def test_disk_full_while_writing_a_shard(refs, synth, tiny_teacher, tmp_path, stage):
    name, _, store = stage.partition(":")
    if name == "ingest":
        run, args, d, ref = tmp_path / "run", ingest_args(tmp_path / "run", synth), "data", refs["ingest"]
    else:
        run = copy_of(refs["ingest"], tmp_path)
        args, d, ref = cache_args(run, tiny_teacher, store), "cache_teacher", refs[store]
    fault = {"LLAVADI_FAULTS": f"{name}:2:enospc:commit"}
    p = cli(*args, env=fault, check=False, timeout=900)
    assert p.returncode == 1
    assert "shard 00002: OSError" in p.stderr and "No space left on device" in p.stderr
    assert f"disk full under {run / d}" in p.stderr  # says where, and what to do
    assert not (run / d / "_done" / "00002.json").exists()
    assert not list((run / d).glob("part-00002*")), "a partial shard was left in place"
    assert (run / d / "_done" / "00003.json").exists()  # the other shards went on
    cli(*args, timeout=900)
    assert tree_bytes(run / d) == tree_bytes(ref / d)


# ------------------------------------------------------------------------------ corruption
def truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def bit_flip(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, bit_flip], ids=["truncated", "bit-flipped"])
def test_corrupt_samples_shard_is_named_and_rebuilt(refs, synth, tiny_teacher, tmp_path, damage):
    run = copy_of(refs["ingest"], tmp_path)
    bad = run / "data" / "part-00003.parquet"
    damage(bad)
    # the stage reading it (here cache-teacher) stops that shard with the file and the fix named
    p = cli(*cache_args(run, tiny_teacher, "zarr"), check=False, timeout=900)
    assert p.returncode == 1
    assert f"shard file {bad} is corrupt" in p.stderr
    assert f"Delete {run / 'data' / '_done' / '00003.json'} and rerun `llavadi ingest`" in p.stderr
    # following the message rebuilds exactly that shard, and the downstream stage completes
    (run / "data" / "_done" / "00003.json").unlink()
    assert "(1 run, 5 already done)" in cli(*ingest_args(run, synth)).stdout
    assert tree_bytes(run / "data") == tree_bytes(refs["ingest"] / "data")
    cli(*cache_args(run, tiny_teacher, "zarr"), timeout=900)
    assert tree_bytes(run / "cache_teacher") == tree_bytes(refs["zarr"] / "cache_teacher")


def damaged_cache_file(run: Path, store: str) -> Path:
    if store == "webdataset":
        return run / "cache_teacher" / "part-00001.tar"
    # the largest chunk file of the hidden-state array of shard 1
    files = [f for f in (run / "cache_teacher" / "part-00001.zarr").rglob("*") if f.is_file() and "hidden" in f.parts]
    return max(files, key=lambda f: f.stat().st_size)


@pytest.mark.parametrize("store", ["zarr", "webdataset"])
@pytest.mark.parametrize("damage", [truncate, bit_flip], ids=["truncated", "bit-flipped"])
def test_corrupt_cache_shard_is_named_by_its_reader(refs, tmp_path, store, damage):
    from llavadi.stages.demo.tiny_models import STUDENT, build_tiny_llava

    run = copy_of(refs[store], tmp_path)
    damage(damaged_cache_file(run, store))
    student = build_tiny_llava(tmp_path / "student", STUDENT)
    p = cli("train-student", run, "--student", student, "train_student.batch_size=4",
            "train_student.micro_batch_size=4", "train_student.max_steps=40", check=False, timeout=900)
    assert p.returncode != 0
    msg = p.stdout + p.stderr
    assert "part-00001" in msg and ("corrupt" in msg.lower()), msg[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]  # a message, not a stack dump
    assert not (run / "train_student" / "_stage.json").exists() or '"complete": true' not in (
        run / "train_student" / "_stage.json").read_text()


# ------------------------------------------------------------------------------ two launches
def test_second_launch_of_a_running_stage_is_refused(refs, synth, tmp_path):
    run = tmp_path / "run"
    args = ingest_args(run, synth)
    first = launch(args, {"LLAVADI_FAULTS": "ingest:*:sleep0.3"})
    t0 = time.time()
    while not (run / "data" / "_lock.json").exists():
        assert first.poll() is None and time.time() - t0 < 120, "the first launch never took its lock"
        time.sleep(0.01)
    second = cli(*args, check=False)
    assert second.returncode == 2 and "already running" in second.stderr and str(first.pid) in second.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert tree_bytes(run / "data") == tree_bytes(refs["ingest"] / "data")
