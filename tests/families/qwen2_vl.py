"""Qwen/Qwen2-VL-2B-Instruct and Qwen/Qwen2.5-VL-3B-Instruct, tiny.

Published layout (both repos): config.json, generation_config.json, model*.safetensors,
preprocessor_config.json, chat_template.json, tokenizer.json, tokenizer_config.json (which carries
the same chat template), vocab.json, merges.txt. The tokenizer is Qwen2's byte-level BPE
(``Qwen2Tokenizer``: NFC, Qwen's split regex, ByteLevel) whose special tokens follow the vocabulary
(``<|endoftext|>`` first, then ``<|im_start|>``, ``<|im_end|>`` …, ``<|vision_start|>``,
``<|vision_end|>``, ``<|vision_pad|>``, ``<|image_pad|>``, ``<|video_pad|>``); Qwen2.5-VL appends
eight non-special tokens (``<tool_call>`` … ``<|file_sep|>``). eos is ``<|im_end|>``, pad
``<|endoftext|>``, no bos (tokenizer_config.json of both Instruct repos).

No hub here: the BPE merges are trained (deterministically) on a small English text below, with
Qwen2's own pre-tokenizer (``Qwen2Tokenizer`` builds it from vocab + merges), so teacher and
student of both families share one tokenizer (same ids for every token both have).

Image processor: Qwen2-VL's (patch 14, merge 2, so one image token per 28×28 pixels) with tiny
``min_pixels`` / ``max_pixels``: a 56×56 image gives 4 tokens, 56×28 gives 2, 84×56 gives 6."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

# chat_template.json of Qwen/Qwen2-VL-2B-Instruct (and -7B-Instruct; tokenizer_config.json carries the
# same text); Qwen/Qwen2.5-VL-*-Instruct publish the identical template in both files. Text as vendored by
# huggingface/transformers tests/models/qwen2_vl/test_processor_qwen2_vl.py and
# tests/models/qwen2_5_vl/test_processor_qwen2_5_vl.py (prepare_processor_dict), and as the hub API
# reports for a Qwen2.5-VL-7B derivative's processor_config / tokenizer_config.
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
    "messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] "
    "== 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value "
    "+ 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|>"
    "<|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = "
    "video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|>"
    "<|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# added tokens of Qwen2-VL-*-Instruct, in id order after the BPE vocabulary (151643 … 151656 there)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# Qwen2.5-VL-*-Instruct adds these (151657 … 151664), not special
QWEN25_EXTRA = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
BPE_VOCAB = 768  # byte alphabet (256) + 512 merges
VOCAB_SIZE = 832  # model embedding rows: ≥ BPE_VOCAB + 22 added tokens, a multiple of 64

# generation_config.json of Qwen/Qwen2-VL-2B-Instruct (ids remapped to the tiny vocabulary below)
GEN_SAMPLING = {"do_sample": True, "repetition_penalty": 1.0, "temperature": 0.01, "top_k": 1, "top_p": 0.001}

# teacher untied like the 7B checkpoints, student with tied embeddings like Qwen2-VL-2B / Qwen2.5-VL-3B
SIZES = {"teacher": dict(hidden=128, layers=2, heads=2, kv=1, inter=256, vdim=32, vheads=2, vdepth=2, tie=False),
         "student": dict(hidden=64, layers=1, heads=1, kv=1, inter=128, vdim=16, vheads=1, vdepth=1, tie=True)}
# weights drawn with std 0.1 (transformers' default 0.02 gives a random tiny model near-flat next-token
# distributions: greedy output then hardly depends on the prompt and is decided by near-ties)
INIT_STD = 0.1
# image processor: patch 14 × merge 2 = 28 px per image token; 1–16 image tokens per image
MIN_PIXELS, MAX_PIXELS = 28 * 28, 28 * 28 * 16

_CORPUS = """\
A photo of a red cat sitting on a wooden table next to a blue cup of coffee.
The image shows a busy street with cars, buses and people walking under tall buildings.
What is shown in this picture? There is a dog running on the green grass in a park.
Describe the image in detail. The sky is clear and the sun is shining over the mountains.
How many apples are on the plate? There are three apples: two red ones and one yellow one.
What color is the car? The car is white with black wheels and it is parked near a tree.
A man is riding a bicycle along the river while a woman reads a book on a bench.
The astronaut floats in space, holding a camera, with the Earth far below him.
Question: what is the object in the center of the image? Answer: it is a round clock.
The chart shows the number of visitors per month; the highest value is in July.
Two children are playing with a ball on the beach near the water and the sand.
Is there a person in the image? Yes, a person stands at the door of the house.
Where is the bird? The small bird sits on the branch of the tree at the left side.
The kitchen has a white fridge, a stove, a sink and a window looking out to the garden.
Read the text on the sign: it says STOP in large white letters on a red background.
Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex.
Complex is better than complicated. Flat is better than nested. Sparse is better than dense.
Readability counts. Special cases aren't special enough to break the rules.
Although practicality beats purity. Errors should never pass silently.
In the face of ambiguity, refuse the temptation to guess. Now is better than never.
If the implementation is hard to explain, it's a bad idea. I think you'll see what I mean.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 15 20 25 50 100 2024. Shapes: square, circle, triangle.
Colors: red, green, blue, yellow, orange, purple, black, white, gray, brown, pink.
"""


@lru_cache(maxsize=None)
def _bpe() -> tuple[dict, list]:
    """(vocab, merges) of a byte-level BPE trained on ``_CORPUS`` with Qwen2's pre-tokenizer
    (``transformers/models/qwen2/tokenization_qwen2.py`` ``PRETOKENIZE_REGEX``), ``BPE_VOCAB`` entries."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True) * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def build_tokenizer(qwen25: bool = False):
    """``Qwen2Tokenizer`` with the Instruct repos' special tokens, eos ``<|im_end|>``, pad ``<|endoftext|>``."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _bpe()
    # eos first set to <|endoftext|> so that the added tokens get Qwen's order of ids, then <|im_end|>
    tok = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), unk_token=None, bos_token=None,
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>", errors="replace",
                         clean_up_tokenization_spaces=False, split_special_tokens=False, model_max_length=32768)
    tok.add_special_tokens({"additional_special_tokens": list(SPECIALS[1:])})
    tok.eos_token = "<|im_end|>"
    assert len(vocab) == BPE_VOCAB, len(vocab)
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIALS]
    assert ids == list(range(len(vocab), len(vocab) + len(SPECIALS))), ids
    if qwen25:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN25_EXTRA])
    assert len(tok) <= VOCAB_SIZE
    return tok


def _configs(role: str, qwen25: bool, tok):
    s = SIZES[role]
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    text = dict(vocab_size=VOCAB_SIZE, hidden_size=s["hidden"], intermediate_size=s["inter"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                max_position_embeddings=2048, rms_norm_eps=1e-6, hidden_act="silu",
                # mrope_section sums to head_dim / 2 (= 32 for head_dim 64); published [16, 24, 24] for 128
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=None,
                use_sliding_window=False, max_window_layers=s["layers"], tie_word_embeddings=s["tie"],
                initializer_range=INIT_STD)
    if qwen25:
        vision = dict(depth=s["vdepth"], hidden_size=s["vdim"], intermediate_size=2 * s["vdim"],
                      num_heads=s["vheads"], out_hidden_size=s["hidden"], patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=112, fullatt_block_indexes=[s["vdepth"] - 1],
                      hidden_act="silu", tokens_per_second=2, initializer_range=INIT_STD)
    else:
        vision = dict(depth=s["vdepth"], embed_dim=s["vdim"], hidden_size=s["hidden"], mlp_ratio=2,
                      num_heads=s["vheads"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      hidden_act="quick_gelu", initializer_range=INIT_STD)
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return text, vision, tokens


def _build(out: Path | str, role: str, seed: int, qwen25: bool) -> Path:
    import torch
    from transformers import GenerationConfig

    from llavadi.models.qwen2_vl import QWEN2_5_VL, QWEN2_VL

    from . import publish_layout

    if qwen25:
        from transformers import (Qwen2_5_VLConfig as Config, Qwen2_5_VLForConditionalGeneration as Model,
                                  Qwen2_5_VLProcessor as Processor)
    else:
        from transformers import (Qwen2VLConfig as Config, Qwen2VLForConditionalGeneration as Model,
                                  Qwen2VLProcessor as Processor)
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    out = Path(out)
    tok = build_tokenizer(qwen25)
    text, vision, tokens = _configs(role, qwen25, tok)
    cfg = Config(text_config=text, vision_config=vision, tie_word_embeddings=SIZES[role]["tie"], **tokens)
    torch.manual_seed(seed)
    model = Model(cfg).float().eval()
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config = GenerationConfig(bos_token_id=eos[1], pad_token_id=eos[1], eos_token_id=eos,
                                               **GEN_SAMPLING)
    ip = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, temporal_patch_size=2,
                               merge_size=2)
    vp = Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, temporal_patch_size=2,
                               merge_size=2)
    proc = Processor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=QWEN2_VL_TEMPLATE)
    (QWEN2_5_VL if qwen25 else QWEN2_VL).save(model, proc, out)
    publish_layout(out, QWEN2_VL_TEMPLATE)
    # preprocessor_config.json with the Instruct repos' keys (min_pixels / max_pixels, not transformers 5's "size")
    pp_path = out / "preprocessor_config.json"
    pp = json.loads(pp_path.read_text())
    pp_path.write_text(json.dumps({
        "min_pixels": pp["size"]["shortest_edge"], "max_pixels": pp["size"]["longest_edge"],
        **{k: pp[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
                              "image_processor_type", "processor_class")}}, indent=2) + "\n")
    # the Instruct repos ship no processor_config.json (the processor is Qwen2VLProcessor/Qwen2_5_VLProcessor by
    # preprocessor_config.json's processor_class; videos get the default video processor)
    (out / "processor_config.json").unlink(missing_ok=True)
    # the Instruct repos carry the template in tokenizer_config.json as well, and the slow-tokenizer files
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["chat_template"] = QWEN2_VL_TEMPLATE
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")
    vocab, merges = _bpe()
    if not (out / "vocab.json").exists():
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    if not (out / "merges.txt").exists():
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out


def build_qwen2_vl(out: Path | str, role: str = "teacher", seed: int = 0) -> Path:
    """Tiny Qwen2-VL-Instruct: ViT (quick_gelu, LayerNorm) + PatchMerger + Qwen2 LM with M-RoPE, head_dim 64."""
    return _build(out, role, seed, qwen25=False)


def build_qwen2_5_vl(out: Path | str, role: str = "teacher", seed: int = 0) -> Path:
    """Tiny Qwen2.5-VL-Instruct: windowed ViT (SwiGLU, RMSNorm; last block full attention) + PatchMerger +
    Qwen2 LM with M-RoPE, head_dim 64."""
    return _build(out, role, seed, qwen25=True)


CASES = {"qwen2_vl": build_qwen2_vl, "qwen2_5_vl": build_qwen2_5_vl}
