"""Qwen2-VL and Qwen2.5-VL through llavadi's family layer (issue #12), on tiny checkpoints in the
published hub layout (tests/families/qwen2_vl.py).

Every expected value here is independent of the code under test: prompt strings and answer texts
are written by hand, image-token counts are worked out by hand from the image processor's rule
(``smart_resize``: sides rounded to multiples of 28 px, one token per 28×28), and the reference
forward is built only from the processor's own outputs (``apply_chat_template`` → ``processor(...)``
→ ``model(**inputs)``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from families.qwen2_vl import CASES

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
VISION = "<|vision_start|><|image_pad|><|vision_end|>"

# (size (w, h), image tokens: (h/28)·(w/28) after rounding each side to a multiple of 28 px)
SQUARE, WIDE, TALL = ((56, 56), 4), ((84, 56), 6), ((40, 64), 2)  # 40×64 → 28×56: 1×2 merged tokens


def _image(size, seed):
    rng = np.random.default_rng(seed)
    w, h = size
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# rows: (name, LLaVA turns, image, hand-written rendered conversation, hand-written answers)
def _rows():
    return [
        ("image_square",
         [{"from": "human", "value": "<image>\nWhat is shown in this image?"},
          {"from": "gpt", "value": "A red cat on a table."}],
         SQUARE,
         SYSTEM + "<|im_start|>user\n" + VISION + "What is shown in this image?<|im_end|>\n"
         "<|im_start|>assistant\nA red cat on a table.<|im_end|>\n",
         ["A red cat on a table.<|im_end|>"]),
        ("text_only",
         [{"from": "human", "value": "What is 2 + 3?"}, {"from": "gpt", "value": "2 + 3 is 5."}],
         None,
         SYSTEM + "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n2 + 3 is 5.<|im_end|>\n",
         ["2 + 3 is 5.<|im_end|>"]),
        ("image_wide_two_turns",  # <image> at the END of the first human turn: moved to the front
         [{"from": "human", "value": "What color is the cat?\n<image>"},
          {"from": "gpt", "value": "The cat is red."},
          {"from": "human", "value": "How many cats are there?"},
          {"from": "gpt", "value": "There is one cat."}],
         WIDE,
         SYSTEM + "<|im_start|>user\n" + VISION + "What color is the cat?<|im_end|>\n"
         "<|im_start|>assistant\nThe cat is red.<|im_end|>\n"
         "<|im_start|>user\nHow many cats are there?<|im_end|>\n"
         "<|im_start|>assistant\nThere is one cat.<|im_end|>\n",
         ["The cat is red.<|im_end|>", "There is one cat.<|im_end|>"]),
        ("image_tall_system",
         [{"from": "system", "value": "Answer briefly."},
          {"from": "human", "value": "<image>\nDescribe the image."},
          {"from": "gpt", "value": "Two children play with a ball."}],
         TALL,
         "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n" + VISION + "Describe the image.<|im_end|>\n"
         "<|im_start|>assistant\nTwo children play with a ball.<|im_end|>\n",
         ["Two children play with a ball.<|im_end|>"]),
    ]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{case: {"teacher": dir, "student": dir}} built once for the module."""
    root = tmp_path_factory.mktemp("qwen_vl")
    return {case: {role: build(root / f"{case}_{role}", role) for role in ("teacher", "student")}
            for case, build in CASES.items()}


@pytest.fixture(scope="module")
def loaded(models):
    """{(case, role): (model, adapter)} loaded once (fp32, eval)."""
    from transformers import AutoModelForImageTextToText

    from llavadi.models.adapter import ModelAdapter

    out = {}
    for case, dirs in models.items():
        for role, d in dirs.items():
            m = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32).eval()
            out[case, role] = (m, ModelAdapter(d, "auto"))
    return out


CASE_NAMES = list(CASES)


def tc_id(d, token):
    """Id of ``token`` in ``d``'s tokenizer.json (added tokens)."""
    return next(t["id"] for t in json.loads((d / "tokenizer.json").read_text())["added_tokens"] if t["content"] == token)


# ---------------------------------------------------------------------------------------------- layout

@pytest.mark.parametrize("case", CASE_NAMES)
def test_published_layout(models, case):
    d = models[case]["teacher"]
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
            "chat_template.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"} <= names
    tc = json.loads((d / "tokenizer_config.json").read_text())
    assert tc["eos_token"] == "<|im_end|>" and tc["pad_token"] == "<|endoftext|>" and tc.get("bos_token") is None
    tpl = json.loads((d / "chat_template.json").read_text())["chat_template"]
    assert tc["chat_template"] == tpl and "Picture {{ image_count.value }}: {% endif %}" + VISION in tpl
    assert json.loads((d / "config.json").read_text())["model_type"] == case
    pp = json.loads((d / "preprocessor_config.json").read_text())
    assert (pp["min_pixels"], pp["max_pixels"], pp["patch_size"], pp["merge_size"]) == (28 * 28, 28 * 28 * 16, 14, 2)
    gc = json.loads((d / "generation_config.json").read_text())
    assert sorted(gc["eos_token_id"]) == sorted([tc_id(d, "<|im_end|>"), tc_id(d, "<|endoftext|>")])
    # teacher and student share one tokenizer; both families the ids of every token they have in common
    from transformers import AutoTokenizer

    v = {(c, r): AutoTokenizer.from_pretrained(models[c][r]).get_vocab() for c in CASE_NAMES for r in ("teacher", "student")}
    assert v[case, "teacher"] == v[case, "student"]
    a, b = v[CASE_NAMES[0], "teacher"], v[CASE_NAMES[1], "teacher"]
    assert all(b[t] == i for t, i in a.items())


# ---------------------------------------------------------------------------------------------- (a) spans

@pytest.mark.parametrize("case", CASE_NAMES)
def test_conversation_and_encode_find_the_answers(loaded, case):
    _, ad = loaded[case, "teacher"]
    tok = ad.tokenizer
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    for i, (name, turns, img, text, answers) in enumerate(_rows()):
        image = _image(img[0], i) if img else None
        conv = ad.conversation(turns, image is not None)
        assert conv.text == text, name
        enc = ad.encode(conv, image)
        assert enc.ids.count(image_pad) == (img[1] if img else 0), name
        got = [tok.decode(enc.ids[a:b]) for a, b in enc.spans]
        assert got == answers, name
        assert tok.decode(enc.answer_ids) == "".join(answers)
        # the forward inputs the family declares, with the shapes the model takes
        keys = {"input_ids", "attention_mask", "mm_token_type_ids"} | ({"pixel_values", "image_grid_thw"} if image else set())
        assert set(enc.inputs) == keys, name
        assert enc.inputs["input_ids"].reshape(-1).tolist() == enc.ids
        assert enc.inputs["mm_token_type_ids"].reshape(-1).tolist() == [int(t == image_pad) for t in enc.ids]
        if image is not None:
            t, h, w = enc.inputs["image_grid_thw"].reshape(-1).tolist()
            assert (t, h * w // 4) == (1, img[1]) and enc.inputs["pixel_values"].shape == (h * w, 3 * 2 * 14 * 14)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_placeholder_in_llava_v1_format(models, case):
    """llava_v1 writes the family's placeholder text: all three tokens, expanded by the processor."""
    from llavadi.models.adapter import ModelAdapter

    ad = ModelAdapter(models[case]["teacher"], "llava_v1")
    turns = [{"from": "human", "value": "<image>\nWhat is shown in this image?"},
             {"from": "gpt", "value": "A red cat on a table."}]
    conv = ad.conversation(turns, True)
    assert conv.text == ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                         "helpful, detailed, and polite answers to the user's questions. USER: " + VISION +
                         "\nWhat is shown in this image? ASSISTANT: A red cat on a table.<|im_end|>")
    enc = ad.encode(conv, _image(WIDE[0], 0))
    assert enc.ids.count(ad.tokenizer.convert_tokens_to_ids("<|image_pad|>")) == WIDE[1]
    # the prompt ends with "ASSISTANT:"; with a byte-level BPE the space before the answer is the start of the
    # answer's first token (Qwen's vocabulary has "ĠA"), so it is part of what the model generates
    assert [ad.tokenizer.decode(enc.ids[a:b]) for a, b in enc.spans] == [" A red cat on a table.<|im_end|>"]


# ---------------------------------------------------------------------------------------------- (b) forward

def _reference(model, processor, turns, image):
    """Independent teacher forward: messages written from the LLaVA turns by hand (structured content,
    image first in the first user turn), the processor's own chat template and call. Returns
    (answer positions, answer ids, last hidden state [L, H], logits [L, V]) of the single sample."""
    msgs = []
    for t in turns:
        role = {"human": "user", "gpt": "assistant", "system": "system"}[t["from"]]
        text = t["value"].replace("<image>", "").strip()
        content = [{"type": "text", "text": text}]
        if image is not None and "<image>" in t["value"]:
            content.insert(0, {"type": "image"})
        msgs.append({"role": role, "content": content})
    text = processor.apply_chat_template(msgs, tokenize=False)
    kw = {"images": [image]} if image is not None else {}
    inputs = processor(text=[text], return_tensors="pt", **kw)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    ids = inputs["input_ids"][0].tolist()
    tok = processor.tokenizer
    head = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    answers = [t["value"] for t in turns if t["from"] == "gpt"]
    starts = [i + len(head) for i in range(len(ids)) if ids[i:i + len(head)] == head]
    pos, aids = [], []
    for s, a in zip(starts, answers):  # each answer follows its "<|im_start|>assistant\n"
        a_ids = tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert ids[s:s + len(a_ids)] == a_ids
        pos += [p - 1 for p in range(s, s + len(a_ids))]
        aids += a_ids
    return pos, aids, out.hidden_states[-1][0], out.logits[0]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_batched_forward_equals_processor_forward(loaded, case):
    model, ad = loaded[case, "teacher"]
    rows = _rows()
    images = [_image(img[0], i) if img else None for i, (_, _, img, _, _) in enumerate(rows)]
    encs = [ad.encode(ad.conversation(turns, im is not None), im) for (_, turns, *_), im in zip(rows, images)]
    batch = ad.collate([e.inputs for e in encs])
    L = max(len(e.ids) for e in encs)
    assert batch["input_ids"].shape == (len(rows), L) and len({len(e.ids) for e in encs}) > 1  # really padded
    assert batch["attention_mask"].sum(1).tolist() == [len(e.ids) for e in encs]
    assert batch["image_grid_thw"].shape == (3, 3)  # the three image rows, in order
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    for r, ((name, turns, *_), im, enc) in enumerate(zip(rows, images, encs)):
        pos, aids, h_ref, l_ref = _reference(model, ad.processor, turns, im)
        assert enc.positions == pos and enc.answer_ids == aids, name
        h = out.hidden_states[-1][r, enc.positions]
        lg = out.logits[r, enc.positions]
        torch.testing.assert_close(h, h_ref[pos], rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(lg, l_ref[pos], rtol=0, atol=1e-5, msg=name)


def test_mm_token_type_ids_matter(loaded):
    """Without ``mm_token_type_ids`` the image rows' positions would be plain 1-D ones: the model refuses,
    which is why the family forwards it."""
    model, ad = loaded[CASE_NAMES[0], "teacher"]
    _, turns, img, _, _ = _rows()[0]
    enc = ad.encode(ad.conversation(turns, True), _image(img[0], 0))
    inputs = {k: v for k, v in enc.inputs.items() if k != "mm_token_type_ids"}
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        model(**inputs)


# ---------------------------------------------------------------------------------------------- (c) groups

@pytest.mark.parametrize("role", ["teacher", "student"])
@pytest.mark.parametrize("case", CASE_NAMES)
def test_parameter_groups(loaded, case, role):
    model, ad = loaded[case, role]
    g = {k: set(ad.family.group_params(model, k)) for k in ("vision", "projector", "lm")}
    assert all(g.values())
    assert not (g["vision"] & g["projector"]) and not (g["vision"] & g["lm"]) and not (g["projector"] & g["lm"])
    assert g["vision"] | g["projector"] | g["lm"] == {n for n, _ in model.named_parameters()}  # nothing left out
    assert "model.visual.patch_embed.proj.weight" in g["vision"] and "model.visual.blocks.0.attn.qkv.weight" in g["vision"]
    assert {n for n in g["projector"]} == {n for n, _ in model.named_parameters() if n.startswith("model.visual.merger.")}
    assert "model.language_model.embed_tokens.weight" in g["lm"] and "model.language_model.norm.weight" in g["lm"]
    assert ("lm_head.weight" in g["lm"]) == (role == "teacher")  # the student ties lm_head to the embeddings


# ---------------------------------------------------------------------------------------------- (d) save

@pytest.mark.parametrize("role", ["teacher", "student"])
@pytest.mark.parametrize("case", CASE_NAMES)
def test_save_reloads_bit_identical(models, loaded, tmp_path, case, role):
    from transformers import AutoModelForImageTextToText

    from llavadi.models import family_of

    _, ad = loaded[case, role]
    model = AutoModelForImageTextToText.from_pretrained(models[case][role], dtype=torch.float32)
    # a changed model (as after training), so a reload that re-initialises anything cannot pass
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    family_of(models[case][role]).save(model, ad.processor, tmp_path / "saved")
    re = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    want, got = dict(model.named_parameters()), dict(re.named_parameters())
    assert set(got) == set(want)
    bad = [n for n in want if not torch.equal(got[n], want[n])]
    assert not bad, bad[:5]
    assert any(n.startswith("model.visual.blocks.") for n in got) and any(".visual.merger." in n for n in got)
    assert oct((tmp_path / "saved" / "model.safetensors").stat().st_mode & 0o777) == "0o644"
    if role == "student":  # tied: lm_head is the embedding matrix after the reload too
        assert re.lm_head.weight.data_ptr() == re.model.language_model.embed_tokens.weight.data_ptr()
    else:
        assert not torch.equal(re.lm_head.weight, re.model.language_model.embed_tokens.weight)


# ---------------------------------------------------------------------------------------------- (e) vLLM

# One engine start per family: Qwen2-VL serves the teacher in the published layout (untied lm_head, as the
# 7B checkpoints), Qwen2.5-VL the student as ``family.save`` writes it after a training-like change (tied
# embeddings, as the 2B/3B checkpoints) — together both layouts and both lm_head kinds, in both vLLM models.
@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("case,role", [("qwen2_vl", "teacher"), ("qwen2_5_vl", "student")])
def test_vllm_greedy_equals_hf(models, loaded, tmp_path, case, role):
    from transformers import AutoModelForImageTextToText

    from llavadi.models.adapter import vllm_support

    d = models[case][role]
    assert vllm_support(d) is None
    model, ad = loaded[case, role]
    if role == "student":
        torch.manual_seed(1)
        model = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        d = tmp_path / "saved"
        ad.family.save(model, ad.processor, d)
    items, hf = [], []
    prompts = [([{"from": "human", "value": "<image>\nWhat is shown in this image?"}], _image(WIDE[0], 7)),
               ([{"from": "human", "value": "What color is the sky?"}], None)]
    for i, (turns, im) in enumerate(prompts):
        prompt = ad.prompt(turns, im is not None)
        path = None
        if im is not None:
            path = tmp_path / f"im{i}.png"
            im.save(path)
            im = Image.open(path).convert("RGB")  # what the script sends to vLLM
        inputs = ad.prompt_inputs(prompt, im)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        hf.append(out[0, inputs["input_ids"].shape[1]:].tolist())
        items.append({"prompt": prompt, "image": str(path) if path else None})
    pf = tmp_path / "prompts.json"
    pf.write_text(json.dumps(items))
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_greedy_script.py")), str(d), str(pf), "8"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    assert json.loads(line[0][len("RESULT "):]) == hf
    assert hf[0] != hf[1]  # the output depends on the prompt (not a degenerate constant)
