"""Mistral3 (Mistral-Small-3.1-24B-Instruct-2503: Pixtral tower, ``[IMG]`` expanded per image size, forward
with ``image_sizes``) through llavadi's family layer (issue #12), on tiny checkpoints in the published hub
layout (tests/families/mistral3.py).

Every expected value is independent of the code under test: rendered conversations and answers are
written by hand from the published template (its default system message carries today's date, so the test
writes that date in), image expansions are worked out by hand from ``PixtralImageProcessor``'s rule (fit
the longest edge into 64 px, round each side up to 32 px = patch 16 × merge 2; a row of ``[IMG]`` per 32 px
of height, each row closed by ``[IMG_BREAK]``, the last by ``[IMG_END]``), the reference forward is built
only from the processor's own outputs (``apply_chat_template(tokenize=True, return_dict=True)`` →
``model(**inputs)``) and its answer positions from the template's structure (an answer runs from after a
``[/INST]`` through the next ``</s>``)."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from families.mistral3 import build_mistral3

# published Tekken ids of the control tokens (transformers tests/models/mistral3/test_processing_mistral3.py)
BOS, EOS, INST, INST_END, IMG, IMG_BREAK, IMG_END = 1, 2, 3, 4, 10, 12, 13


PINNED = datetime.datetime(2025, 1, 1)  # written here, not imported: the test's own expectation


def _default_system() -> str:
    # llavadi renders date-printing templates with a fixed date (models.prompts.TEMPLATE_DATE): a prompt
    # must not change between a run and its resume
    today = "2025-01-01"
    return ("[SYSTEM_PROMPT]You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French "
            "startup headquartered in Paris.\nYour knowledge base was last updated on 2023-10-01. The current date is "
            + today + ".\n\nWhen you're not sure about some information, you say that you don't have the information "
            "and don't make up anything.\nIf the user's question is not clear, ambiguous, or does not provide enough "
            "context for you to accurately answer the question, you do not try to answer it right away and you rather "
            "ask the user to clarify their request (e.g. \"What are some good restaurants around me?\" => \"Where are "
            "you?\" or \"When is the next flight to Tokyo\" => \"Where do you travel from?\")[/SYSTEM_PROMPT]")


# (size (w, h), the image's expansion in the processor's ids)
SQUARE = ((50, 50), [IMG, IMG, IMG_BREAK, IMG, IMG, IMG_END])  # 50×50 → 64×64: 2 rows × 2
WIDE = ((90, 40), [IMG, IMG, IMG_END])  # ratio 90/64: 40×90 → 28×64 → 32×64: 1 row × 2
TALL = ((30, 100), [IMG, IMG_BREAK, IMG, IMG_END])  # ratio 100/64: 100×30 → 64×19 → 64×32: 2 rows × 1


def _image(size, seed):
    rng = np.random.default_rng(seed)
    w, h = size
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# rows: (name, LLaVA turns, image, hand-written rendered conversation (after "<s>"), hand-written answers)
def _rows():
    sys_ = _default_system()
    return [
        ("image_square",
         [{"from": "human", "value": "<image>\nWhat is shown in this image?"},
          {"from": "gpt", "value": "A red square on a white background."}],
         SQUARE,
         sys_ + "[INST][IMG]What is shown in this image?[/INST]A red square on a white background.</s>",
         ["A red square on a white background.</s>"]),
        ("text_only",
         [{"from": "human", "value": "What is the capital of France?"},
          {"from": "gpt", "value": "The capital of France is Paris."}],
         None,
         sys_ + "[INST]What is the capital of France?[/INST]The capital of France is Paris.</s>",
         ["The capital of France is Paris.</s>"]),
        ("image_wide_two_turns",  # <image> at the END of the first human turn: moved to the front
         [{"from": "human", "value": "What color is the cat?\n<image>"},
          {"from": "gpt", "value": "The cat is red."},
          {"from": "human", "value": "How many cats are there?"},
          {"from": "gpt", "value": "There is one cat."}],
         WIDE,
         sys_ + "[INST][IMG]What color is the cat?[/INST]The cat is red.</s>"
         "[INST]How many cats are there?[/INST]There is one cat.</s>",
         ["The cat is red.</s>", "There is one cat.</s>"]),
        ("image_tall_system",
         [{"from": "system", "value": "Answer briefly."},
          {"from": "human", "value": "<image>\nDescribe the image."},
          {"from": "gpt", "value": "Two children play with a ball."}],
         TALL,
         "[SYSTEM_PROMPT]Answer briefly.[/SYSTEM_PROMPT][INST][IMG]Describe the image.[/INST]"
         "Two children play with a ball.</s>",
         ["Two children play with a ball.</s>"]),
    ]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mistral3")
    return {role: build_mistral3(root / role, role) for role in ("teacher", "student")}


@pytest.fixture(scope="module")
def loaded(dirs):
    """{role: (model, adapter)} loaded once (fp32, eval)."""
    from transformers import AutoModelForImageTextToText

    from llavadi.models.adapter import ModelAdapter

    return {role: (AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32).eval(), ModelAdapter(d, "auto"))
            for role, d in dirs.items()}


# ---------------------------------------------------------------------------------------------- layout

def test_published_layout(dirs):
    from transformers import AutoTokenizer

    from families.mistral3 import MISTRAL_SMALL_31_TEMPLATE

    d = dirs["teacher"]
    assert {p.name for p in d.iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
        "processor_config.json", "chat_template.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json"}
    assert json.loads((d / "chat_template.json").read_text())["chat_template"] == MISTRAL_SMALL_31_TEMPLATE
    pc = json.loads((d / "processor_config.json").read_text())
    assert (pc["processor_class"], pc["image_token"], pc["spatial_merge_size"]) == ("PixtralProcessor", "[IMG]", 2)
    assert json.loads((d / "preprocessor_config.json").read_text())["image_processor_type"] == "PixtralImageProcessor"
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["model_type"], cfg["image_token_index"], cfg["tie_word_embeddings"]) == ("mistral3", IMG, False)
    tok = AutoTokenizer.from_pretrained(d)
    assert [tok.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]",
                                                   "[IMG_END]")] == [BOS, EOS, INST, INST_END, IMG, IMG_BREAK, IMG_END]
    assert AutoTokenizer.from_pretrained(dirs["student"]).get_vocab() == tok.get_vocab()


# ---------------------------------------------------------------------------------------------- (a) spans

def test_conversation_and_encode_find_the_answers(loaded):
    _, ad = loaded["teacher"]
    tok = ad.tokenizer
    assert ad.family.name == "mistral3" and ad.family.placeholder(ad.processor) == "[IMG]"
    for i, (name, turns, img, text, answers) in enumerate(_rows()):
        image = _image(img[0], i) if img else None
        conv = ad.conversation(turns, image is not None)
        assert conv.text == "<s>" + text, name
        assert conv.ids.count(BOS) == 1 and conv.ids[0] == BOS, name  # the template's <s>, not a second one
        enc = ad.encode(conv, image)
        # the image expanded exactly as worked out by hand, right after the first [INST]
        inst = enc.ids.index(INST)
        expansion = img[1] if img else []
        assert enc.ids[inst + 1: inst + 1 + len(expansion)] == expansion, name
        assert sum(t in (IMG, IMG_BREAK, IMG_END) for t in enc.ids) == len(expansion), name
        assert [tok.decode(enc.ids[a:b]) for a, b in enc.spans] == answers, name
        assert tok.decode(enc.answer_ids) == "".join(answers), name
        image_keys = {"pixel_values", "image_sizes"} if image else set()
        assert set(enc.inputs) == {"input_ids", "attention_mask"} | image_keys, name
        assert enc.inputs["input_ids"].reshape(-1).tolist() == enc.ids
        if image is not None:
            n_rows = expansion.count(IMG_BREAK) + 1
            n_cols = expansion.count(IMG) // n_rows
            assert enc.inputs["image_sizes"].tolist() == [[32 * n_rows, 32 * n_cols]], name
            assert enc.inputs["pixel_values"].shape == (1, 3, 32 * n_rows, 32 * n_cols), name


def test_llava_v1_format_places_the_pixtral_placeholder(dirs):
    from llavadi.models.adapter import ModelAdapter

    ad = ModelAdapter(dirs["teacher"], "llava_v1")
    turns = [{"from": "human", "value": "What is shown in this image?\n<image>"},
             {"from": "gpt", "value": "A red square."}]
    conv = ad.conversation(turns, True)
    assert conv.text == ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                         "helpful, detailed, and polite answers to the user's questions. USER: [IMG]\nWhat is shown in "
                         "this image? ASSISTANT: A red square.</s>")
    enc = ad.encode(conv, _image(TALL[0], 0))
    assert enc.ids[0] == BOS and enc.ids.count(BOS) == 1  # this format has no <s>: the tokenizer adds one
    assert [t for t in enc.ids if t in (IMG, IMG_BREAK, IMG_END)] == TALL[1]
    assert [ad.tokenizer.decode(enc.ids[a:b]) for a, b in enc.spans] == [" A red square.</s>"]


# ---------------------------------------------------------------------------------------------- (b) forward

def _messages(turns, image):
    """The LLaVA turns as chat messages, written by hand: structured content, the image first in the first
    user turn (LLaVA's placement)."""
    msgs, placed = [], False
    for t in turns:
        role = {"human": "user", "gpt": "assistant", "system": "system"}[t["from"]]
        content = [{"type": "text", "text": t["value"].replace("<image>", "").strip()}]
        if image is not None and role == "user" and not placed:
            content.insert(0, {"type": "image", "image": image})
            placed = True
        msgs.append({"role": role, "content": content})
    return msgs


def _reference(model, processor, turns, image):
    """Independent teacher forward of one sample from the processor's own outputs. Returns (inputs, answer
    positions (p - 1 for answer token p), answer ids, last hidden state [L, H], logits [L, V])."""
    inputs = processor.apply_chat_template(_messages(turns, image), tokenize=True, return_dict=True,
                                           return_tensors="pt", strftime_now=lambda f: PINNED.strftime(f))
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    ids = inputs["input_ids"][0].tolist()
    pos, aids = [], []
    for s in [i + 1 for i, t in enumerate(ids) if t == INST_END]:  # each answer: after [/INST] through </s>
        e = ids.index(EOS, s) + 1
        pos += [p - 1 for p in range(s, e)]
        aids += ids[s:e]
    return inputs, pos, aids, out.hidden_states[-1][0], out.logits[0]


def test_batched_forward_equals_processor_forward(loaded):
    """A right-padded mixed batch (square, text-only, wide 2-turn, tall: pixel_values of three sizes zero-padded
    to 64×64 by ``collate``) gives, row by row, the hidden states and logits of the processor's own
    single-sample forward."""
    model, ad = loaded["teacher"]
    rows = _rows()
    images = [_image(img[0], i) if img else None for i, (_, _, img, _, _) in enumerate(rows)]
    encs = [ad.encode(ad.conversation(turns, im is not None), im) for (_, turns, *_), im in zip(rows, images)]
    batch = ad.collate([e.inputs for e in encs])
    L = max(len(e.ids) for e in encs)
    assert batch["input_ids"].shape == (len(rows), L) and len({len(e.ids) for e in encs}) > 1  # really padded
    assert batch["attention_mask"].sum(1).tolist() == [len(e.ids) for e in encs]
    assert batch["image_sizes"].tolist() == [[64, 64], [32, 64], [64, 32]]  # the image rows, in order
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    # collate pads as the processor pads a batch of its own (PixtralImageProcessor._pad_for_batching)
    own = ad.processor(text=["[IMG]"] * 3, images=[images[i] for i in (0, 2, 3)], return_tensors="pt", padding=True)
    assert torch.equal(own["pixel_values"], batch["pixel_values"])
    assert torch.equal(own["image_sizes"], batch["image_sizes"])
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    for r, ((name, turns, *_), im, enc) in enumerate(zip(rows, images, encs)):
        inputs, pos, aids, h_ref, l_ref = _reference(model, ad.processor, turns, im)
        assert enc.ids == inputs["input_ids"][0].tolist(), name
        assert enc.positions == pos and enc.answer_ids == aids, name
        torch.testing.assert_close(out.hidden_states[-1][r, enc.positions], h_ref[pos], rtol=0, atol=1e-5, msg=name)
        # logits: 1e-5 of their scale (they reach |11|; the ~5e-6 fp32 rounding of a different batch shape in
        # the hidden states comes out of an lm_head with rows of norm ~2.3 as ~1.5e-5)
        scale = float(l_ref.abs().max())
        torch.testing.assert_close(out.logits[r, enc.positions], l_ref[pos], rtol=0, atol=1e-5 * scale, msg=name)
        n = len(enc.ids)  # every real position, image tokens included
        torch.testing.assert_close(out.hidden_states[-1][r, :n], h_ref, rtol=0, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------- (c) groups

@pytest.mark.parametrize("role", ["teacher", "student"])
def test_parameter_groups(loaded, role):
    model, ad = loaded[role]
    names = {n for n, _ in model.named_parameters()}
    g = {k: set(ad.family.group_params(model, k)) for k in ("vision", "projector", "lm")}
    assert all(g.values())
    assert not (g["vision"] & g["projector"]) and not (g["vision"] & g["lm"]) and not (g["projector"] & g["lm"])
    assert g["vision"] | g["projector"] | g["lm"] == names  # nothing left out
    assert g["vision"] == {n for n in names if n.startswith("model.vision_tower.")}
    assert {"model.vision_tower.patch_conv.weight", "model.vision_tower.ln_pre.weight",
            "model.vision_tower.transformer.layers.0.attention.q_proj.weight"} <= g["vision"]
    assert g["projector"] == {"model.multi_modal_projector.norm.weight",
                              "model.multi_modal_projector.patch_merger.merging_layer.weight",
                              "model.multi_modal_projector.linear_1.weight",
                              "model.multi_modal_projector.linear_2.weight"}
    assert {"lm_head.weight", "model.language_model.embed_tokens.weight", "model.language_model.norm.weight"} <= g["lm"]


# ---------------------------------------------------------------------------------------------- (d) save

@pytest.fixture(scope="module")
def saved_student(dirs, loaded, tmp_path_factory):
    """(model, dir): the student changed as by training, saved by ``family.save``."""
    from transformers import AutoModelForImageTextToText

    from llavadi.models import family_of

    model = AutoModelForImageTextToText.from_pretrained(dirs["student"], dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a reload that re-initialises anything cannot pass
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    out = tmp_path_factory.mktemp("mistral3_saved") / "student"
    family_of(dirs["student"]).save(model, loaded["student"][1].processor, out)
    return model, out


def _reload(d):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32, output_loading_info=True)


def test_save_reloads_bit_identical(saved_student, tmp_path):
    import shutil

    from llavadi.models.base import rename_keys

    model, d = saved_student
    re, info = _reload(d)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    want, got = dict(model.named_parameters()), dict(re.named_parameters())
    assert set(got) == set(want)
    bad = [n for n in want if not torch.equal(got[n], want[n])]
    assert not bad, bad[:5]
    assert any(n.startswith("model.vision_tower.transformer.") for n in got)
    assert oct((d / "model.safetensors").stat().st_mode & 0o777) == "0o644"
    # the check catches the old save-time CLIP renaming: it re-initialises the Pixtral tower on reload
    shutil.copytree(d, tmp_path / "renamed")
    rename_keys(tmp_path / "renamed" / "model.safetensors", "vision_tower.", "vision_model.")
    re2, info2 = _reload(tmp_path / "renamed")
    assert any(k.startswith("model.vision_tower.") for k in info2["missing_keys"])
    assert not torch.equal(dict(re2.named_parameters())["model.vision_tower.patch_conv.weight"],
                           want["model.vision_tower.patch_conv.weight"])


# ---------------------------------------------------------------------------------------------- (e) vLLM

# vLLM in a subprocess (its CPU backend pins the threads of the process that loads it). Prompts go as token
# ids with the image placeholder unexpanded (vLLM expands it), one BOS — vLLM would add a second <s> to a text
# prompt whose template already wrote it.
_VLLM_SCRIPT = r"""
import json, os, sys
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from PIL import Image
from vllm import LLM, SamplingParams
model, items, n = sys.argv[1], json.loads(open(sys.argv[2]).read()), int(sys.argv[3])
llm = LLM(model=model, dtype="float32", max_model_len=512, enforce_eager=True, seed=0, enable_prefix_caching=False)
reqs = []
for it in items:
    r = {"prompt_token_ids": it["ids"]}
    if it.get("image"):
        r["multi_modal_data"] = {"image": Image.open(it["image"]).convert("RGB")}
    reqs.append(r)
outs = llm.generate(reqs, SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0), use_tqdm=False)
print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_greedy_equals_hf(saved_student, loaded, tmp_path):
    """The student as ``family.save`` wrote it serves in vLLM's CPU build: greedy tokens equal HF
    ``generate`` (EOS suppressed for 8 tokens) on an image prompt (wide image) and a text-only prompt."""
    from llavadi.models.adapter import vllm_support

    model, d = saved_student
    assert vllm_support(d) is None
    ad = loaded["student"][1]
    items, hf = [], []
    prompts = [([{"from": "human", "value": "<image>\nWhat is shown in this image?"}], _image(WIDE[0], 7)),
               ([{"from": "human", "value": "What color is the sky?"}], None)]
    for i, (turns, im) in enumerate(prompts):
        path = None
        if im is not None:
            path = tmp_path / f"im{i}.png"
            im.save(path)
            im = Image.open(path).convert("RGB")  # what the script sends to vLLM
        # HF reference from the processor's own outputs
        inputs = ad.processor.apply_chat_template(_messages(turns, im), tokenize=True, return_dict=True,
                                                  add_generation_prompt=True, return_tensors="pt",
                                                  strftime_now=lambda f: PINNED.strftime(f))
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        hf.append(out[0, inputs["input_ids"].shape[1]:].tolist())
        # vLLM: the prompt as llavadi renders it, tokenised by the family (placeholder unexpanded)
        ids = ad.family.text_ids(ad.processor, ad.prompt(turns, im is not None))
        assert ids.count(BOS) == 1 and ids.count(IMG) == (im is not None)
        items.append({"ids": ids, "image": str(path) if path else None})
    pf = tmp_path / "prompts.json"
    pf.write_text(json.dumps(items))
    p = subprocess.run([sys.executable, "-c", _VLLM_SCRIPT, str(d), str(pf), "8"], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    assert json.loads(line[0][len("RESULT "):]) == hf
    assert hf[0] != hf[1]


def test_an_image_of_one_pixtral_token_is_rejected_not_crashing_later(dirs):
    """transformers' Pixtral forward fails on an image that expands into one [IMG] token when it is alone
    in a batch (it passes beside larger images): refused for every stage (image_too_small)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from llavadi.models.adapter import ModelAdapter
    from llavadi.schemas.samples import Reject

    ad = ModelAdapter(dirs["teacher"])
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A dot."}]
    conv = ad.conversation(turns, True)
    tiny = Image.new("RGB", (20, 20), (200, 10, 10))
    # the fault the reject stands for: the model's own forward on the processor's output fails
    raw = ad.processor(text=[conv.text], images=[tiny], return_tensors="pt", add_special_tokens=False)
    model = AutoModelForImageTextToText.from_pretrained(dirs["teacher"], dtype=torch.float32)
    with pytest.raises(RuntimeError, match="split"):
        model(**raw)
    with pytest.raises(Reject) as e:
        ad.encode(conv, tiny)
    assert e.value.reason == "image_too_small"
    assert ad.encode(conv, _image((50, 50), 1)).ids  # a 2×2-token image is fine
