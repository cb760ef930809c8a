"""The teacher-cache size estimate (``pipeline/estimate.py``, issue #15 item 4) against the caches
real runs then write: answer tokens, samples, uncompressed array bytes and the head file; the
disk-space refusal and its override; what ``--dry-run`` and ``status`` print.

Expected values come from the run's own files: ``index.json`` counts, each stored array's
``shape × itemsize`` (Zarr arrays opened, WebDataset blobs decoded) and the head file's size —
not from the formulas the estimator uses.
"""
from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import cli

Usage = namedtuple("Usage", "total used free")


def _resolve(run: Path, *overrides: str):
    from llavadi.pipeline.session import resolve

    return resolve(run, overrides=list(overrides))


def real_sizes(cache_dir: Path) -> dict:
    """What a finished cache holds, measured from its files: samples and tokens (index.json),
    uncompressed bytes of the stored per-token and per-sample arrays (Zarr: shape × itemsize of each
    array; WebDataset: the decoded blob segments), the per-token arrays' compressed bytes (Zarr chunk
    files; blob segments) and the shards' bytes on disk (metadata and framing included)."""
    import tarfile

    import zarr
    from zarr.storage import LocalStore

    from llavadi.schemas.teacher_cache import _decode_blob_raw

    per_sample = ("offsets", "sample_id_offsets", "sample_id_utf8")
    idx = json.loads((cache_dir / "index.json").read_text())
    out = {"samples": sum(s["n_samples"] for s in idx["shards"]), "tokens": sum(s["n_tokens"] for s in idx["shards"]),
           "token_arrays": 0, "sample_arrays": 0, "token_arrays_compressed": 0, "disk": 0}
    for s in idx["shards"]:
        path = cache_dir / s["file"]
        if path.is_dir():
            g = zarr.open_group(store=LocalStore(path, read_only=True), mode="r", zarr_format=3)
            for name, arr in g.arrays():
                nb = int(np.prod(arr.shape)) * arr.dtype.itemsize
                out["sample_arrays" if name in per_sample else "token_arrays"] += nb
            for f in path.rglob("*"):
                if f.is_file():
                    out["disk"] += f.stat().st_size
                    top = f.relative_to(path).parts[0]
                    if f.name != "zarr.json" and top not in per_sample:
                        out["token_arrays_compressed"] += f.stat().st_size
        else:
            with tarfile.open(path) as tar:
                for m in tar:
                    if m.name.endswith(".tcblob"):
                        header, raw = _decode_blob_raw(tar.extractfile(m).read())
                        out["token_arrays"] += sum(a.nbytes for a in raw.values())
                        out["token_arrays_compressed"] += sum(header["seg"])
                        # no offsets arrays in a tar (each blob header holds n and the id): counted as
                        # the Zarr store would store them, which is what the estimate's arrays figure is
                        out["sample_arrays"] += 16 + len(header["sample_id"].encode())
            out["sample_arrays"] += 16
            out["disk"] += path.stat().st_size
    out["head"] = (cache_dir / "teacher_head.safetensors").stat().st_size
    out["arrays"] = out["token_arrays"] + out["sample_arrays"]
    return out


def _report(label: str, e: dict, r: dict) -> None:
    print(f"\n[{label}] estimate / real: answer tokens {e['answer_tokens']} / {r['tokens']}, samples {e['samples']} / "
          f"{r['samples']}, arrays {e['bytes_arrays']} / {r['arrays']} B uncompressed; per-token arrays compressed "
          f"{r['token_arrays_compressed']} B of {r['token_arrays']} (ratio {r['token_arrays_compressed'] / r['token_arrays']:.3f}); "
          f"shards on disk {r['disk']} B (estimate without head {e['bytes_expected'] - e['head']['bytes']}); head "
          f"{e['head']['bytes']} / {r['head']} B; total {e['bytes_expected']} / {r['arrays'] + r['head']} B")


def test_estimate_equals_what_the_run_wrote(cached_run):
    """Every row counted: answer tokens and samples exact; uncompressed bytes within 10 % (they come
    out equal but for the head file's header); the per-token bytes equal the stored arrays'."""
    from llavadi.pipeline.estimate import estimate_cache

    run = cached_run[0]
    e = estimate_cache(run, _resolve(run))
    r = real_sizes(run / "cache_teacher")
    _report("float16/float32 zarr, top-k 8", e, r)
    assert e["exact"] and e["rows_counted"] == e["rows"] == 24
    assert (e["answer_tokens"], e["samples"]) == (r["tokens"], r["samples"])
    assert e["bytes_per_token_total"] * r["tokens"] == r["token_arrays"]  # the format's bytes per token, exactly
    assert abs(e["bytes_arrays"] - r["arrays"]) <= 0.10 * r["arrays"]
    assert e["bytes_framing"] == 0 and e["bytes_expected"] == e["bytes_arrays"] + e["head"]["bytes"]
    assert abs(e["head"]["bytes"] - r["head"]) <= 0.01 * r["head"]
    assert abs(e["bytes_expected"] - (r["arrays"] + r["head"])) <= 0.10 * (r["arrays"] + r["head"])
    assert (e["hidden_size"], e["top_k"], e["head"]["vocab_size"]) == (256, 8, 32064)
    # the cache is complete: nothing left to write, the head is there
    assert e["shards_done"] == e["shards"] == 3 and e["bytes_remaining"] == 0
    assert e["bytes_written"] == r["disk"]


def test_int8_webdataset_and_a_sampled_count(cached_run, tiny_teacher, tmp_path):
    """Another dtype/store combination (int8 hidden + scale, float16 log-probs, tar blobs) against a
    real run; and counting a third of the rows (extrapolated) stays within 10 % of the real cache."""
    from llavadi.pipeline.estimate import estimate_cache

    run = tmp_path / "run"
    shutil.copytree(cached_run[0], run)
    shutil.rmtree(run / "cache_teacher")
    opts = ["cache_teacher.hidden_dtype=int8", "cache_teacher.logprob_dtype=float16", "cache_teacher.store=webdataset"]
    before = estimate_cache(run, _resolve(run, *opts))
    assert before["shards_done"] == 0 and before["bytes_remaining"] == before["bytes_expected"]
    cli("cache-teacher", run, "--executor", "local", *opts, timeout=900)
    r = real_sizes(run / "cache_teacher")
    e = estimate_cache(run, _resolve(run))  # the stored config now holds the options
    _report("int8/float16 webdataset", e, r)
    assert e["bytes_per_token"]["hidden_scale"] == 4 and e["bytes_per_token"]["hidden"] == 256
    assert (e["answer_tokens"], e["samples"]) == (r["tokens"], r["samples"])
    assert e["bytes_per_token_total"] * r["tokens"] == r["token_arrays"]
    assert abs(e["bytes_arrays"] - r["arrays"]) <= 0.10 * r["arrays"]
    assert e["bytes_framing"] == 24 * e["bytes_framing_per_sample"] > 0
    assert before["bytes_expected"] == e["bytes_expected"]

    s = estimate_cache(run, _resolve(run, "cache_teacher.estimate_rows=8"))
    print(f"[sampled 8 of 24 rows] tokens {s['answer_tokens']} vs {r['tokens']} "
          f"({s['answer_tokens'] / r['tokens'] - 1:+.1%}), arrays {s['bytes_arrays']} vs {r['arrays']} B")
    assert not s["exact"] and s["rows_counted"] == 8 and s["rows"] == 24
    assert abs(s["answer_tokens"] - r["tokens"]) <= 0.10 * r["tokens"]
    assert abs(s["bytes_arrays"] - r["arrays"]) <= 0.10 * r["arrays"]
    again = estimate_cache(run, _resolve(run, "cache_teacher.estimate_rows=8"))
    drop = lambda d: {k: v for k, v in d.items() if k not in ("free_bytes", "fits")}  # noqa: E731 (other writers)
    assert drop(again) == drop(s)  # the same rows every time


def _fresh(cached_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(cached_run[0], run)
    shutil.rmtree(run / "cache_teacher")
    return run


def test_a_launch_that_cannot_fit_is_refused_before_work_and_the_override_launches(cached_run, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from llavadi import cli as cli_mod
    from llavadi.pipeline import estimate

    run = _fresh(cached_run, tmp_path)
    need = estimate.estimate_cache(run, _resolve(run))["bytes_remaining"]
    seen = []

    def small_disk(path):
        seen.append(Path(path))
        return Usage(10 * need, 9 * need, need - 1)  # one byte short

    monkeypatch.setattr(shutil, "disk_usage", small_disk)
    r = CliRunner().invoke(cli_mod.app, ["cache-teacher", str(run), "--executor", "local"])
    assert r.exit_code == 2, r.output
    assert "not enough disk space" in r.output and "cache_teacher.ignore_space_check=true" in r.output
    assert estimate.human(need) in r.output and seen and seen[0] == run  # measured where the cache goes
    assert not (run / "cache_teacher").exists()  # refused before any work: nothing written

    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 * need, 9 * need, need))  # exactly enough: runs
    assert estimate.space_problems(run, _resolve(run)) == []
    monkeypatch.setattr(shutil, "disk_usage", small_disk)
    r = CliRunner().invoke(cli_mod.app, ["cache-teacher", str(run), "--executor", "local",
                                         "cache_teacher.ignore_space_check=true"])
    assert r.exit_code == 0, r.output
    assert json.loads((run / "cache_teacher" / "_stage.json").read_text())["complete"]
    # the check's keys are not part of the stage fingerprint: same cache as the fixture's run
    fp = lambda d: json.loads((d / "cache_teacher" / "_stage.json").read_text())["fingerprint"]  # noqa: E731
    assert fp(run) == fp(cached_run[0])


def test_dry_run_and_status_print_the_estimate(cached_run, tmp_path):
    from llavadi.pipeline.estimate import estimate_cache, human

    run = _fresh(cached_run, tmp_path)
    cfg_before = (run / "config.yaml").read_bytes()
    e = estimate_cache(run, _resolve(run))
    p = cli("cache-teacher", run, "--dry-run", "--executor", "local")
    printed = yaml.safe_load(p.stdout)  # still YAML: the estimate comes as comments
    assert printed["cache_teacher"]["top_k"] == 8
    out = p.stdout
    assert f"answer tokens      {e['answer_tokens']:,} in {e['samples']:,} samples" in out
    assert f"bytes per token    {e['bytes_per_token_total']:,} B = token id 4 B + hidden 256×2 B (float16)" in out
    assert f"expected cache     {human(e['bytes_expected'])}" in out and "uncompressed" in out
    assert "free space" in out and str(run) in out
    assert not (run / "cache_teacher").exists() and (run / "config.yaml").read_bytes() == cfg_before

    st = json.loads(cli("status", run, "--json").stdout)
    assert st["cache_teacher_estimate"]["answer_tokens"] == e["answer_tokens"]
    text = cli("status", run).stdout
    assert "cache-teacher estimate (input data/, 3 shard(s))" in text and "still to write" in text
    # finished: status stops estimating
    assert "cache_teacher_estimate" not in json.loads(cli("status", cached_run[0], "--json").stdout)
    assert not (run / "cache_teacher").exists()


def test_nothing_to_estimate_is_said_not_raised(tmp_path, synth):
    from llavadi.pipeline.estimate import EstimateUnavailable, estimate_cache, space_problems

    train, root = synth
    run = tmp_path / "run"
    cfg = _resolve(run, "cache_teacher.source=data")
    with pytest.raises(EstimateUnavailable, match="does not exist yet"):
        estimate_cache(run, cfg)
    assert space_problems(run, cfg) == []
    cli("ingest", run, "--input", train, "--image-root", root, "--shard-size", "60", "--executor", "local")
    with pytest.raises(EstimateUnavailable, match="teacher.model"):
        estimate_cache(run, _resolve(run, "cache_teacher.source=data"))
    p = cli("cache-teacher", run, "--dry-run", "cache_teacher.source=data")
    assert "# cache-teacher estimate: not available (teacher.model is not set" in p.stdout
    assert "cache_teacher_estimate" not in json.loads(cli("status", run, "--json").stdout)  # no teacher chosen yet
