"""The demo's shipped teacher (assets/demo_teacher), its small vocabulary and its builder (issue #14).

Golden values are independent of the code under test: sha256 by hashlib over the files, the
prompt string written here by hand, the teacher's accuracy recomputed with a plain transformers
``generate`` loop, vLLM's greedy tokens against transformers'."""
import hashlib
import json
import re

import pytest
import torch
from conftest import vllm_greedy

from llavadi.models.prompts import LLAVA_V1_SYSTEM
from llavadi.stages.demo.teacher_builder import ASSET_DIR, CARD

HAND_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
               "detailed, and polite answers to the user's questions. USER: <image>\nHow many shapes are there? "
               "ASSISTANT: two</s>USER: Is there a red circle? ASSISTANT:")


def test_demo_vocabulary_is_small_deterministic_and_llama_shaped(tmp_path):
    from llavadi.stages.demo.synthetic_vqa import corpus_lines
    from llavadi.stages.demo.vocab import build_demo_tokenizer

    a, b = build_demo_tokenizer(LLAVA_V1_SYSTEM), build_demo_tokenizer(LLAVA_V1_SYSTEM)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert len(a) <= 512
    assert a.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert a.pad_token == "<pad>" and a.convert_tokens_to_ids("<image>") == len(a) - 2
    ids = a("How many shapes are there?").input_ids
    assert ids[0] == 1 and ids.count(1) == 1  # one BOS, like LLaMA
    for line in corpus_lines() + [LLAVA_V1_SYSTEM, "Any ASCII text ~ still: tokenises {ok}"]:
        enc = a(line, add_special_tokens=False).input_ids
        assert 0 not in enc, line  # no <unk>
        assert a.decode(enc) == line
    # every demo answer word is one token (answers are what the student is scored on)
    for word in ["red", "circle", "triangle", "four", "yes", "left", "bottom"]:
        assert len(a(" " + word, add_special_tokens=False).input_ids) <= 2


def test_shipped_teacher_card_files_and_size():
    card = (ASSET_DIR / CARD).read_text()
    listed = dict(re.findall(r"\| `([^`]+)` \| `([0-9a-f]{64})` \|", card))
    files = {p.name for p in ASSET_DIR.iterdir() if p.is_file()}
    assert set(listed) == files - {CARD} and "model.safetensors" in listed
    for name, digest in listed.items():
        assert hashlib.sha256((ASSET_DIR / name).read_bytes()).hexdigest() == digest, name
    assert sum((ASSET_DIR / f).stat().st_size for f in files) <= 10 * 2**20
    assert re.search(r"\*\*([0-9.]+) %\*\*", card), card
    for what in ("teacher_builder", "Training time", "steps"):
        assert what in card


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return (AutoProcessor.from_pretrained(ASSET_DIR),
            LlavaForConditionalGeneration.from_pretrained(ASSET_DIR, dtype=torch.float32).eval())


def test_shipped_teacher_renders_llava_v1_with_llava_system_text(shipped):
    proc, model = shipped
    msgs = [{"role": "user", "content": "<image>\nHow many shapes are there?"}, {"role": "assistant", "content": "two"},
            {"role": "user", "content": "Is there a red circle?"}]
    assert proc.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == HAND_PROMPT
    assert model.config.text_config.vocab_size <= 512


def _heldout(tmp_path, n):
    from llavadi.stages.demo.synthetic_vqa import generate
    from llavadi.stages.demo.teacher_builder import TEACHER_DATA_SEED

    path = generate(tmp_path, n, seed=TEACHER_DATA_SEED, split="teacher_heldout")
    return json.loads(path.read_text())


def test_shipped_teacher_answers_heldout_questions(tmp_path, shipped):
    """Accuracy recomputed here with plain transformers generation on the builder's held-out split
    (first turns only): the card's claim holds, within the sampling noise of 150 questions
    (binomial sd ≈ 3.3 points at 80 %; 3 sd allowed)."""
    from PIL import Image

    proc, model = shipped
    recs = _heldout(tmp_path, 150)
    right = 0
    for r in recs:
        q, ref = r["conversations"][0]["value"], r["conversations"][1]["value"]
        prompt = proc.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                    add_generation_prompt=True)
        kw = {"images": [Image.open(tmp_path / r["image"]).convert("RGB")]} if r.get("image") else {}
        inp = proc(text=[prompt], return_tensors="pt", **kw)
        with torch.no_grad():
            out = model.generate(**inp, max_new_tokens=6, do_sample=False)
        pred = proc.tokenizer.decode(out[0, inp["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        right += pred == ref
    claimed = float(re.search(r"\*\*([0-9.]+) %\*\*", (ASSET_DIR / CARD).read_text()).group(1)) / 100
    assert abs(right / len(recs) - claimed) <= 0.10 and right / len(recs) >= 0.7, (right, claimed)


@pytest.mark.vllm
def test_shipped_teacher_greedy_same_in_vllm(tmp_path, shipped):
    from PIL import Image

    proc, model = shipped
    recs = [r for r in _heldout(tmp_path, 12) if r.get("image")][:5]
    items, hf = [], []
    for r in recs:
        prompt = proc.tokenizer.apply_chat_template([{"role": "user", "content": r["conversations"][0]["value"]}],
                                                    tokenize=False, add_generation_prompt=True)
        items.append({"prompt": prompt, "image": str(tmp_path / r["image"])})
        inp = proc(text=[prompt], images=[Image.open(tmp_path / r["image"]).convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inp, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        hf.append(out[0, inp["input_ids"].shape[1]:].tolist())
    assert vllm_greedy(ASSET_DIR, items, 4, tmp_path) == hf
    assert len({tuple(x) for x in hf}) > 1


def test_builder_smoke_through_the_demo_entry_point(tmp_path):
    """``llavadi demo --rebuild-teacher`` at smoke size: a teacher with a card whose sha256s match,
    loadable by transformers, with the demo vocabulary; a rerun reuses it."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from llavadi.stages.demo.run import PROFILES, demo_teacher

    out = demo_teacher(tmp_path, PROFILES["smoke"], True, "local")
    assert out == tmp_path / "teacher"
    card = (out / CARD).read_text()
    listed = dict(re.findall(r"\| `([^`]+)` \| `([0-9a-f]{64})` \|", card))
    assert "model.safetensors" in listed and "tokenizer.json" in listed
    for name, digest in listed.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    LlavaForConditionalGeneration.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(ASSET_DIR).get_vocab()
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    demo_teacher(tmp_path, PROFILES["smoke"], True, "local")
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_missing_shipped_teacher_names_the_fix(tmp_path, monkeypatch):
    from llavadi.pipeline.runner import StageError
    from llavadi.stages.demo import run, teacher_builder

    monkeypatch.setattr(teacher_builder, "ASSET_DIR", tmp_path / "nowhere")
    with pytest.raises(StageError, match="--rebuild-teacher"):
        run.demo_teacher(tmp_path, run.PROFILES["default"], False, "local")
