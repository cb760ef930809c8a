"""The prepared-sample memo (``stages/train_student/memo.py``): what it hands back equals what the student's processor
makes fresh, an image changed after it was memoised is still a reject, and a two-epoch run with the memo trains
exactly as the run without it."""
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import cli
from test_sample_images import image_copy, repaint


@pytest.fixture
def memo():
    from llavadi.stages.train_student.memo import MEMO

    MEMO.configure(64 << 20)
    yield MEMO
    MEMO.configure(0)  # the memo is this process's: leave it empty for the tests after this one


def micro_batch_equal(a: dict, b: dict) -> bool:
    same = a["sample_ids"] == b["sample_ids"] and a["inputs"].keys() == b["inputs"].keys()
    same = same and all(torch.equal(a["inputs"][k], b["inputs"][k]) for k in a["inputs"])
    return same and all(np.array_equal(a["sets"][s][k], b["sets"][s][k]) for s in a["sets"] for k in a["sets"][s])


def test_memoised_samples_equal_fresh_ones_and_a_changed_image_is_still_rejected(cached_run, tmp_path, memo):
    from llavadi.pipeline.config import load_config
    from llavadi.stages.train_student.batch import CollatePlan
    from llavadi.stages.train_student.data import StepDataset, stream_samples, student_tokens
    from llavadi.stages.train_student.terms import build_terms, row_sets

    run, student, root = cached_run
    new = image_copy(root, tmp_path / "imgs")
    st = student_tokens(str(student))
    terms = build_terms(load_config({}, []).train_student,
                        {"fields": [{"name": n} for n in ("topk_ids", "topk_logprobs", "hidden")]})
    ds = StepDataset(run, st, str(new), batch_size=1, micro_batch_size=1, rank=0, world=1, seed=0, epoch=0,
                     shuffle_buffer=1, plan=CollatePlan(tuple(row_sets(terms).items())))

    def first(n=4):
        return [it for it in stream_samples(run, st, image_root=str(new)) if it["row"]["image"]][:n]

    memo.configure(0)
    fresh = ds.collate(first())  # the processor on every sample, nothing memoised
    assert len(memo) == 0
    memo.configure(64 << 20)
    epoch1 = first()
    filled = ds.collate(epoch1)
    epoch2 = first()
    assert all(b["conv"] is a["conv"] for a, b in zip(epoch1, epoch2))  # the rendered conversations came back
    assert all(memo.get(it["encode_key"]) is not None for it in epoch2)  # and the processor outputs are held
    assert micro_batch_equal(fresh, filled) and micro_batch_equal(fresh, ds.collate(epoch2))
    repaint(new / epoch2[1]["row"]["image"])
    mb = ds.collate(epoch2)
    assert [(r["id"], r["reason"]) for r in mb["rejects"]] == [(epoch2[1]["id"], "image_changed")]
    assert mb["sample_ids"] == [epoch2[i]["id"] for i in (0, 2, 3)]


def test_two_epochs_with_the_memo_train_exactly_as_without(cached_run, tmp_path):
    from safetensors.torch import load_file

    runs = {}
    for name, mb in (("memo", 1024), ("off", 0)):
        run = tmp_path / name
        shutil.copytree(cached_run[0], run)
        cli("train-student", run, "--student", cached_run[1], "--executor", "local", "train_student.batch_size=4",
            "train_student.micro_batch_size=4", "train_student.epochs=2", "train_student.shuffle_buffer=8",
            f"train_student.sample_memo_mb={mb}")
        final = json.loads((run / "train_student" / "_stage.json").read_text())["final_checkpoint"]
        runs[name] = ((run / "train_student" / "metrics.jsonl").read_text().splitlines(),
                      load_file(run / "train_student" / "checkpoints" / final / "model.safetensors"))
    (m1, w1), (m0, w0) = runs["memo"], runs["off"]
    losses = lambda rows: [(r["step"], r["loss"], r["epoch"]) for r in map(json.loads, rows)]  # noqa: E731
    assert losses(m1) == losses(m0) and losses(m1)[-1][2] == 1  # the second epoch ran
    assert w1.keys() == w0.keys() and all(torch.equal(w1[k], w0[k]) for k in w1)
