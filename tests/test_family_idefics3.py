"""Idefics3 / SmolVLM family (issue #12): tiny teacher + student in SmolVLM-Instruct's published layout.

Issue #12 measured that the wrapper tokens the Idefics3 processor writes around an image
(``<fake_token_around_image>``, ``<row_r_col_c>``, ``<global-img>``) were dropped and cached values were
wrong. Here the answer spans, hidden states and logits the adapter yields are checked against the
processor's own ``apply_chat_template`` output and an independent forward; expected strings are written by
hand from SmolVLM's template and ``Idefics3Processor``'s expansion rule (``processing_idefics3.py``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from families.idefics3 import build_idefics3

EOU = "<end_of_utterance>"
FAKE, GLOBAL, IMG = "<fake_token_around_image>", "<global-img>", "<image>"
TILE = IMG * 4  # image_seq_len = (32 px tile / 8 px patch)^2 / scale_factor^2 = 4


def _image(w: int, h: int, seed: int):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# Images are resized to a 64 px longest edge, then cut into 32 px tiles (+ a global view):
# square → 2×2 tiles, 96×40 (wide) → 1 row × 2 cols, 40×96 (tall) → 2 rows × 1 col.
EXPANSION = {
    "square": (f"{FAKE}<row_1_col_1>{TILE}{FAKE}<row_1_col_2>{TILE}\n"
               f"{FAKE}<row_2_col_1>{TILE}{FAKE}<row_2_col_2>{TILE}\n"
               f"\n{FAKE}{GLOBAL}{TILE}{FAKE}"),
    "wide": f"{FAKE}<row_1_col_1>{TILE}{FAKE}<row_1_col_2>{TILE}\n\n{FAKE}{GLOBAL}{TILE}{FAKE}",
    "tall": f"{FAKE}<row_1_col_1>{TILE}\n{FAKE}<row_2_col_1>{TILE}\n\n{FAKE}{GLOBAL}{TILE}{FAKE}",
}
SIZE = {"square": (48, 48), "wide": (96, 40), "tall": (40, 96)}

# (name, LLaVA turns, image kind or None, hand-written chat messages for the processor's own template,
#  expected answers as the tokenizer decodes them, expected rendered text with the image expanded)
ROWS = [
    ("image_square",
     [{"from": "human", "value": "<image>\nWhat is shown here?"}, {"from": "gpt", "value": "A red square."}],
     "square",
     [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown here?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}],
     [" A red square." + EOU],
     "<|im_start|>User:{X}What is shown here?" + EOU + "\nAssistant: A red square." + EOU + "\n"),
    ("text_only",
     [{"from": "human", "value": "How many dogs can you see?"}, {"from": "gpt", "value": "I can see two dogs."}],
     None,
     [{"role": "user", "content": [{"type": "text", "text": "How many dogs can you see?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "I can see two dogs."}]}],
     [" I can see two dogs." + EOU],
     "<|im_start|>User: How many dogs can you see?" + EOU + "\nAssistant: I can see two dogs." + EOU + "\n"),
    ("image_wide_at_end",  # LLaVA-Instruct style: <image> after the question → moved to the front
     [{"from": "human", "value": "What colour is the sky?\n<image>"}, {"from": "gpt", "value": "The sky is blue."}],
     "wide",
     [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the sky?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "The sky is blue."}]}],
     [" The sky is blue." + EOU],
     "<|im_start|>User:{X}What colour is the sky?" + EOU + "\nAssistant: The sky is blue." + EOU + "\n"),
    ("two_turns_tall",
     [{"from": "human", "value": "<image>\nDescribe the picture."}, {"from": "gpt", "value": "There is a small cat."},
      {"from": "human", "value": "Where is the ball?"}, {"from": "gpt", "value": "The ball is under the chair."}],
     "tall",
     [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]},
      {"role": "assistant", "content": [{"type": "text", "text": "There is a small cat."}]},
      {"role": "user", "content": [{"type": "text", "text": "Where is the ball?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "The ball is under the chair."}]}],
     [" There is a small cat." + EOU, " The ball is under the chair." + EOU],
     "<|im_start|>User:{X}Describe the picture." + EOU + "\nAssistant: There is a small cat." + EOU
     + "\nUser: Where is the ball?" + EOU + "\nAssistant: The ball is under the chair." + EOU + "\n"),
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("idefics3")
    return build_idefics3(root / "teacher", "teacher"), build_idefics3(root / "student", "student", seed=1)


@pytest.fixture(scope="module")
def teacher(dirs):
    from transformers import Idefics3ForConditionalGeneration

    from llavadi.models.adapter import ModelAdapter

    adapter = ModelAdapter(dirs[0], prompt_format="auto")
    model = Idefics3ForConditionalGeneration.from_pretrained(dirs[0], dtype=torch.float32).eval()
    return adapter, model


@pytest.fixture(scope="module")
def images():
    return {k: _image(*SIZE[k], seed=i) for i, k in enumerate(SIZE)}


@pytest.fixture(scope="module")
def encoded(teacher, images):
    adapter, _ = teacher
    out = []
    for name, turns, kind, *_ in ROWS:
        conv = adapter.conversation(turns, kind is not None)
        out.append((conv, adapter.encode(conv, images[kind] if kind else None)))
    return out


def test_published_layout_and_family(dirs):
    from llavadi.models import family_of
    from llavadi.models.idefics3 import IDEFICS3

    t, s = dirs
    files = {"config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
             "processor_config.json", "chat_template.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json"}
    assert files <= {p.name for p in t.iterdir()}
    assert json.loads((t / "chat_template.json").read_text())["chat_template"].startswith(
        "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}")
    assert family_of(t) is IDEFICS3 and family_of(s) is IDEFICS3
    # same tokenizer, different model sizes
    assert (t / "tokenizer.json").read_bytes() == (s / "tokenizer.json").read_bytes()
    assert (t / "model.safetensors").stat().st_size > (s / "model.safetensors").stat().st_size


def test_answers_and_image_expansion(teacher, encoded):
    adapter, _ = teacher
    tok = adapter.tokenizer
    for (name, _turns, kind, _msgs, answers, full), (conv, enc) in zip(ROWS, encoded):
        assert [tok.decode(conv.ids[a:b]) for a, b in conv.spans] == answers, name
        assert [tok.decode(enc.ids[a:b]) for a, b in enc.spans] == answers, name
        # the model sees every wrapper token the processor writes around the image, in place
        assert tok.decode(enc.ids) == full.format(X=EXPANSION[kind] if kind else ""), name
        assert len(enc.positions) == len(enc.answer_ids) == sum(b - a for a, b in enc.spans)
        if kind:
            n_tiles = {"square": 5, "wide": 3, "tall": 3}[kind]
            assert tuple(enc.inputs["pixel_values"].shape) == (1, n_tiles, 3, 32, 32)
            assert tuple(enc.inputs["pixel_attention_mask"].shape) == (1, n_tiles, 32, 32)
        else:
            assert set(enc.inputs) == {"input_ids", "attention_mask"}
    # the number of image tokens depends on the image: 20 for the square, 12 for 2:1 images
    n_img = [sum(i == tok.convert_tokens_to_ids(IMG) for i in enc.ids) for _c, enc in encoded]
    assert n_img == [20, 0, 12, 12]


def test_batched_adapter_forward_equals_independent_processor_forward(teacher, images, encoded):
    """Reference: the processor's own apply_chat_template (tokenize=True) on hand-written messages,
    one sample at a time; answer positions found by searching the hand-written answer's ids."""
    adapter, model = teacher
    proc, tok = adapter.processor, adapter.tokenizer
    eou = tok.convert_tokens_to_ids(EOU)
    batch = adapter.collate([enc.inputs for _c, enc in encoded])
    assert batch["input_ids"].shape[0] == len(ROWS) and batch["pixel_values"].shape[:2] == (3, 5)
    assert bool((batch["attention_mask"][:, -1] == 0).any())  # right-padded, rows of different lengths
    with torch.no_grad():
        got = model(**batch, output_hidden_states=True)
    for i, ((name, _t, kind, msgs, answers, _full), (_conv, enc)) in enumerate(zip(ROWS, encoded)):
        msgs = json.loads(json.dumps(msgs))
        if kind:
            msgs[0]["content"][0]["image"] = images[kind]
        ref_in = proc.apply_chat_template(msgs, tokenize=True, return_dict=True, return_tensors="pt")
        ids = ref_in["input_ids"][0].tolist()
        assert ids == enc.ids, name
        pos, start = [], 0
        for ans in answers:
            want = tok(ans[: -len(EOU)], add_special_tokens=False)["input_ids"] + [eou]
            start = next(j for j in range(start, len(ids)) if ids[j:j + len(want)] == want)
            pos += [p - 1 for p in range(start, start + len(want))]
            start += len(want)
        assert pos == enc.positions, name
        with torch.no_grad():
            ref = model(**ref_in, output_hidden_states=True)
        torch.testing.assert_close(got.hidden_states[-1][i, enc.positions], ref.hidden_states[-1][0, pos],
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(got.logits[i, enc.positions], ref.logits[0, pos], atol=1e-5, rtol=0)


def test_parameter_groups(teacher):
    _adapter, model = teacher
    fam = _adapter.family
    groups = {g: set(fam.group_params(model, g)) for g in ("vision", "projector", "lm")}
    names = {n for n, _ in model.named_parameters()}
    assert all(groups.values())
    assert not (groups["vision"] & groups["projector"]) and not (groups["vision"] & groups["lm"]) \
        and not (groups["projector"] & groups["lm"])
    assert groups["vision"] | groups["projector"] | groups["lm"] == names
    assert groups["vision"] == {n for n in names if n.startswith("model.vision_model.")}
    assert groups["projector"] == {"model.connector.modality_projection.proj.weight"}
    assert groups["lm"] == {n for n in names if n.startswith("model.text_model.")} | {"lm_head.weight"}


def test_save_reloads_bit_identical(dirs, tmp_path):
    from safetensors import safe_open
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    from llavadi.models.idefics3 import IDEFICS3

    src = dirs[1]
    model = Idefics3ForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():  # values no initialiser would produce: a re-initialised tensor cannot match
        g = torch.Generator().manual_seed(7)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    IDEFICS3.save(model, AutoProcessor.from_pretrained(src), tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:  # vLLM's module names, as they are
        keys = set(f.keys())
    assert all(k.startswith(("model.vision_model.", "model.connector.", "model.text_model.", "lm_head."))
               for k in keys)
    assert oct((tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777) == oct(0o644)
    back = Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32)
    a, b = dict(model.named_parameters()), dict(back.named_parameters())
    assert a.keys() == b.keys() and any(k.startswith("model.vision_model.") for k in a)
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


@pytest.mark.vllm
def test_vllm_greedy_equals_hf(dirs, teacher, images, tmp_path):
    """vLLM serves what llavadi writes (``Family.save`` of the loaded teacher: the layout a trained student
    gets) and generates, greedily, what transformers generates from the published-layout teacher."""
    from llavadi.models import adapter as adapter_mod
    from llavadi.models.idefics3 import IDEFICS3

    assert adapter_mod.vllm_support(dirs[0]) is None
    adapter, model = teacher
    served = tmp_path / "served"
    IDEFICS3.save(model, adapter.processor, served)
    prompts = [([{"from": "human", "value": "<image>\nWhat is shown here?"}], "wide"),
               ([{"from": "human", "value": "Where is the ball?"}], None)]
    items, hf = [], []
    for turns, kind in prompts:
        text = adapter.prompt(turns, kind is not None)
        img = images[kind] if kind else None
        path = None
        if img is not None:
            path = tmp_path / f"{kind}.png"
            img.save(path)
        items.append({"prompt": text, "image": str(path) if path else None})
        inp = adapter.prompt_inputs(text, img)
        with torch.no_grad():
            out = model.generate(**inp, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        hf.append(out[0, inp["input_ids"].shape[1]:].tolist())
    pf = tmp_path / "prompts.json"
    pf.write_text(json.dumps(items))
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_greedy_script.py")), str(served), str(pf),
                        "8"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    assert json.loads(line[0][len("RESULT "):]) == hf
    assert hf[0] != hf[1]
