"""The teacher-cache size estimate (``pipeline/estimate.py``, issues #15 item 4 and #20) against the caches
real runs then write: rows, samples, images and the bytes on disk for every field and codec; the
disk-space refusal and its override; what ``--dry-run`` and ``status`` print.

Expected values come from the run's own files (``index.json`` counts, file sizes on disk), not from the
formulas the estimator uses.
"""
from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import yaml

from conftest import cli

Usage = namedtuple("Usage", "total used free")


def _resolve(run: Path, *overrides: str):
    from llavadi.pipeline.session import resolve

    return resolve(run, overrides=list(overrides))


def disk_bytes(cache_dir: Path) -> dict:
    """What a finished cache holds, from its files: rows and samples (index.json), the bytes on disk of
    the shards, of the image-row store and of the head file."""
    idx = json.loads((cache_dir / "index.json").read_text())
    shards = sum(sum(f.stat().st_size for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
                 for p in (cache_dir / s["file"] for s in idx["shards"]))
    images = [p for p in (cache_dir / "image_rows").rglob("*.tcblob")] if (cache_dir / "image_rows").exists() else []
    return {"rows": sum(s["n_rows"] for s in idx["shards"]), "samples": sum(s["n_samples"] for s in idx["shards"]),
            "shards": shards, "images": len(images), "image_bytes": sum(p.stat().st_size for p in images),
            "head": (cache_dir / "teacher_head.safetensors").stat().st_size}


# every field and codec at least once: hidden float16 / int8 / bfloat16 / none, two layers, top-k with
# float32 and float16 log-probs, sampled, no logits, affinity, answer / text / all rows (image rows stored
# once per image), both stores
CONFIGS = {
    "answer-f16-topk32-zarr": [],
    "all-int8x2-topk16-affinity-wds": ["cache_teacher.positions=all", "cache_teacher.hidden_layers=[-1,1]",
                                       "cache_teacher.hidden_dtype=int8", "cache_teacher.logprob_dtype=float16",
                                       "cache_teacher.affinity=true", "cache_teacher.store=webdataset"],
    "text-sampled-logits-only-zarr": ["cache_teacher.positions=text", "cache_teacher.logits=sampled",
                                      "cache_teacher.hidden_layers=[]"],
    "all-bf16-no-logits-wds": ["cache_teacher.positions=all", "cache_teacher.hidden_dtype=bfloat16",
                               "cache_teacher.logits=none", "cache_teacher.store=webdataset"],
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_estimate_within_10_percent_of_the_bytes_on_disk(name, cached_run, tmp_path):
    """``--dry-run`` (which probes the teacher on 8 samples), then ``status``, then the run: rows, samples
    and images exact (every input row counted); the expected size within 10 % of what the run writes on
    disk — shards, image rows and head."""
    from llavadi.pipeline.estimate import estimate_cache

    run = _fresh(cached_run, tmp_path)
    opts = CONFIGS[name]
    p = cli("cache-teacher", run, "--dry-run", "--executor", "local", *opts)
    assert "compressed as measured on 8 probe sample(s)" in p.stdout
    st = json.loads(cli("status", run, "--json", *[]).stdout).get("cache_teacher_estimate")
    e = estimate_cache(run, _resolve(run, *opts))  # the probe the dry run stored
    assert e["compressed"] and e["probe_samples"] == 8
    cli("cache-teacher", run, "--executor", "local", *opts, timeout=900)
    r = disk_bytes(run / "cache_teacher")
    rows = r["shards"] + r["image_bytes"]  # the head (33 MB here) would hide any error in the rows: apart
    want = e["bytes_expected"] - e["head"]["bytes"]
    print(f"[{name}] expected {want} B, on disk {rows} B ({want / rows - 1:+.1%}) + head {r['head']} B; "
          f"rows {e['rows_stored']} / {r['rows']}, images {e['images']} / {r['images']}")
    assert e["exact"] and (e["rows_stored"], e["samples"], e["images"]) == (r["rows"], r["samples"], r["images"])
    assert abs(want - rows) <= 0.10 * rows
    assert abs(e["head"]["bytes"] - r["head"]) <= 0.01 * r["head"]
    if st is not None:  # status shows the same estimate, while the run config holds the same options
        assert st["bytes_expected"] == e["bytes_expected"] or st["spec"] != e["spec"]
    done = estimate_cache(run, _resolve(run))
    assert done["shards_done"] == done["shards"] == 3 and done["bytes_remaining"] == 0


def test_uncompressed_bound_and_an_extrapolated_count(cached_run, tmp_path):
    """Without a probe the estimate is the uncompressed size (an upper bound, said so); counting a third
    of the rows (extrapolated) stays within 10 % of the counted rows; the same rows every time."""
    from llavadi.pipeline.estimate import estimate_cache, render_lines

    run = _fresh(cached_run, tmp_path)
    e = estimate_cache(run, _resolve(run))
    assert not e["compressed"] and "UNCOMPRESSED" in "\n".join(render_lines(e))
    raw = cached_run[0] / "cache_teacher"
    r = disk_bytes(raw)
    assert e["bytes_expected"] - e["head"]["bytes"] >= r["shards"]  # an upper bound
    # by hand: the uncompressed bytes per answer row of this spec (H 256, k 8, V 32064)
    assert e["bytes_per_row_total"] == 4 + 1 + 2 + 256 * 2 + 8 * 2 + 8 * 4 + 8
    s = estimate_cache(run, _resolve(run, "cache_teacher.estimate_rows=8"))
    print(f"[8 of 24 rows] rows {s['rows_stored']} vs {r['rows']} ({s['rows_stored'] / r['rows'] - 1:+.1%})")
    assert not s["exact"] and s["rows_counted"] == 8 and s["rows"] == 24
    assert abs(s["rows_stored"] - r["rows"]) <= 0.10 * r["rows"]
    again = estimate_cache(run, _resolve(run, "cache_teacher.estimate_rows=8"))
    drop = lambda d: {k: v for k, v in d.items() if k not in ("free_bytes", "fits")}  # noqa: E731 (other writers)
    assert drop(again) == drop(s)


def _fresh(cached_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(cached_run[0], run)
    shutil.rmtree(run / "cache_teacher")
    return run


def test_a_launch_that_cannot_fit_is_refused_before_work_and_the_override_launches(cached_run, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from llavadi import cli as cli_mod
    from llavadi.pipeline import estimate

    from llavadi.stages.cache_probe import run_probe

    run = _fresh(cached_run, tmp_path)
    cfg = _resolve(run)
    need = estimate.estimate_cache(run, cfg, probe=lambda: run_probe(run, cfg))["bytes_remaining"]  # compressed
    shutil.rmtree(run / "cache_teacher")  # the launch probes again
    seen = []

    def small_disk(path):
        seen.append(Path(path))
        return Usage(10 * need, 9 * need, need - 1)  # one byte short

    monkeypatch.setattr(shutil, "disk_usage", small_disk)
    r = CliRunner().invoke(cli_mod.app, ["cache-teacher", str(run), "--executor", "local"])
    assert r.exit_code == 2, r.output
    assert "not enough disk space" in r.output and "cache_teacher.ignore_space_check=true" in r.output
    assert estimate.human(need) in r.output and "compressed as a probe measured it" in r.output
    assert seen and seen[0] == run  # measured where the cache goes
    # refused before any work: nothing but the probe's measurement written
    assert [p.relative_to(run).as_posix() for p in (run / "cache_teacher").rglob("*")] == \
        ["cache_teacher/stats", "cache_teacher/stats/estimate_probe.json"]

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
    from llavadi.pipeline.estimate import estimate_cache

    run = _fresh(cached_run, tmp_path)
    cfg_before = (run / "config.yaml").read_bytes()
    e = estimate_cache(run, _resolve(run))
    p = cli("cache-teacher", run, "--dry-run", "--executor", "local")
    printed = yaml.safe_load(p.stdout)  # still YAML: the estimate comes as comments
    assert printed["cache_teacher"]["top_k"] == 8
    out = p.stdout
    assert f"samples            {e['samples']:,} ({e['answer_tokens']:,} answer tokens" in out
    assert "bytes per row      575 B uncompressed = position 4 B + kind 1 B + token_ids 2 B + hidden 512 B" in out
    assert "expected cache" in out and "compressed as measured on 8 probe sample(s)" in out
    assert "free space" in out and str(run) in out
    # nothing written but the probe's measurement (status reads it); the config untouched
    assert sorted(p.name for p in (run / "cache_teacher").rglob("*")) == ["estimate_probe.json", "stats"]
    assert (run / "config.yaml").read_bytes() == cfg_before

    st = json.loads(cli("status", run, "--json").stdout)
    assert st["cache_teacher_estimate"]["answer_tokens"] == e["answer_tokens"]
    assert st["cache_teacher_estimate"]["compressed"]  # the dry run's probe
    text = cli("status", run).stdout
    assert "cache-teacher estimate (input data/, 3 shard(s))" in text and "still to write" in text
    # finished: status stops estimating
    assert "cache_teacher_estimate" not in json.loads(cli("status", cached_run[0], "--json").stdout)


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
