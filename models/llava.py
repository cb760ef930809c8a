"""LLaVA-1.5 (``llava``, e.g. llava-hf/llava-1.5-7b-hf) and LLaVA-NeXT / v1.6 (``llava_next``, anyres).

Both: CLIP-style vision tower + MLP projector + a Llama/Vicuna/Mistral LM, ``<image>`` placeholder
(``processor.image_token``). LLaVA-NeXT tiles an image into a grid picked by its aspect ratio
(``image_grid_pinpoints``) plus a base view and appends ``image_newline`` per row, so its token
count depends on the image: the forward needs ``image_sizes`` beside the ``pixel_values``
(``[n, patches, 3, H, W]``; the processor zero-pads the patch axis, as ``models.base.collate`` does).
Parameter names: ``transformers/models/llava*/modeling_llava*.py``; vLLM's loader
(``vllm/model_executor/models/llava*.py``) wants the CLIP tower's keys under ``vision_model.``.
"""
from .base import Family

_GROUPS = {
    "vision": r"(^|\.)vision_tower\.",
    "projector": r"(^|\.)(multi_modal_projector\.|image_newline$)",
    "lm": r"(^|\.)language_model\.|^lm_head\.",
}

LLAVA = Family(name="llava", model_types=("llava",), forward_keys=("pixel_values",), groups=_GROUPS,
               vllm_rename=("vision_tower.", "vision_model."))
LLAVA_NEXT = Family(name="llava_next", model_types=("llava_next",), forward_keys=("pixel_values", "image_sizes"),
                    groups=_GROUPS, vllm_rename=("vision_tower.", "vision_model."))

FAMILIES = (LLAVA, LLAVA_NEXT)
