"""Answer scoring against hand-computed cases (the VQA normalisation rules); held-out data read
through ingest's validator (rejects counted, a stubbed model's answers scored by hand), LLaVA
question files, ``--data`` / ``--cache`` each alone with its own image root, and a perplexity
checked against an independent computation."""
import json
import math
import shutil
from pathlib import Path

import pytest

from llavadi.pipeline.config import load_config
from llavadi.stages import eval as ev
from llavadi.stages.eval import normalize_answer, vqa_accuracy

from conftest import cli


@pytest.mark.parametrize("raw,norm", [
    ("Two", "2"),
    (" The red circle. ", "red circle"),
    ("an apple", "apple"),
    ("A dog!", "dog"),
    ("dont know", "don't know"),
    ("yes, it is", "yes it is"),
    ("1,000", "1000"),
    ("3.5", "3.5"),
    ("top-left", "top left"),
    ("zero", "0"),
    ("TEN", "10"),
    ("what's that?", "what's that"),
])
def test_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


def test_accuracy_cases():
    assert vqa_accuracy("Two.", ["two"]) == 1.0
    assert vqa_accuracy("2", ["two"]) == 1.0
    assert vqa_accuracy("the red square", ["red square"]) == 1.0
    assert vqa_accuracy("red", ["red square"]) == 0.0
    # VQA's 10-annotator rule: min(matches / 3, 1)
    refs = ["red", "red", "blue", "red", "green", "blue", "red", "red", "red", "red"]
    assert vqa_accuracy("Red", refs) == 1.0
    assert vqa_accuracy("blue", refs) == pytest.approx(2 / 3)
    assert vqa_accuracy("green", refs) == pytest.approx(1 / 3)
    assert vqa_accuracy("purple", refs) == 0.0



# --------------------------------------------------------------------------- helpers


def _images(synth) -> tuple[Path, str, str]:
    """(image root, two image paths relative to it) from the session's synthetic set."""
    train, root = synth
    rels = [r["image"] for r in json.loads(train.read_text()) if r.get("image")][:2]
    return root, rels[0], rels[1]


def _cfg(**eval_keys):
    return load_config({"eval": {k: (str(v) if isinstance(v, Path) else v) for k, v in eval_keys.items()}})


@pytest.fixture
def stub_answers(monkeypatch):
    """The model answers "Red." to every question; records the questions it was asked."""
    asked = []

    def fake(model_dir, cfg, qs):
        asked.extend(qs)
        return qs, ["Red."] * len(qs), 0.0, []

    monkeypatch.setattr(ev, "generate_answers", fake)
    return asked


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- held-out data


def test_rejects_system_turn_and_missing_image_rest_scored(tmp_path, synth, stub_answers):
    root, a, b = _images(synth)
    held = tmp_path / "held.json"
    held.write_text(json.dumps([
        {"id": "g1", "image": a, "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                   {"from": "gpt", "value": "red"}]},
        {"id": "sys", "image": a, "conversations": [{"from": "system", "value": "Answer briefly."},
                                                    {"from": "human", "value": "<image>\nWhat colour?"},
                                                    {"from": "gpt", "value": "red"}]},
        {"id": "g2", "image": b, "conversations": [{"from": "human", "value": "<image>\nHow many?"},
                                                   {"from": "gpt", "value": "two"},
                                                   {"from": "human", "value": "And the shape?"},
                                                   {"from": "gpt", "value": "Red circle"}]},
        {"id": "gone", "image": "images/none/missing.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]},
        {"id": "g3", "conversations": [{"from": "human", "value": "Say it."}, {"from": "gpt", "value": "Red."}]},
    ]))
    run = tmp_path / "run"
    res = ev.evaluate(run, _cfg(data=held, image_root=root), "models/stub", "m")
    a_ = res["answers"]
    # 4 questions from g1, g2 (2 turns), g3; "Red." vs refs red / two / red circle / Red.
    assert (a_["questions"], a_["scored"]) == (4, 4)
    assert a_["accuracy"] == pytest.approx(2 / 4) and a_["exact_match"] == pytest.approx(1 / 4)
    assert a_["rejected"] == 2 and a_["rejects"] == {"bad_roles": 1, "missing_image": 1}
    rej = [json.loads(x) for x in (run / "eval" / "m.rejects.jsonl").read_text().splitlines()]
    assert {(r["id"], r["reason"]) for r in rej} == {("sys", "bad_roles"), ("gone", "missing_image")}
    assert "system" in next(r["detail"] for r in rej if r["id"] == "sys")
    # the second turn of g2 is asked with the reference history before it
    assert [len(q.history) for q in stub_answers] == [1, 1, 3, 1]
    assert stub_answers[2].history[1]["value"] == "two"
    ans = [json.loads(x) for x in (run / "eval" / "m.answers.jsonl").read_text().splitlines()]
    assert [x["question_id"] for x in ans] == ["g1#0", "g2#0", "g2#1", "g3#0"]
    assert ans[0]["prompt"] == "What colour?" and ans[0]["text"] == "Red." and ans[0]["model_id"] == "m"
    assert json.loads((run / "eval" / "m.json").read_text())["answers"]["rejects"] == a_["rejects"]
    text = ev.summary(res, run)
    assert "accuracy 0.500" in text and "2 rejected (bad_roles 1, missing_image 1)" in text and "KL" not in text


def test_llava_question_file(tmp_path, synth, stub_answers):
    """LLaVA's eval format (model_vqa.py): JSONL of question_id/image/text[/category]; references
    in `answer` or VQA-style `answers`; a question without one is answered, not scored."""
    root, a, b = _images(synth)
    vqa = ["red", "red", "blue", "blue", "green", "blue", "blue", "blue", "blue", "blue"]
    q = _jsonl(tmp_path / "questions.jsonl", [
        {"question_id": 101, "image": a, "text": "What colour?", "category": "color", "answer": "red"},
        {"question_id": 102, "image": b, "text": "Which colour?", "answers": [{"answer": x} for x in vqa]},
        {"question_id": 103, "text": "Text only?", "answer": "blue"},
        {"question_id": 104, "image": "images/none/missing.png", "text": "What?", "answer": "red"},
        {"question_id": 105, "image": a, "text": "Describe it."},
    ])
    run = tmp_path / "run"
    res = ev.evaluate(run, _cfg(data=q, image_root=root), "models/stub", "m")
    a_ = res["answers"]
    # "Red." → 101: 1, 102: 2 of 10 annotators said red → 2/3, 103: 0; 104 rejected; 105 unscored
    assert (a_["questions"], a_["scored"], a_["rejected"]) == (4, 3, 1)
    assert a_["accuracy"] == pytest.approx((1 + 2 / 3 + 0) / 3) and a_["exact_match"] == 0.0
    assert stub_answers[0].history[0]["value"] == "<image>\nWhat colour?"  # as model_vqa.py builds it
    assert stub_answers[2].history[0]["value"] == "Text only?" and stub_answers[2].image is None
    ans = [json.loads(x) for x in (run / "eval" / "m.answers.jsonl").read_text().splitlines()]
    assert [x["question_id"] for x in ans] == [101, 102, 103, 105]
    assert set(ans[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert ans[0]["prompt"] == "What colour?" and ans[0]["metadata"]["category"] == "color"
    assert "references" not in ans[3]["metadata"]
    assert "on 3 questions (of 4 answered)" in ev.summary(res, run)

    # no reference anywhere: answers only, and no score is claimed
    q2 = _jsonl(tmp_path / "noref.jsonl", [{"question_id": 1, "image": a, "text": "What colour?"},
                                          {"question_id": 2, "image": b, "text": "How many?"}])
    res = ev.evaluate(run, _cfg(data=q2, image_root=root), "models/stub", "m2")
    assert res["answers"]["questions"] == 2 and res["answers"]["scored"] == 0
    assert "accuracy" not in res["answers"] and "no score" in ev.summary(res, run)
    assert len((run / "eval" / "m2.answers.jsonl").read_text().splitlines()) == 2


def test_all_bad_file_refused_with_reasons(tmp_path, synth, stub_answers, tiny_teacher):
    from typer.testing import CliRunner

    from llavadi.cli import app

    root, a, _ = _images(synth)
    bad = _jsonl(tmp_path / "bad.jsonl", [
        {"id": "s", "conversations": [{"from": "system", "value": "x"}, {"from": "human", "value": "q"},
                                      {"from": "gpt", "value": "a"}]},
        {"id": "m", "image": "images/none/missing.png",
         "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
        {"question_id": 7, "image": a},  # a question record without text
    ])
    with open(bad, "a") as f:
        f.write("{not json\n")
    with pytest.raises(ev.EvalError, match=r"4 records read, 4 rejected .*bad_question 1.*bad_roles 1.*"
                                           r"malformed_json 1.*missing_image 1"):
        ev.evaluate(tmp_path / "run", _cfg(data=bad, image_root=root), "models/stub", "m")
    assert not stub_answers and not (tmp_path / "run" / "eval" / "m.json").exists()
    assert len((tmp_path / "run" / "eval" / "m.rejects.jsonl").read_text().splitlines()) == 4

    model = tiny_teacher  # a real model: eval's preflight refuses a directory of no supported family
    # a LLaVA conversation file with no record at all: also refused, not "accuracy 0.0"
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    for data, expect in ((bad, "4 rejected"), (empty, "0 records read")):
        r = CliRunner().invoke(app, ["eval", str(tmp_path / "run"), "--model", str(model), "--data", str(data),
                                     "--image-root", str(root)])
        assert r.exit_code == 2 and "can be scored" in r.output and expect in r.output, r.output


# --------------------------------------------------------------------------- image roots, --cache


def test_cache_image_root_defaults_to_the_cache_runs_own(tmp_path, cached_run):
    run, _, root = cached_run
    cache = run / "cache_teacher"
    assert ev.cache_image_root(_cfg(cache=cache, image_root=tmp_path)) == (
        str(root), f"ingest.image_root of {run / 'config.yaml'}")
    assert ev.cache_image_root(_cfg(cache=cache, cache_image_root=tmp_path))[0] == str(tmp_path)
    # a wrong image root: missing images and same-named but different images are rejects (the check every
    # stage shares, schemas.samples.sample_image; per stage: tests/test_sample_images.py)
    from llavadi.schemas.samples import Reject, sample_image

    row = next(r for r in json.loads((root / "train.json").read_text()) if r.get("image"))
    good = {"image": row["image"], "image_sha256": __import__("hashlib").sha256(
        (root / row["image"]).read_bytes()).hexdigest()}
    assert sample_image(str(root), good, decode=False) is None
    with pytest.raises(Reject, match="missing_image"):
        sample_image(str(tmp_path), good, decode=False)
    (tmp_path / row["image"]).parent.mkdir(parents=True)
    (tmp_path / row["image"]).write_bytes(b"other")
    with pytest.raises(Reject, match="image_changed"):
        sample_image(str(tmp_path), good, decode=False)


def test_data_and_cache_each_with_its_own_image_root(tmp_path, synth, cached_run, stub_answers):
    """--data's images under one root, the cache's under its own run's root (another folder)."""
    run, student, cached_root = cached_run
    root, a, _ = _images(synth)
    assert root != cached_root
    held = _jsonl(tmp_path / "held.jsonl", [
        {"id": "x", "image": a, "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                  {"from": "gpt", "value": "red"}]},
        {"id": "y", "image": a, "conversations": [{"from": "human", "value": "<image>\nHow many?"},
                                                  {"from": "gpt", "value": "three"}]}])
    res = ev.evaluate(tmp_path / "r", _cfg(data=held, image_root=root, cache=run / "cache_teacher"), str(student), "s")
    assert res["answers"]["questions"] == 2 and res["answers"]["accuracy"] == pytest.approx(1 / 2)
    c = res["teacher_cache"]
    assert c["cache_samples"] == 24 and c["cache_rejected"] == 0 and c["image_root"] == str(cached_root)
    assert c["kl_to_teacher"] > 0 and math.isfinite(c["perplexity"]) and "problems" not in res
    text = ev.summary(res, tmp_path / "r")
    assert "accuracy 0.500" in text and "KL to teacher" in text and "24 samples" in text


def test_data_alone_cli_readme_example_and_cache_alone_perplexity(tmp_path, tiny_teacher, cached_run):
    """`llavadi eval RUN --model DIR --data heldout.json` (the README's example, images from
    RUN's ingest.image_root) prints accuracy and no KL; `--cache` alone: the teacher on its own
    cache has KL ≈ 0, and its perplexity equals exp(mean CE) of an independent HF forward."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    run, _, root = cached_run
    held = root / "train.json"
    r1 = tmp_path / "r1"
    r1.mkdir()
    shutil.copy(run / "config.yaml", r1 / "config.yaml")  # a run whose ingest.image_root is root
    p = cli("eval", r1, "--model", tiny_teacher, "--data", held, "--name", "teacher", "eval.max_new_tokens=2",
            "eval.max_samples=5")
    res = json.loads((r1 / "eval" / "teacher.json").read_text())
    assert res["answers"]["questions"] == 5 and 0.0 <= res["answers"]["accuracy"] <= 1.0
    assert "teacher_cache" not in res and "accuracy" in p.stdout and "KL" not in p.stdout
    assert len((r1 / "eval" / "teacher.answers.jsonl").read_text().splitlines()) == 5

    # --cache alone, in-process, with an --image-root that is not the cache's (it must not be used)
    other = tmp_path / "other"
    other.mkdir()
    res = ev.evaluate(tmp_path / "r2", _cfg(cache=run / "cache_teacher", image_root=other), str(tiny_teacher), "t")
    assert "answers" not in res and "accuracy" not in ev.summary(res, tmp_path / "r2")
    assert not (tmp_path / "r2" / "eval" / "t.rejects.jsonl").exists()
    tc = res["teacher_cache"]
    assert tc["cache_samples"] == 24 and tc["kl_to_teacher"] < 1e-3  # float16 hidden in the cache only
    proc = AutoProcessor.from_pretrained(tiny_teacher)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    for r in json.loads(held.read_text()):
        msgs = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in r["conversations"]]
        kw = {"images": [Image.open(root / r["image"]).convert("RGB")]} if "image" in r else {}
        for t in range(len(msgs) // 2):
            prompt = proc.tokenizer.apply_chat_template(msgs[: 2 * t + 1], tokenize=False, add_generation_prompt=True)
            full = proc.tokenizer.apply_chat_template(msgs[: 2 * t + 2], tokenize=False)
            a = proc(text=[prompt], return_tensors="pt", **kw)["input_ids"].shape[1]
            inp = proc(text=[full], return_tensors="pt", **kw)
            with torch.no_grad():
                logits = model(**inp).logits[0].double()
            ids = inp["input_ids"][0]
            nll -= float(torch.log_softmax(logits[a - 1:-1], -1).gather(1, ids[a:, None]).sum())
            n += len(ids) - a
    assert tc["answer_tokens"] == n
    assert tc["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_eval_refuses_without_inputs(tmp_path, tiny_teacher):
    p = cli("eval", tmp_path / "r", "--model", tiny_teacher, check=False)
    assert p.returncode == 2 and "nothing to evaluate" in p.stderr


def test_a_question_the_model_cannot_take_is_a_reject_the_rest_answered(tmp_path, tiny_teacher, monkeypatch):
    """One question the engine fails on (model_error) and one whose text holds the tokenizer's own
    '</s>' (special_token_in_text) are rejected with their ids; the other two are answered and scored."""
    from llavadi.models.engines.generate import HFEngine

    real = HFEngine.generate

    def poisoned(self, reqs, s):
        if any("POISON" in r.prompt for r in reqs):
            raise RuntimeError("cannot take the poisoned question")
        return real(self, reqs, s)

    monkeypatch.setattr(HFEngine, "generate", poisoned)
    held = tmp_path / "held.json"
    qa = lambda i, q: {"id": i, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "x"}]}  # noqa: E731
    held.write_text(json.dumps([qa("ok1", "Say x."), qa("bad", "POISON x."), qa("lit", "Is </s> a token?"),
                                qa("ok2", "Say x again.")]))
    cfg = _cfg(data=held, max_new_tokens=2)
    cfg.ingest.image_root = str(tmp_path)
    res = ev.evaluate(tmp_path / "run", cfg, str(tiny_teacher), name="t")
    a = res["answers"]
    assert a["questions"] == 2 and a["scored"] == 2 and a["rejects"] == {"model_error": 1, "special_token_in_text": 1}
    rej = [json.loads(x) for x in (tmp_path / "run" / "eval" / "t.rejects.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["reason"]) for r in rej) == [("bad", "model_error"), ("lit", "special_token_in_text")]
