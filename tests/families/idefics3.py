"""HuggingFaceTB/SmolVLM-Instruct (and SmolVLM-256M-Instruct, HuggingFaceM4/Idefics3-8B-Llama3), tiny.

Published layout (SmolVLM-Instruct): config.json, generation_config.json, model.safetensors,
preprocessor_config.json, processor_config.json, chat_template.json, tokenizer.json,
tokenizer_config.json, special_tokens_map.json, vocab.json, merges.txt, added_tokens.json.

The tokenizer is a GPT-2-style byte-level BPE (SmolLM2's family: ``<|endoftext|>`` 0, ``<|im_start|>`` 1
= BOS written by the template itself, ``<|im_end|>`` 2 = pad) trained here on a little English, plus the
tokens the Idefics3 processor writes around an image, in SmolVLM-256M-Instruct's order: ``<global-img>``,
``<row_1_col_1>`` … ``<row_6_col_6>``, ``<fake_token_around_image>``, ``<image>``, then
``<end_of_utterance>`` (EOS and the generation stop). Model: ``Idefics3Config`` with a SigLIP-style
tower (32 px tiles, 8 px patches → 16 patches, pixel-shuffle ``scale_factor`` 2 → 4 ``<image>`` tokens
per tile) and a Llama LM with ``head_dim`` 64 (vLLM's CPU attention). The image processor resizes the
longest edge to 64 px and splits into 32 px tiles plus a global view: a square image gives 2×2 tiles,
a 2:1 one 1×2 — different numbers of image tokens per image, as with the published checkpoints
(1536 / 384 px there)."""
from __future__ import annotations

import json
from pathlib import Path

# The published chat template of HuggingFaceTB/SmolVLM-Instruct / SmolVLM-256M-Instruct
# (chat_template.json there; 403 characters). Same text in transformers' processor tests
# (huggingface/transformers tests/models/smolvlm/test_processing_smolvlm.py, prepare_processor_dict)
# and in transformers' src/transformers/models/smolvlm/processing_smolvlm.py DEFAULT_CHAT_TEMPLATE minus
# its video branch; Idefics3-8B-Llama3 ships it with ``<|begin_of_text|>`` in place of ``<|im_start|>``.
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] "
    "== 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == "
    "'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

BASE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
IMAGE_SPECIALS = (["<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
                  + ["<fake_token_around_image>", "<image>", "<end_of_utterance>"])

SIZES = {"teacher": dict(hidden=128, layers=2, heads=2, inter=256, vhidden=64, vinter=128),
         "student": dict(hidden=64, layers=1, heads=1, inter=128, vhidden=32, vinter=64)}
TILE = 32  # vision_config.image_size == max_image_size["longest_edge"] (vLLM checks pixel_values against it)
PATCH = 8
LONGEST_EDGE = 64  # size["longest_edge"]: at most 2×2 tiles
SCALE = 2
IMAGE_SEQ_LEN = (TILE // PATCH) ** 2 // SCALE ** 2  # 4 <image> tokens per tile

_CORPUS = """\
A chat between a user and an assistant about pictures. The user asks what is shown in an image and the
assistant answers with a short description.

User: What is shown here?
Assistant: A red square on a white background.

User: Describe the picture in one sentence.
Assistant: There is a small cat sitting next to a blue cup on the table.

User: What colour is the sky?
Assistant: The sky is blue and there are a few white clouds.

User: How many dogs can you see?
Assistant: I can see two dogs playing in the green grass near the river.

User: Is this a photo of a city street?
Assistant: Yes, it shows a busy street with cars, buses, people walking and tall buildings under a grey sky.

User: What is the man holding?
Assistant: He is holding an umbrella because it is raining.

User: Where is the ball?
Assistant: The ball is under the chair in the corner of the room. Thank you, that helps a lot.

User: Tell me more about the scene. Which animal is larger? Can you read the sign?
Assistant: The light comes from the left and the shadows are long. The horse is larger than the sheep. It says stop.
"""


def _bpe(vocab_size: int = 700):
    """(vocab, merges) of a byte-level BPE trained on ``_CORPUS``: deterministic for a fixed text, so
    teacher and student builds get the same tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BASE_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    spec = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    return spec["vocab"], merges


def _tokenizer():
    """GPT2Tokenizer (SmolVLM's ``tokenizer_class``): BOS ``<|im_start|>``, EOS ``<end_of_utterance>``,
    pad ``<|im_end|>``, unk ``<|endoftext|>``, no BOS added by the tokenizer (the template writes it)."""
    from transformers import GPT2Tokenizer

    vocab, merges = _bpe()
    tok = GPT2Tokenizer(vocab=vocab, merges=merges, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                        eos_token="<|im_start|>", pad_token="<|im_end|>", add_prefix_space=False)
    tok.add_special_tokens({"additional_special_tokens": IMAGE_SPECIALS})
    tok.eos_token = "<end_of_utterance>"
    tok.model_max_length = 8192
    ids = tok.convert_tokens_to_ids(BASE_SPECIALS + IMAGE_SPECIALS)
    assert ids[:3] == [0, 1, 2] and ids[3:] == list(range(len(vocab), len(vocab) + len(IMAGE_SPECIALS))), ids
    return tok


def _configs(role: str, vocab: int, image_token_id: int, eos: int):
    from transformers import Idefics3Config, LlamaConfig
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    s = SIZES[role]
    vision = Idefics3VisionConfig(hidden_size=s["vhidden"], intermediate_size=s["vinter"], num_hidden_layers=1,
                                  num_attention_heads=1, image_size=TILE, patch_size=PATCH)
    text = LlamaConfig(vocab_size=vocab, hidden_size=s["hidden"], intermediate_size=s["inter"],
                       num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                       head_dim=64, max_position_embeddings=2048, bos_token_id=1, eos_token_id=eos, pad_token_id=2,
                       tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=100000.0)
    return Idefics3Config(vision_config=vision, text_config=text, image_token_id=image_token_id, scale_factor=SCALE,
                          pad_token_id=2, tie_word_embeddings=False)


def _hub_tokenizer_files(out: Path, tok) -> None:
    """The slow-tokenizer files SmolVLM's repo ships beside tokenizer.json (vocab.json, merges.txt,
    added_tokens.json, special_tokens_map.json), written from the saved tokenizer.json when transformers
    5 did not write them."""
    tj = json.loads((out / "tokenizer.json").read_text())
    if not (out / "vocab.json").exists():
        (out / "vocab.json").write_text(json.dumps(tj["model"]["vocab"], ensure_ascii=False) + "\n")
    if not (out / "merges.txt").exists():
        merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    base = len(tj["model"]["vocab"])
    if not (out / "added_tokens.json").exists():
        added = {t["content"]: t["id"] for t in tj["added_tokens"] if t["id"] >= base}
        (out / "added_tokens.json").write_text(json.dumps(added, indent=2) + "\n")
    if not (out / "special_tokens_map.json").exists():
        stm = {"additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
               "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
               "unk_token": tok.unk_token}
        (out / "special_tokens_map.json").write_text(json.dumps(stm, indent=2) + "\n")


def build_idefics3(out: Path | str, role: str = "teacher", seed: int = 0) -> Path:
    """Tiny SmolVLM (``Idefics3ForConditionalGeneration``) in the published hub layout; teacher and
    student differ in width/depth and share the tokenizer. Returns ``out``."""
    import torch
    from transformers import GenerationConfig, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_idefics3 import Idefics3ImageProcessor

    from llavadi.models.idefics3 import IDEFICS3

    from . import publish_layout

    out = Path(out)
    tok = _tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    eos = tok.convert_tokens_to_ids("<end_of_utterance>")
    vocab = -(-len(tok) // 64) * 64
    cfg = _configs(role, vocab, image_id, eos)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(cfg).float().eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=eos, pad_token_id=2)
    ip = Idefics3ImageProcessor(size={"longest_edge": LONGEST_EDGE}, max_image_size={"longest_edge": TILE},
                                do_image_splitting=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                                resample=1)
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=IMAGE_SEQ_LEN,
                             chat_template=SMOLVLM_TEMPLATE)
    IDEFICS3.save(model, proc, out)
    publish_layout(out, SMOLVLM_TEMPLATE)
    _hub_tokenizer_files(out, tok)
    return out


CASES = {"idefics3": build_idefics3}
