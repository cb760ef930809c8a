"""mistralai/Mistral-Small-3.1-24B-Instruct-2503 (``mistral3``: Pixtral vision tower + patch-merger
projector + Mistral LM), tiny.

Published HF-format layout of that repo (besides Mistral's own ``consolidated.safetensors`` /
``params.json`` / ``tekken.json``, which llavadi does not read): config.json, generation_config.json,
model*.safetensors, preprocessor_config.json (``PixtralImageProcessor``), processor_config.json
(``PixtralProcessor``: ``patch_size``, ``spatial_merge_size`` 2, ``[IMG]`` / ``[IMG_BREAK]`` /
``[IMG_END]``), chat_template.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json.

Tokenizer: the published one is Tekken (a byte-level BPE, 131072 ids) whose first ids are control
tokens — ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``[INST]`` 3, ``[/INST]`` 4, …, ``[IMG]`` 10, ``<pad>`` 11,
``[IMG_BREAK]`` 12, ``[IMG_END]`` 13, …, ``[SYSTEM_PROMPT]`` 17, ``[/SYSTEM_PROMPT]`` 18 (the ids 10/12/13
appear in transformers' ``tests/models/mistral3/test_processing_mistral3.py``; ``image_token_index`` 10 in
the checkpoint's config.json). The tiny one keeps those 20 control tokens at the same ids and trains a
small byte-level BPE (no prefix space, ``<s>`` added by the post-processor) on a fixed corpus.
Image processor: 16 px patches, spatial merge 2 (one image token per 32×32 px), longest edge 64 px, so a
square image expands into ``[IMG][IMG][IMG_BREAK][IMG][IMG][IMG_END]`` and a 2:1 one into fewer tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

# Mistral-Small-3.1-24B-Instruct-2503 chat template as published (chat_template.json; the same text is
# vendored from hf-internal-testing/Mistral-Small-3.1-24B-Instruct-2503-only-processor into
# huggingface/transformers tests/models/mistral3/test_processing_mistral3.py, prepare_processor_dict).
# Quirks kept as published: the default system message says "Mistral Small 3" and carries today's date
# (strftime_now); ``messages[0] is string`` is never true, so a system turn must have structured content.
MISTRAL_SMALL_31_TEMPLATE = (
    "{%- set today = strftime_now(\"%Y-%m-%d\") %}\n"
    "{%- set default_system_message = \"You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, "
    "a French startup headquartered in Paris.\\nYour knowledge base was last updated on 2023-10-01. The current date "
    "is \" + today + \".\\n\\nWhen you're not sure about some information, you say that you don't have the information "
    "and don't make up anything.\\nIf the user's question is not clear, ambiguous, or does not provide enough context "
    "for you to accurately answer the question, you do not try to answer it right away and you rather ask the user to "
    "clarify their request (e.g. \\\"What are some good restaurants around me?\\\" => \\\"Where are you?\\\" or "
    "\\\"When is the next flight to Tokyo\\\" => \\\"Where do you travel from?\\\")\" %}\n"
    "\n"
    "{{- bos_token }}\n"
    "\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- if messages[0] is string %}\n"
    "        {%- set system_message = messages[0]['content'] %}\n"
    "        {%- set loop_messages = messages[1:] %}\n"
    "    {%- else %} \n"
    "        {%- set system_message = messages[0]['content'][0]['text'] %}\n"
    "        {%- set loop_messages = messages[1:] %}\n"
    "    {%- endif %}\n"
    "{%- else %}\n"
    "    {%- set system_message = default_system_message %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}\n"
    "\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "            {%- if message['content'] is string %}\n"
    "            {{- '[INST]' + message['content'] + '[/INST]' }}\n"
    "            {%- else %}\n"
    "                    {{- '[INST]' }}\n"
    "                    {%- for block in message['content'] %}\n"
    "                            {%- if block['type'] == 'text' %}\n"
    "                                    {{- block['text'] }}\n"
    "                            {%- elif block['type'] == 'image' or block['type'] == 'image_url' %}\n"
    "                                    {{- '[IMG]' }}\n"
    "                                {%- else %}\n"
    "                                    {{- raise_exception('Only text and image blocks are supported in message "
    "content!') }}\n"
    "                                {%- endif %}\n"
    "                        {%- endfor %}\n"
    "                    {{- '[/INST]' }}\n"
    "                {%- endif %}\n"
    "    {%- elif message['role'] == 'system' %}\n"
    "        {{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {%- if message['content'] is string %}\n"
    "            {{- message['content'] + eos_token }}\n"
    "        {%- else %}\n"
    "            {{- message['content'][0]['text'] + eos_token }}\n"
    "        {%- endif %}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user, system and assistant roles are supported!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}"
)

# Tekken's control tokens at their published ids 0..19
CONTROL_TOKENS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                  "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                  "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]")
IMG_ID, PAD_ID = 10, 11
VOCAB = 1024  # tokenizer vocabulary (control tokens + 256 bytes + merges); model vocab_size = VOCAB
# weights drawn wider than the default 0.02 so that logits are peaked (greedy decoding is not decided by
# float rounding between near-tied tokens) and the image visibly changes the answer
INIT_STD = 0.2

_CORPUS = """\
You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French startup headquartered in Paris.
Your knowledge base was last updated on 2023-10-01. The current date is 2025-03-17.
When you're not sure about some information, you say that you don't have the information and don't make up anything.
If the user's question is not clear, ambiguous, or does not provide enough context for you to accurately answer the
question, you do not try to answer it right away and you rather ask the user to clarify their request.
What is shown in this image? Describe the picture in detail. What color is the square? How many objects are there?
The image shows a red square on a white background. There are three circles and two triangles in the picture.
A cat is sitting on a wooden table next to a cup of coffee. The sky is blue and the grass is green.
What is the capital of France? The capital of France is Paris. Thank you! You are welcome.
Is there a person in the photo? Yes, there is an astronaut in a white suit holding a helmet.
What is written on the sign? The sign says stop. Where is the dog? The dog is under the tree.
""" * 3


def tokenizer():
    """The tiny Tekken-like tokenizer (see module doc) as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=list(CONTROL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    assert [fast.convert_tokens_to_ids(t) for t in CONTROL_TOKENS] == list(range(len(CONTROL_TOKENS)))
    return fast


SIZES = {"teacher": dict(hidden=128, layers=2, heads=2, kv=1, inter=256, vhidden=128, vheads=2),
         "student": dict(hidden=64, layers=1, heads=1, kv=1, inter=128, vhidden=64, vheads=1)}


def config(role: str):
    """Tiny ``Mistral3Config``: the published config.json's structure (image_token_index 10,
    spatial_merge_size 2, gelu projector without bias, vision_feature_layer -1, untied lm_head) at toy sizes;
    head_dim 64 in both towers (vLLM's CPU attention takes 32, 64, 80, …)."""
    from transformers import Mistral3Config, MistralConfig, PixtralVisionConfig

    s = SIZES[role]
    vision = PixtralVisionConfig(hidden_size=s["vhidden"], intermediate_size=2 * s["vhidden"], num_hidden_layers=1,
                                 num_attention_heads=s["vheads"], head_dim=64, patch_size=16, image_size=64,
                                 hidden_act="silu")
    text = MistralConfig(vocab_size=VOCAB, hidden_size=s["hidden"], intermediate_size=s["inter"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                         head_dim=64, max_position_embeddings=1024, sliding_window=None, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID, tie_word_embeddings=False,
                         initializer_range=INIT_STD)
    return Mistral3Config(vision_config=vision, text_config=text, image_token_index=IMG_ID, spatial_merge_size=2,
                          projector_hidden_act="gelu", multimodal_projector_bias=False, vision_feature_layer=-1,
                          tie_word_embeddings=False)


def processor():
    """``PixtralProcessor`` as the published processor_config.json / preprocessor_config.json set it up
    (``spatial_merge_size`` 2, CLIP mean/std, bicubic), at 16 px patches and a 64 px longest edge."""
    from transformers import PixtralImageProcessor, PixtralProcessor

    ip = PixtralImageProcessor(size={"longest_edge": 64}, patch_size={"height": 16, "width": 16})
    return PixtralProcessor(image_processor=ip, tokenizer=tokenizer(), patch_size=16, spatial_merge_size=2,
                            chat_template=MISTRAL_SMALL_31_TEMPLATE)


def build_mistral3(out: Path | str, role: str = "teacher", seed: int = 0) -> Path:
    """Tiny Mistral-Small-3.1 (``role`` teacher: text 128 wide × 2 layers, vision 128; student: 64 × 1,
    vision 64; same tokenizer) in the published layout at ``out``."""
    import torch
    from transformers import Mistral3ForConditionalGeneration

    from llavadi.models.mistral3 import MISTRAL3

    from . import publish_layout

    out = Path(out)
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config(role)).float().eval()
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 1, 2
    model.generation_config.pad_token_id = PAD_ID
    MISTRAL3.save(model, processor(), out)
    publish_layout(out, MISTRAL_SMALL_31_TEMPLATE, template_file="chat_template.json")
    # the published repo also carries special_tokens_map.json (transformers 5 no longer writes it)
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}, indent=2) + "\n")
    return out


def raw_processor_call(processor, text: str, image) -> dict:
    """The processor called directly (not through llavadi), as the published template needs it: the
    template writes ``<s>`` itself, so the tokenizer must not add a second one (``add_special_tokens=False``,
    which is what ``processor.apply_chat_template(tokenize=True)`` does)."""
    kw = {"images": [image]} if image is not None else {}
    return dict(processor(text=[text], return_tensors="pt", add_special_tokens=False, **kw))


CASES = {"mistral3": build_mistral3}
# for tests/test_families.py ``_raw_inputs`` (looked up as ``families.RAW_CALLS``)
RAW_CALLS = {"mistral3": raw_processor_call}
