"""Answer scoring against hand-computed cases (the VQA normalisation rules), and an end-to-end
``llavadi eval`` whose perplexity is checked against an independent computation."""
import json
import math

import pytest

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


def test_eval_end_to_end_perplexity_matches_independent_forward(tmp_path, tiny_teacher):
    """The teacher evaluated on its own held-out cache: KL to itself ≈ 0, and the perplexity
    equals exp(mean CE) recomputed here from an independent HF forward."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llavadi.stages.demo.synthetic_vqa import generate

    root = tmp_path / "held"
    test = generate(root, 8, seed=21, split="test")
    run = tmp_path / "run"
    cli("ingest", run, "--input", test, "--image-root", root, "--executor", "local")
    cli("cache-teacher", run, "--teacher", tiny_teacher, "--executor", "local", "cache_teacher.source=data",
        "cache_teacher.top_k=8")
    p = cli("eval", run, "--model", tiny_teacher, "--data", test, "--cache", run / "cache_teacher", "--name", "teacher",
            "eval.max_new_tokens=3")
    res = json.loads((run / "eval" / "teacher.json").read_text())
    assert "accuracy" in p.stdout and res["answers"]["questions"] == sum(
        len(r["conversations"]) // 2 for r in json.loads(test.read_text()))
    tc = res["teacher_cache"]
    assert tc["kl_to_teacher"] < 1e-3  # float16 hidden in the cache is the only difference
    proc = AutoProcessor.from_pretrained(tiny_teacher)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    for r in json.loads(test.read_text()):
        msgs = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in r["conversations"]]
        for t in range(len(msgs) // 2):
            prompt = proc.tokenizer.apply_chat_template(msgs[: 2 * t + 1], tokenize=False, add_generation_prompt=True)
            full = proc.tokenizer.apply_chat_template(msgs[: 2 * t + 2], tokenize=False)
            kw = {"images": [Image.open(root / r["image"]).convert("RGB")]} if "image" in r else {}
            a = proc(text=[prompt], return_tensors="pt", **kw)["input_ids"].shape[1]
            inp = proc(text=[full], return_tensors="pt", **kw)
            with torch.no_grad():
                logits = model(**inp).logits[0].double()
            ids = inp["input_ids"][0]
            lp = torch.log_softmax(logits[a - 1:-1], -1).gather(1, ids[a:, None])
            nll -= float(lp.sum())
            n += len(ids) - a
    assert tc["answer_tokens"] == n
    assert tc["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_eval_refuses_without_inputs(tmp_path, tiny_teacher):
    p = cli("eval", tmp_path / "r", "--model", tiny_teacher, check=False)
    assert p.returncode == 2 and "nothing to evaluate" in p.stderr
