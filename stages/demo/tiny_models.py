"""Tiny LLaVA teacher/student built locally from configs (no model hub is reachable).

Both are ``LlavaForConditionalGeneration``: a CLIP-style vision tower, the LLaVA-1.5 two-layer
GELU projector and a Llama LM with ``head_dim`` 64 (vLLM's CPU attention kernels support head
sizes 32, 64, 80, …). They share one tokenizer: the real LLaMA-2 32000-token vocabulary (the
LLaVA-1.5/Vicuna one, shipped offline inside the ``wordllama`` package) plus ``<image>``
(id 32000) and ``<pad>`` (id 32001), embeddings padded to 32064 like llava-1.5-hf.

Saved with ``save_pretrained`` including the processor and the Vicuna v1 chat template, then
the vision-tower keys are renamed to ``vision_tower.vision_model.*`` — the layout vLLM expects
and transformers still loads (shared/cpu-environment.md).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ...models.prompts import LLAVA_V1_SYSTEM


IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
# LLaVA's conv_vicuna_v1 system text (what LLaVA-1.5 trained on; "curious human … human's" was Vicuna v0)
VICUNA_SYSTEM = LLAVA_V1_SYSTEM
# Vicuna v1 (LLaVA-1.5): "<system> USER: <image>\n<q> ASSISTANT: <a></s>USER: <q2> ASSISTANT:"
# No BOS in the template: prompts are rendered as text and tokenised with special tokens (as
# vLLM does), which adds exactly one <s>.
# Message content is the LLaVA turn text, '<image>' already inline where the image goes.
def vicuna_v1_template(system: str = VICUNA_SYSTEM) -> str:
    """The Vicuna v1 chat template with ``system`` as the default system prompt."""
    return (
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% set msgs = messages[1:] %}"
        "{% else %}{{ \"" + system + "\" }}{% set msgs = messages %}{% endif %}"
        "{% for m in msgs %}"
        "{% if m['role'] == 'user' %}{{ (' ' if loop.first else '') + 'USER: ' + m['content'] }}"
        "{% else %}{{ ' ASSISTANT: ' }}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
    )


VICUNA_V1_TEMPLATE = vicuna_v1_template()


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny LLaVA. ``image_size/patch_size`` squared = visual tokens per image."""

    hidden: int = 128
    layers: int = 2
    heads: int = 2  # head_dim = hidden / heads = 64
    intermediate: int = 256
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 1
    image_size: int = 32
    patch_size: int = 16
    max_positions: int = 1024
    seed: int = 0


TEACHER = TinySpec(hidden=256, layers=4, heads=4, intermediate=512, vision_hidden=128, vision_layers=2, vision_heads=2)
STUDENT = TinySpec()
# the demo's pair (LLaVA's own system text, the demo vocabulary: stages/demo/vocab.py); the teacher
# ships pre-trained (teacher_builder.py), the student trains in make demo's 20 minutes
DEMO_TEACHER = TinySpec(hidden=128, layers=4, heads=2, intermediate=384, vision_hidden=128, vision_layers=2,
                        vision_heads=2, max_positions=512)
DEMO_STUDENT = TinySpec(hidden=64, layers=2, heads=1, intermediate=128, vision_hidden=32, vision_layers=1,
                        vision_heads=1, max_positions=512)
# ≈135M parameters (LM hidden 768, 12 layers, head_dim 64 + 2×32064×768 embeddings/head): big enough
# that the forward pass dominates, as with real teachers — for benchmarks
MIDSIZE = TinySpec(hidden=768, layers=12, heads=12, intermediate=3072, vision_hidden=128, vision_layers=2,
                   vision_heads=2, max_positions=2048)


def llama2_tokenizer_file() -> Path:
    """The LLaMA-2 tokenizer.json shipped inside the ``wordllama`` package."""
    import importlib.util

    spec = importlib.util.find_spec("wordllama")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the LLaMA-2 tokenizer comes from the `wordllama` package: run `make setup`")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizers" / "l2_supercat_tokenizer_config.json"
    if not path.exists():
        raise RuntimeError(f"{path} is missing from the installed wordllama package")
    return path


def build_tokenizer(system: str = VICUNA_SYSTEM):
    """LLaMA-2 vocabulary + ``<image>`` (32000) + ``<pad>`` (32001), Vicuna v1 chat template."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(llama2_tokenizer_file()), bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.add_special_tokens({"pad_token": PAD_TOKEN})
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == 32000 and tok.pad_token_id == 32001, "unexpected added ids"
    tok.chat_template = vicuna_v1_template(system)
    return tok


def build_config(spec: TinySpec, tokenizer=None):
    """``LlavaConfig`` for ``spec``; vocabulary size and ``<image>``/``<pad>`` ids from ``tokenizer``
    (default: the LLaMA-2 one: 32064 rows, as llava-1.5-hf pads 32002 to a multiple of 64)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if tokenizer is None:
        vocab, image_id, pad_id = 32064, 32000, 32001
    else:  # rows padded to a multiple of 64, as llava-1.5-hf does
        vocab = -(-len(tokenizer) // 64) * 64
        image_id, pad_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.pad_token_id

    vision = CLIPVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 2,
                              num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                              image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=spec.vision_hidden)
    text = LlamaConfig(vocab_size=vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                       num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
                       head_dim=spec.hidden // spec.heads, max_position_embeddings=spec.max_positions,
                       bos_token_id=1, eos_token_id=2, pad_token_id=pad_id, tie_word_embeddings=False,
                       rms_norm_eps=1e-5)
    n_patches = (spec.image_size // spec.patch_size) ** 2
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id, projector_hidden_act="gelu",
                      vision_feature_select_strategy="default", vision_feature_layer=-1,
                      image_seq_length=n_patches, tie_word_embeddings=False)
    return cfg


def build_processor(spec: TinySpec, tokenizer=None, system: str = VICUNA_SYSTEM):
    from transformers import CLIPImageProcessor, LlavaProcessor

    tok = tokenizer or build_tokenizer(system)
    ip = CLIPImageProcessor(size={"shortest_edge": spec.image_size},
                            crop_size={"height": spec.image_size, "width": spec.image_size},
                            do_center_crop=True, do_resize=True)
    # CLIP adds a CLS token: without num_additional_image_tokens=1 the processor inserts one
    # image token too few ("Image features and image tokens do not match").
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=spec.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=vicuna_v1_template(system))


def build_tiny_llava(out_dir: Path | str, spec: TinySpec = STUDENT, *, seed: int | None = None,
                     system: str = VICUNA_SYSTEM, tokenizer=None) -> Path:
    """Build, randomly initialise (seeded), and save a tiny LLaVA with processor (Vicuna v1
    template with ``system`` as its system prompt). ``tokenizer``: default the LLaMA-2 one
    (``build_tokenizer``); the demo passes its small vocabulary (``vocab.build_demo_tokenizer``),
    whose chat template is then set here. Returns the dir."""
    import torch
    from transformers import LlavaForConditionalGeneration

    out_dir = Path(out_dir)
    torch.manual_seed(spec.seed if seed is None else seed)
    model = LlavaForConditionalGeneration(build_config(spec, tokenizer)).float().eval()
    from ...models.llava import LLAVA

    if tokenizer is not None:
        tokenizer.chat_template = vicuna_v1_template(system)
    LLAVA.save(model, build_processor(spec, tokenizer, system=system), out_dir)
    (out_dir / "llavadi_tiny_spec.json").write_text(json.dumps(asdict(spec), indent=1) + "\n")
    return out_dir
