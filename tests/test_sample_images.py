"""Issue #22 classes 3 and 8: every stage that joins a sample to its image checks the sha256 ingest
recorded and rejects a changed or missing image per record; samples from another run find their images
in that run's image root unless overridden.

Expected values come from outside the code under test: sha256 of the files computed here with hashlib,
the image decoded by Pillow directly, the reject sets derived from which files this test changed."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import cli

TRAIN = ["train_student.batch_size=4", "train_student.micro_batch_size=2", "train_student.lr=1e-3",
         "train_student.shuffle_buffer=8", "train_student.log_sample_ids=true"]


def rows_of(run: Path, stage: str = "data") -> list[dict]:
    from llavadi.schemas.samples import iter_samples

    return [r for f in sorted((run / stage).glob("part-*.parquet")) for r in iter_samples(f)]


def image_copy(root: Path, dest: Path) -> Path:
    shutil.copytree(root / "images", dest / "images")
    return dest


def repaint(path: Path) -> None:
    """Another picture under the same name (same size and mode)."""
    im = Image.open(path).convert("RGB")
    Image.fromarray(255 - np.asarray(im)).save(path)


def expected(rows: list[dict], root: Path) -> dict[str, str]:
    """id → reason for every image row whose file under ``root`` is gone or differs from the recorded sha256."""
    out = {}
    for r in rows:
        if r["image"] is None:
            continue
        f = root / r["image"]
        if not f.exists():
            out[r["id"]] = "missing_image"
        elif hashlib.sha256(f.read_bytes()).hexdigest() != r["image_sha256"]:
            out[r["id"]] = "image_changed"
    return out


# --------------------------------------------------------------------------- the shared helper


def test_sample_image_checks_the_recorded_hash(cached_run, tmp_path):
    from llavadi.schemas.samples import Reject, sample_image

    run, _, root = cached_run
    rows = rows_of(run)
    img_rows = [r for r in rows if r["image"]]
    text_row = next(r for r in rows if r["image"] is None)
    a, b, c, d = img_rows[:4]
    new = image_copy(root, tmp_path / "imgs")
    repaint(new / b["image"])
    (new / c["image"]).unlink()
    (new / d["image"]).write_bytes(b"not an image")
    garbage = {**d, "image_sha256": hashlib.sha256(b"not an image").hexdigest()}  # recorded as such (check_images off)

    got = sample_image(new, a)
    want = Image.open(root / a["image"]).convert("RGB")  # an RGB PNG: Pillow's own conversion is the reference
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(want))
    assert sample_image(new, text_row) is None and sample_image(None, text_row) is None
    assert sample_image(new, a, decode=False) is None
    cases = [(new, b, "image_changed"), (new, c, "missing_image"), (new, d, "image_changed"),
             (new, garbage, "undecodable_image"), (None, a, "missing_image"), (tmp_path / "nowhere", a, "missing_image")]
    for where, row, reason in cases:
        with pytest.raises(Reject) as e:
            sample_image(where, row, root_hint="set X=DIR")
        assert e.value.reason == reason
        # a wrong folder is the likely cause of a missing or different file: the detail says how to name the right one
        assert ("set X=DIR" in e.value.detail) == (reason != "undecodable_image")
    # a row from before image_sha256 was recorded is not checked
    assert sample_image(new, {**b, "image_sha256": None}).mode == "RGB"


def test_image_root_rule_is_one_for_every_stage(cached_run, tmp_path):
    """override > the source run's own ingest.image_root (path or file:// URL) > this run's."""
    from llavadi.pipeline.config import load_config
    from llavadi.pipeline.remote import run_image_root, samples_image_root
    from llavadi.stages import eval as ev
    from llavadi.stages.train_student import compat

    run, _, root = cached_run
    assert run_image_root(str(run)) == (str(root), f"ingest.image_root of {run}/config.yaml")
    assert run_image_root(f"file://{run}")[0] == str(root)
    assert run_image_root(str(tmp_path))[0] is None  # no config.yaml there
    assert samples_image_root("/o", "k", str(run), "/own") == ("/o", "k")
    assert samples_image_root(None, "k", None, "/own") == ("/own", "ingest.image_root")
    cfg = load_config({}, [f"train_student.cache_from={run}", "ingest.image_root=/elsewhere"])
    assert compat.image_root(cfg)[0] == str(root)
    cfg = load_config({}, [f"train_student.cache_from={run}", f"train_student.cache_image_root={tmp_path}"])
    assert compat.image_root(cfg) == (str(tmp_path), "train_student.cache_image_root")
    assert compat.image_root(load_config({}, ["ingest.image_root=/own"]))[0] == "/own"
    cfg = load_config({}, [f"eval.cache={run / 'cache_teacher'}", "ingest.image_root=/own"])
    assert ev.cache_image_root(cfg)[0] == str(root)


# --------------------------------------------------------------------------- class 3: the stages


def test_train_student_rejects_changed_and_missing_images_at_the_scan(cached_run, tmp_path):
    """Two images repainted and one deleted after the teacher pass: those samples are rejected with their
    reason (0 trained on), the rest train; the schedule counts only the valid ones."""
    run0, student, root = cached_run
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    rows = rows_of(run)
    img = [r for r in rows if r["image"]]
    new = image_copy(root, tmp_path / "imgs")
    for r in img[:2]:
        repaint(new / r["image"])
    (new / img[5]["image"]).unlink()
    want = expected(rows, new)
    assert sorted(want.values()) == ["image_changed", "image_changed", "missing_image"]
    p = cli("train-student", run, "--student", student, *TRAIN, f"train_student.cache_image_root={new}")
    rej = [json.loads(x) for x in (run / "train_student" / "rejects.jsonl").read_text().splitlines()]
    assert {r["id"]: r["reason"] for r in rej} == want
    scan = json.loads((run / "train_student" / "scan.json").read_text())
    assert scan["valid"] == 24 - 3 and scan["rejected"] == {"image_changed": 2, "missing_image": 1}
    assert "samples used 21, rejected 3" in p.stdout and "5 steps" in p.stdout  # 21 // 4
    trained = {i for x in (run / "train_student" / "sample_ids.rank0.jsonl").read_text().splitlines()
               for i in json.loads(x)["ids"]}
    assert len(trained) == 20 and not trained & set(want)


def test_image_changed_after_the_scan_is_left_out_of_its_step(cached_run, tmp_path, monkeypatch):
    """The image folder changes between the scan and the steps: those samples are left out of their
    micro-batch with a reject (late_rejects.rank0.jsonl, rejected_late in metrics), the run finishes."""
    from llavadi.pipeline.config import load_config
    from llavadi.stages.train_student import loop

    run0, student, root = cached_run
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    new = image_copy(root, tmp_path / "imgs")
    img = [r for r in rows_of(run) if r["image"]]
    real_scan = loop.scan_samples

    def scan_then_change(*a, **k):
        out = real_scan(*a, **k)
        repaint(new / img[0]["image"])
        (new / img[1]["image"]).unlink()
        return out

    monkeypatch.setattr(loop, "scan_samples", scan_then_change)
    cfg = load_config({}, [f"train_student.student={student}", *TRAIN, f"train_student.cache_image_root={new}",
                           "train_student.micro_batch_size=1", "train_student.save_every_steps=100"])
    res = loop.train(run, cfg, progress=False)
    assert res["steps"] == 6 and res["scan"]["valid"] == 24
    late = [json.loads(x) for x in (run / "train_student" / "late_rejects.rank0.jsonl").read_text().splitlines()]
    assert {r["id"]: r["reason"] for r in late} == {img[0]["id"]: "image_changed", img[1]["id"]: "missing_image"}
    m = [json.loads(x) for x in (run / "train_student" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("rejected_late", 0) for r in m) == 2 and len(m) == 6
    steps = {r["step"] for r in late}
    ids = {json.loads(x)["step"]: json.loads(x)["ids"] for x in
           (run / "train_student" / "sample_ids.rank0.jsonl").read_text().splitlines()}
    for s in steps:  # the step trained on its other samples (micro-batches of 1: the emptied one skipped)
        assert len(ids[s]) == 4 - sum(r["step"] == s for r in late) and not {r["id"] for r in late} & set(ids[s])


def test_collate_and_gate_leave_out_late_rejects(cached_run, tmp_path):
    """In-process: a micro-batch drops the samples whose image changed since the stream; one that keeps no
    sample is skipped (one rank: the step goes on with the others; all empty: the step is skipped)."""
    from llavadi.stages.train_student import late
    from llavadi.pipeline.config import load_config
    from llavadi.stages.train_student.batch import CollatePlan
    from llavadi.stages.train_student.data import StepDataset, stream_samples, student_tokens
    from llavadi.stages.train_student.terms import build_terms, row_sets

    run, student, root = cached_run
    new = image_copy(root, tmp_path / "imgs")
    st = student_tokens(str(student))
    items = [it for it in stream_samples(run, st, image_root=str(new)) if it["row"]["image"]][:3]
    cfg = load_config({}, [])
    terms = build_terms(cfg.train_student, {"fields": [{"name": n} for n in ("topk_ids", "topk_logprobs", "hidden")]})
    ds = StepDataset(run, st, str(new), batch_size=1, micro_batch_size=1, rank=0, world=1, seed=0, epoch=0,
                     shuffle_buffer=1, plan=CollatePlan(tuple(row_sets(terms).items())))
    repaint(new / items[1]["row"]["image"])
    mb = ds.collate(items)
    assert mb["sample_ids"] == [items[0]["id"], items[2]["id"]]
    assert [(r["id"], r["reason"]) for r in mb["rejects"]] == [(items[1]["id"], "image_changed")]
    assert int(mb["inputs"]["input_ids"].shape[0]) == 2
    ref = ds.collate([items[0], items[2]])  # the same micro-batch built without the bad sample
    assert all(np.array_equal(ref["sets"]["2"][k], mb["sets"]["2"][k]) for k in ("rows", "token_ids", "topk_ids"))
    empty = ds.collate([items[1]])
    assert empty["sample_ids"] == [] and len(empty["rejects"]) == 1
    g = late.gate([mb, empty], terms, 1, "cpu")
    n = len(mb["sets"]["2"]["token_ids"])
    assert not g.skipped and g.run == [mb] and g.n_late == 2 and g.tokens == n and g.norms["ce"] == (n, 2.0)
    g = late.gate([empty, empty], terms, 1, "cpu")
    assert g.skipped and g.run == [] and g.n_late == 2


def test_cache_teacher_rejects_a_changed_image(cached_run, tiny_teacher, tmp_path):
    run0, _, root = cached_run
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    new = image_copy(root, tmp_path / "imgs")
    img = [r for r in rows_of(run) if r["image"]]
    repaint(new / img[3]["image"])
    (new / img[7]["image"]).unlink()
    cli("cache-teacher", run, "--teacher", tiny_teacher, "--executor", "local", "cache_teacher.source=data",
        "cache_teacher.top_k=8", f"ingest.image_root={new}", "--force")
    rej = [json.loads(x) for f in sorted((run / "cache_teacher" / "rejects").glob("*.jsonl"))
           for x in f.read_text().splitlines()]
    assert {r["id"]: r["reason"] for r in rej} == expected(rows_of(run), new) == {
        img[3]["id"]: "image_changed", img[7]["id"]: "missing_image"}


def test_eval_cache_rejects_changed_images_per_record(cached_run, tmp_path):
    from llavadi.pipeline.config import load_config
    from llavadi.stages import eval as ev

    run, student, root = cached_run
    new = image_copy(root, tmp_path / "imgs")
    img = [r for r in rows_of(run) if r["image"]]
    repaint(new / img[2]["image"])
    cfg = load_config({}, [f"eval.cache={run / 'cache_teacher'}", f"eval.cache_image_root={new}"])
    res = ev.evaluate(tmp_path / "r", cfg, str(student), "s")["teacher_cache"]
    assert res["cache_rejects"] == {"image_changed": 1} and res["cache_samples"] == 23
    rej = [json.loads(x) for x in (tmp_path / "r" / "eval" / "s.cache_rejects.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rej] == [img[2]["id"]] and "--cache-image-root" in rej[0]["detail"]


# --------------------------------------------------------------------------- class 8: another run's samples


def test_cache_from_another_run_reads_that_runs_images(cached_run, tmp_path):
    """The README's train-elsewhere flow: a fresh run whose own ingest.image_root is another folder (or none)
    pulls the cache; images resolve against the cache run's image root: no reject, training done. With
    train_student.cache_image_root pointing at a folder that lacks some images: per-record missing_image."""
    src, student, root = cached_run
    other = tmp_path / "unrelated"
    other.mkdir()
    for i, extra in enumerate(([f"ingest.image_root={other}"], [])):
        run = tmp_path / f"fresh{i}"
        p = cli("train-student", run, "--student", student, *TRAIN, "train_student.max_steps=1",
                f"train_student.cache_from=file://{src}", *extra)
        assert "samples used 24, rejected 0" in p.stdout
    rows = rows_of(src)
    partial = image_copy(root, tmp_path / "partial")
    gone = [r for r in rows if r["image"]][:4]
    for r in gone:
        (partial / r["image"]).unlink()
    run = tmp_path / "fresh-override"
    p = cli("train-student", run, "--student", student, *TRAIN, "train_student.max_steps=1",
            f"train_student.cache_from={src}", f"train_student.cache_image_root={partial}")
    rej = [json.loads(x) for x in (run / "train_student" / "rejects.jsonl").read_text().splitlines()]
    assert {r["id"]: r["reason"] for r in rej} == {r["id"]: "missing_image" for r in gone}
    assert all("train_student.cache_image_root" in r["detail"] for r in rej)
    assert "samples used 20, rejected 4" in p.stdout


def test_cache_from_a_run_whose_image_root_is_gone_is_refused_before_work(cached_run, tmp_path):
    src0, student, _ = cached_run
    src = tmp_path / "moved-teacher-run"
    shutil.copytree(src0, src)
    cfg = (src / "config.yaml").read_text()
    (src / "config.yaml").write_text(cfg.replace(str(cached_run[2]), str(tmp_path / "not-here")))
    run = tmp_path / "fresh"
    p = cli("train-student", run, "--student", student, *TRAIN, f"train_student.cache_from={src}", check=False)
    assert p.returncode == 2 and "not-here" in p.stderr and "train_student.cache_image_root" in p.stderr
    assert not (run / "train_student" / "checkpoints").exists()
