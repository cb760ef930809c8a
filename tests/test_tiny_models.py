"""The tiny teacher/student: real LLaVA checkpoints that load in transformers and vLLM."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llavadi.stages.demo import tiny_models


def _prompts(synth, n=4):
    train, root = synth
    recs = json.loads(train.read_text())
    with_img = [r for r in recs if r.get("image")][: n - 1]
    text = [r for r in recs if not r.get("image")][:1]
    return [({"role": "user", "content": r["conversations"][0]["value"]}, root / r["image"] if r.get("image") else None)
            for r in with_img + text]


def test_teacher_layout_and_tokenizer(tiny_teacher):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoProcessor

    keys = list(safe_open(tiny_teacher / "model.safetensors", "pt").keys())
    vision = [k for k in keys if "vision_tower" in k]
    assert vision and all("vision_tower.vision_model." in k for k in vision)  # the layout vLLM loads
    cfg = AutoConfig.from_pretrained(tiny_teacher)
    assert cfg.text_config.hidden_size // cfg.text_config.num_attention_heads == 64
    proc = AutoProcessor.from_pretrained(tiny_teacher)
    tok = proc.tokenizer
    assert len(tok) == 32002 and tok.convert_tokens_to_ids("<image>") == cfg.image_token_index == 32000
    assert tok("The cat").input_ids == [1, 450, 6635]  # LLaMA-2 ids: real vocabulary, one BOS
    text = tok.apply_chat_template([{"role": "user", "content": "<image>\nq?"}, {"role": "assistant", "content": "a"},
                                    {"role": "user", "content": "q2?"}], tokenize=False, add_generation_prompt=True)
    assert text == (tiny_models.VICUNA_SYSTEM + " USER: <image>\nq? ASSISTANT: a</s>USER: q2? ASSISTANT:")


def test_student_shares_tokenizer_and_is_smaller(tmp_path, tiny_teacher):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    s = tiny_models.build_tiny_llava(tmp_path / "student", tiny_models.STUDENT)
    ts, tt = AutoProcessor.from_pretrained(s).tokenizer, AutoProcessor.from_pretrained(tiny_teacher).tokenizer
    assert ts.get_vocab() == tt.get_vocab() and ts.chat_template == tt.chat_template
    n = lambda d: sum(p.numel() for p in LlavaForConditionalGeneration.from_pretrained(d).parameters())  # noqa: E731
    assert n(s) < n(tiny_teacher)


@pytest.mark.vllm
def test_teacher_greedy_same_tokens_in_transformers_and_vllm(tmp_path, tiny_teacher, synth):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(tiny_teacher)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    items, hf = [], []
    for msg, img in _prompts(synth):
        prompt = proc.tokenizer.apply_chat_template([msg], tokenize=False, add_generation_prompt=True)
        items.append({"prompt": prompt, "image": str(img) if img else None})
        kw = {"images": [Image.open(img).convert("RGB")]} if img else {}
        inp = proc(text=[prompt], return_tensors="pt", **kw)
        with torch.no_grad():
            out = model.generate(**inp, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        hf.append(out[0, inp["input_ids"].shape[1]:].tolist())
    pf = tmp_path / "prompts.json"
    pf.write_text(json.dumps(items))
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_greedy_script.py")), str(tiny_teacher), str(pf), "12"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    vl = json.loads(line[0][len("RESULT "):])
    assert vl == hf
    assert len({tuple(x) for x in hf}) > 1  # not a degenerate constant output
