"""llava-hf/llava-1.5-7b-hf and llava-hf/llava-v1.6-vicuna-7b-hf, tiny.

Published layout (both repos): config.json, generation_config.json, model*.safetensors,
preprocessor_config.json, processor_config.json, chat_template.json, tokenizer.json,
tokenizer.model, tokenizer_config.json, special_tokens_map.json, added_tokens.json. The tokenizer is
LLaMA-2's 32000 tokens + ``<image>`` (32000) + ``<pad>`` (32001), with no chat template of its own:
the template sits in ``chat_template.json`` at the processor level (issue #12)."""
from __future__ import annotations

from pathlib import Path

# llava-hf/llava-1.5-7b-hf chat_template.json (the v1.6-vicuna repo ships the same text)
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

SIZES = {"teacher": dict(hidden=128, layers=2, heads=2, inter=256, vhidden=64),
         "student": dict(hidden=64, layers=1, heads=1, inter=128, vhidden=32)}


def _tokenizer():
    from transformers import PreTrainedTokenizerFast

    from llavadi.stages.demo.tiny_models import llama2_tokenizer_file

    tok = PreTrainedTokenizerFast(tokenizer_file=str(llama2_tokenizer_file()), bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.add_special_tokens({"pad_token": "<pad>"})
    assert tok.convert_tokens_to_ids("<image>") == 32000 and tok.pad_token_id == 32001
    return tok


def _configs(role: str, image_size: int = 32, patch: int = 16):
    from transformers import CLIPVisionConfig, LlamaConfig

    s = SIZES[role]
    vision = CLIPVisionConfig(hidden_size=s["vhidden"], intermediate_size=2 * s["vhidden"], num_hidden_layers=1,
                              num_attention_heads=1, image_size=image_size, patch_size=patch,
                              projection_dim=s["vhidden"])
    text = LlamaConfig(vocab_size=32064, hidden_size=s["hidden"], intermediate_size=s["inter"],
                       num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                       head_dim=64, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                       pad_token_id=32001, tie_word_embeddings=False, rms_norm_eps=1e-5)
    return vision, text


def _finish(out: Path, model, processor, family) -> Path:
    from . import publish_layout

    family.save(model, processor, out)
    return publish_layout(out, LLAVA_HF_TEMPLATE)


def build_llava15(out: Path | str, role: str = "teacher", seed: int = 0) -> Path:
    """Tiny llava-1.5-hf: CLIP 32 px / 16 px patches (4 patches + CLS), 2-layer GELU projector."""
    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from llavadi.models.llava import LLAVA

    out = Path(out)
    vision, text = _configs(role)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, projector_hidden_act="gelu",
                      vision_feature_select_strategy="default", vision_feature_layer=-2, image_seq_length=4,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).float().eval()
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=ip, tokenizer=_tokenizer(), patch_size=16,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA_HF_TEMPLATE)
    return _finish(out, model, proc, LLAVA)


def build_llava_next(out: Path | str, role: str = "teacher", seed: int = 0) -> Path:
    """Tiny llava-v1.6-vicuna-hf: anyres over a 32 px base with pinpoints 32×64 / 64×32 / 64×64, so
    a wide, a tall and a square image expand into different numbers of image tokens."""
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor

    from llavadi.models.llava import LLAVA_NEXT

    out = Path(out)
    vision, text = _configs(role)
    pins = [[32, 64], [64, 32], [64, 64]]
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=32000,
                          projector_hidden_act="gelu", vision_feature_select_strategy="default",
                          vision_feature_layer=-2, image_grid_pinpoints=pins, tie_word_embeddings=False,
                          image_seq_length=4)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).float().eval()
    ip = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                 image_grid_pinpoints=pins)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=_tokenizer(), patch_size=16,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=LLAVA_HF_TEMPLATE)
    return _finish(out, model, proc, LLAVA_NEXT)


CASES = {"llava15": build_llava15, "llava_next": build_llava_next}
