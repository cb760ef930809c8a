"""fsspec URLs: ingest inputs from file:// and from a non-local fsspec filesystem (memory://),
run directories given as file:// URLs, and train-student pulling a teacher cache from another
run (path or URL) — shard by shard, verified, only what is missing on a rerun."""
from __future__ import annotations

import shutil

import fsspec
import pytest

from llavadi.pipeline.config import load_config
from llavadi.pipeline.rundir import CorruptShardError
from llavadi.pipeline.runner import run_stage
from llavadi.stages.ingest import IngestStage

from conftest import cli, tree_bytes


def ingest_cfg(inputs, root):
    return load_config(None, [f"ingest.inputs={__import__('json').dumps([str(i) for i in inputs])}",
                              f"ingest.image_root={root}", "ingest.shard_size=25", "run.executor=local"])


@pytest.fixture(scope="module")
def plain(tmp_path_factory, synth):
    train, root = synth
    run = tmp_path_factory.mktemp("remote") / "plain"
    cli("ingest", run, "--input", train, "--image-root", root, "--shard-size", "25", "--executor", "local")
    return run


def test_ingest_from_file_url_and_run_dir_url_equals_plain_paths(tmp_path, synth, plain):
    train, root = synth
    run = tmp_path / "run"
    p = cli("ingest", f"file://{run}", "--input", f"file://{train}", "--image-root", root, "--shard-size", "25",
            "--executor", "local")
    assert "5 shards (5 run" in p.stdout
    assert tree_bytes(run / "data") == tree_bytes(plain / "data")
    # the same inputs named as paths: same fingerprint, nothing to redo
    p = cli("ingest", run, "--input", train, "--image-root", root, "--shard-size", "25", "--executor", "local")
    assert "5 already done" in p.stdout


def test_ingest_streams_a_non_local_fsspec_filesystem(tmp_path, synth, plain):
    train, root = synth
    fs = fsspec.filesystem("memory")
    fs.pipe("/llavadi-test/train.json", train.read_bytes())  # an in-memory "bucket"
    try:
        run_stage(IngestStage(), tmp_path / "run", ingest_cfg(["memory:///llavadi-test/train.json"], root),
                  progress=False)
    finally:
        fs.rm("/llavadi-test", recursive=True)
    got = tree_bytes(tmp_path / "run" / "data")
    want = tree_bytes(plain / "data")
    # sources are named by file name, so the shards are the same bytes; only the markers' fingerprints differ
    assert {k: v for k, v in got.items() if not k.startswith("_")} == {k: v for k, v in want.items()
                                                                       if not k.startswith("_")}


def test_missing_backend_and_object_store_run_dir_are_refused_with_the_fix(tmp_path, synth):
    _, root = synth
    p = cli("ingest", tmp_path / "run", "--input", "nosuchproto://bucket/x.jsonl", "--image-root", root,
            "--executor", "local", check=False)
    assert p.returncode == 2 and "Install the fsspec backend for nosuchproto://" in p.stderr
    p = cli("ingest", "s3://bucket/run", "--input", "x.jsonl", check=False)
    assert p.returncode == 2 and "atomic rename" in p.stderr


@pytest.fixture(scope="module")
def teacher_run(cached_run):
    run, student, images = cached_run
    return run, images, student


TRAIN = ["train_student.batch_size=4", "train_student.micro_batch_size=4", "train_student.max_steps=3"]


def final_weights(run):
    from safetensors.torch import load_file

    return load_file(sorted((run / "train_student" / "checkpoints").glob("step_*"))[-1] / "model.safetensors")


def test_train_student_pulls_the_cache_from_another_run(tmp_path, teacher_run):
    import torch

    src, images, student = teacher_run
    here = tmp_path / "trained-there"
    shutil.copytree(src, here)
    cli("train-student", here, "--student", student, *TRAIN)

    run = tmp_path / "student-machine"  # an empty run dir elsewhere
    args = ["train-student", run, "--student", student, *TRAIN, f"ingest.image_root={images}",
            f"train_student.cache_from=file://{src}"]
    cli(*args)
    assert tree_bytes(run / "cache_teacher") == tree_bytes(src / "cache_teacher")
    assert tree_bytes(run / "data") == tree_bytes(src / "data")
    a, b = final_weights(run), final_weights(here)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    from llavadi.stages.train_student.loop import pull_cache

    meta = [f for d in ("cache_teacher", "data") for f in (src / d).rglob("*")
            if f.is_file() and f.suffix in (".json", ".jsonl") and f.name != "_lock.json"]
    assert pull_cache(run, str(src)) == len(meta)  # a rerun re-copies metadata only, no shard data


def test_pulled_shard_that_does_not_match_its_marker_is_named(tmp_path, teacher_run):
    from llavadi.stages.train_student.loop import pull_cache

    src, _, _ = teacher_run
    bad = tmp_path / "bad-source"
    shutil.copytree(src, bad)
    f = bad / "data" / "part-00001.parquet"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CorruptShardError, match=r"pulled from .*bad-source/data: shard file .*part-00001.parquet"):
        pull_cache(tmp_path / "run", str(bad))
