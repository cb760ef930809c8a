"""google/gemma-3-4b-it (``gemma3``) and google/paligemma-3b-mix-224 (``paligemma``), tiny.

Published layouts (hub file lists of the two repos):

- gemma-3-4b-it: config.json, generation_config.json, model*.safetensors, preprocessor_config.json,
  processor_config.json, chat_template.json, tokenizer.json, tokenizer_config.json, tokenizer.model,
  special_tokens_map.json, added_tokens.json. The chat template sits in chat_template.json (and, in
  the same text, in tokenizer_config.json); generation_config.json has ``eos_token_id: [1, 106]``
  (``<eos>``, ``<end_of_turn>``).
- paligemma-3b-mix-224: the same minus any chat template (PaliGemma is prompted in the processor's
  own prefix/suffix layout, not a chat format); eos ``<eos>`` (1).

Built here without ``tokenizer.model`` (a SentencePiece file cannot be derived from the JSON tokenizer;
transformers and vLLM load ``tokenizer.json``). The tokenizer is Gemma's layout (``GemmaTokenizer``: BPE
with byte fallback, no dummy prefix, ``<pad>``/``<eos>``/``<bos>``/``<unk>``/``<mask>`` = 0..4, the ids of
the real vocabulary) over the LLaMA-2 pieces shipped in ``wordllama`` (shifted by 2), plus the
newline runs ``\\n`` … ``\\n\\n\\n\\n`` as tokens (Gemma has them; vLLM's Gemma3 processor looks them up) and
each family's special tokens. Both families share it (PaliGemma's processor appends its ``<image>``
and the 1024 ``<locNNNN>`` + 128 ``<segNNN>`` tokens as the published one has them).
"""
from __future__ import annotations

import json
from pathlib import Path

# google/gemma-3-4b-it chat_template.json (and tokenizer_config.json "chat_template"). Source of the
# text: the published tokenizer_config.json quoted verbatim in ShishirPatil/gorilla
# berkeley-function-call-leaderboard/bfcl/model_handler/local_inference/gemma.py (GemmaHandler
# docstring); the same text is vendored as GEMMA3_CHAT_TEMPLATE in microsoft/onnxruntime-extensions
# (operators/tokenizer/chat_template.cc).
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # ids 0..4, as in Gemma's vocabulary
NEWLINES = ("\n", "\n\n", "\n\n\n", "\n\n\n\n")
TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")
GEMMA3_IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                       "image_token": "<image_soft_token>"}

# teacher and student differ in width and depth; head_dim 64 (a size vLLM's CPU attention takes)
SIZES = {"teacher": dict(hidden=128, layers=2, heads=2, kv=1, inter=256, vhidden=64, vheads=1),
         "student": dict(hidden=64, layers=1, heads=1, kv=1, inter=128, vhidden=32, vheads=1)}


def gemma_tokenizer(gemma3: bool):
    """Gemma-layout tokenizer (module doc). ``gemma3``: plus ``<start_of_turn>``/``<end_of_turn>`` and
    the image tokens ``<start_of_image>``/``<end_of_image>``/``<image_soft_token>`` (named
    ``boi_token``/``eoi_token``/``image_token``, as gemma-3's tokenizer_config.json names them)."""
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    from llavadi.stages.demo.tiny_models import llama2_tokenizer_file

    src = json.loads(Path(llama2_tokenizer_file()).read_text())["model"]
    vocab = {t: i for i, t in enumerate(GEMMA_SPECIALS)}
    for piece, i in sorted(src["vocab"].items(), key=lambda kv: kv[1]):
        if i >= 3:  # LLaMA-2's <unk> <s> </s> give way to Gemma's five specials
            vocab[piece] = i + 2
    for nl in NEWLINES:
        vocab[nl] = len(vocab)
    merges = [("\n", "\n"), ("\n\n", "\n"), ("\n\n", "\n\n")]
    merges += [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in src["merges"]]
    kw = {"extra_special_tokens": dict(GEMMA3_IMAGE_TOKENS)} if gemma3 else {}
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, **kw)
    if gemma3:
        tok.add_special_tokens({"additional_special_tokens": list(TURN_TOKENS)})
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    return tok


def _siglip(role: str, image_size: int, patch: int):
    from transformers import SiglipVisionConfig

    s = SIZES[role]
    return SiglipVisionConfig(hidden_size=s["vhidden"], intermediate_size=2 * s["vhidden"], num_hidden_layers=1,
                              num_attention_heads=s["vheads"], image_size=image_size, patch_size=patch,
                              vision_use_head=False)


def _write_tokenizer_side_files(out: Path, tok, added: list[str]) -> None:
    """special_tokens_map.json and added_tokens.json as the public repos ship them (transformers 5's
    save_pretrained no longer writes them; the loaders read tokenizer.json + tokenizer_config.json)."""
    stm = {k: getattr(tok, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")}
    tc = json.loads((out / "tokenizer_config.json").read_text())
    for k in ("boi_token", "eoi_token", "image_token"):
        if k in tc:
            stm[k] = tc[k]
    (out / "special_tokens_map.json").write_text(json.dumps(stm, indent=2) + "\n")
    (out / "added_tokens.json").write_text(json.dumps({t: tok.convert_tokens_to_ids(t) for t in added}, indent=2)
                                           + "\n")


def build_gemma3(out: Path | str, role: str = "teacher", seed: int = 0) -> Path:
    """Tiny gemma-3-4b-it: SigLIP 64 px / 16 px patches (4×4) average-pooled to 2×2 = 4 image tokens
    (``mm_tokens_per_image``), Gemma3 text with a tied LM head; the teacher alternates a sliding-window
    layer (window 16, shorter than the test conversations) with a global one."""
    import torch
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor,
                              Gemma3TextConfig, GenerationConfig)

    from llavadi.models.gemma3 import GEMMA3
    from . import publish_layout

    out = Path(out)
    s = SIZES[role]
    tok = gemma_tokenizer(gemma3=True)
    ids = {t: tok.convert_tokens_to_ids(t) for t in (*TURN_TOKENS, *GEMMA3_IMAGE_TOKENS.values())}
    vocab = len(tok)
    layers = ["sliding_attention", "full_attention"][: s["layers"]] if s["layers"] > 1 else ["full_attention"]
    text = Gemma3TextConfig(vocab_size=vocab, hidden_size=s["hidden"], intermediate_size=s["inter"],
                            num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                            num_key_value_heads=s["kv"], head_dim=64, query_pre_attn_scalar=64,
                            max_position_embeddings=1024, sliding_window=16, layer_types=layers,
                            pad_token_id=0, eos_token_id=1, bos_token_id=2, rms_norm_eps=1e-6)
    cfg = Gemma3Config(text_config=text, vision_config=_siglip(role, 64, 16), mm_tokens_per_image=4,
                       boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                       image_token_index=ids["<image_soft_token>"], tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(cfg).float().eval()
    with torch.no_grad():  # the projector starts at zeros upstream: give the image a visible effect
        w = model.model.multi_modal_projector.mm_input_projection_weight
        w.normal_(0, 0.2, generator=torch.Generator().manual_seed(seed + 1))
    ip = Gemma3ImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                              do_pan_and_scan=False, resample=2)
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=GEMMA3_TEMPLATE, image_seq_length=4)
    GEMMA3.save(model, proc, out)
    # gemma-3-4b-it's generation_config.json: eos [1, 106] (<eos>, <end_of_turn>), sampling by default
    GenerationConfig(bos_token_id=2, eos_token_id=[1, ids["<end_of_turn>"]], pad_token_id=0,
                     cache_implementation="hybrid", do_sample=True, top_k=64, top_p=0.95).save_pretrained(out)
    publish_layout(out, GEMMA3_TEMPLATE)
    tc_path = out / "tokenizer_config.json"  # gemma-3-4b-it carries the template in both files
    tc = json.loads(tc_path.read_text())
    tc["chat_template"] = GEMMA3_TEMPLATE
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")
    _write_tokenizer_side_files(out, tok, ["<image_soft_token>"])
    return out


def build_paligemma(out: Path | str, role: str = "teacher", seed: int = 0) -> Path:
    """Tiny paligemma-3b-mix-224: SigLIP 32 px / 16 px patches = 4 image tokens, linear projector,
    Gemma (1) text with a tied LM head; no chat template (processor prefix/suffix layout)."""
    import torch
    from transformers import (GemmaConfig, GenerationConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration,
                              PaliGemmaProcessor, SiglipImageProcessor)

    from llavadi.models.paligemma import PALIGEMMA
    from . import publish_layout

    out = Path(out)
    s = SIZES[role]
    tok = gemma_tokenizer(gemma3=False)
    ip = SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                              resample=3)
    ip.image_seq_length = 4  # (32 / 16)², as the published preprocessor_config.json carries 256
    proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)  # adds <image>, <locNNNN>, <segNNN>
    tok = proc.tokenizer
    vocab = len(tok)
    text = GemmaConfig(vocab_size=vocab, hidden_size=s["hidden"], intermediate_size=s["inter"],
                       num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                       head_dim=64, max_position_embeddings=1024, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                       hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6)
    cfg = PaliGemmaConfig(vision_config=_siglip(role, 32, 16), text_config=text,
                          image_token_index=proc.image_token_id, vocab_size=vocab, projection_dim=s["hidden"],
                          hidden_size=s["hidden"], tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(cfg).float().eval()
    with torch.no_grad():  # at the default std 0.02 the sqrt(H)-scaled embedding drowns the layers and the
        g = torch.Generator().manual_seed(seed + 1)  # tiny model repeats its last input token whatever it attends
        for n, p in model.model.language_model.named_parameters():
            if p.dim() == 2 and "embed" not in n:
                p.normal_(0, 0.1, generator=g)
    PALIGEMMA.save(model, proc, out)
    GenerationConfig(bos_token_id=2, eos_token_id=1, pad_token_id=0).save_pretrained(out)  # as paligemma-3b-mix-224
    publish_layout(out, None)
    _write_tokenizer_side_files(out, tok, ["<image>"])
    pp = out / "preprocessor_config.json"
    ppc = json.loads(pp.read_text())
    ppc["image_seq_length"] = ip.image_seq_length
    pp.write_text(json.dumps(ppc, indent=2) + "\n")
    return out


CASES = {"gemma3": build_gemma3, "paligemma": build_paligemma}


def raw_paligemma_call(processor, text: str, image) -> dict:
    """PaliGemma's processor called directly on a rendered conversation ``[<image>]<bos>q1\\nrest<eos>``:
    ``processor(text="<image>" + q1, images=…, suffix=rest)`` (its own prefix/suffix layout, token types
    0 on the prefix, 1 on the suffix); text-only rows, which the processor refuses, through its
    tokenizer's pair call as the processor makes it."""
    body = text[len("<image>"):] if text.startswith("<image>") else text
    body = body[len("<bos>"):]
    q1, rest = body.split("\n", 1)
    assert rest.endswith("<eos>")
    rest = rest[: -len("<eos>")]
    if image is None:
        return dict(processor.tokenizer(f"<bos>{q1}\n", f"{rest}<eos>", return_token_type_ids=True,
                                        add_special_tokens=False, return_tensors="pt"))
    out = dict(processor(text="<image>" + q1, images=image, suffix=rest, return_tensors="pt"))
    out.pop("labels", None)
    return out


RAW_CALLS = {"paligemma": raw_paligemma_call}
