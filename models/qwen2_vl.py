"""Qwen2-VL (``qwen2_vl``, e.g. Qwen/Qwen2-VL-2B-Instruct) and Qwen2.5-VL (``qwen2_5_vl``, e.g.
Qwen/Qwen2.5-VL-3B-Instruct).

Both: a ViT over 14 px patches (2 frames per temporal patch; Qwen2.5-VL's with windowed attention,
SwiGLU and RMSNorm) + ``PatchMerger`` (2×2 patches → one LM token) + a Qwen2 LM with multimodal
RoPE (M-RoPE). Facts, from transformers 5.19 and vLLM 0.32:

- **Prompt.** The published chat template (``chat_template.json`` of the Instruct repos) writes one
  image as ``<|vision_start|><|image_pad|><|vision_end|>``; the processor (``processing_qwen2_vl.py``
  ``replace_image_token``) expands the ``<|image_pad|>`` alone into ``image_grid_thw.prod() //
  merge_size**2`` copies. ``grid_thw`` follows the image's own size (``smart_resize`` in
  ``image_processing_qwen2_vl.py``: each side rounded to a multiple of ``patch_size * merge_size``
  within ``min_pixels``/``max_pixels``), so the count differs between a square and a wide image.
- **Forward inputs** (``Qwen2VLModel.forward``, ``Qwen2_5_VLModel.forward``):
  ``pixel_values`` ``[sum_i t_i*h_i*w_i, 3*2*14*14]`` float32 (patches of every image of the batch,
  concatenated), ``image_grid_thw`` ``[n_images, 3]`` int64 and ``mm_token_type_ids`` ``[B, L]`` int
  (0 text, 1 image, 2 video; the processor returns it by default). Without ``mm_token_type_ids`` the
  model raises ("Multimodal data was passed … but mm_token_type_ids is missing"): it is what
  ``get_rope_index`` reads to give image tokens their 3-D (t, h, w) positions. Text-only rows get
  zeros (``models.base.collate`` pads it like ``input_ids``), and positions follow
  ``attention_mask``, so a right-padded row keeps the positions it has alone.
- **Parameter groups** (``named_parameters`` of ``Qwen2VLForConditionalGeneration`` /
  ``Qwen2_5_VLForConditionalGeneration``): vision = ``model.visual.*`` (``patch_embed``, ``blocks``)
  except the merger; projector = ``model.visual.merger.*`` (``ln_q`` + 2-layer MLP: the vision→LM
  connector, vLLM's ``get_mm_mapping`` calls it ``connector="visual.merger."``); lm =
  ``model.language_model.*`` + ``lm_head.*`` (absent when tied, as in the 2B/3B checkpoints).
- **Save layout.** ``save_pretrained``'s keys (``model.visual.*``, ``model.language_model.*``,
  ``lm_head.*``) are what transformers ≥ 4.52 writes; vLLM's ``hf_to_vllm_mapper``
  (``vllm/model_executor/models/qwen2_vl.py`` / ``qwen2_5_vl.py``) maps them
  (``model.language_model.`` → ``language_model.model.``, ``model.visual.`` → ``visual.``), and the
  older ``model.*`` / ``visual.*`` layout of the hub files too: no renaming needed.
- **vLLM CPU.** vLLM 0.32's CPU build serves both (TORCH_SDPA for the ViT, head_dim 64 in the LM):
  greedy tokens equal HF's (``tests/test_family_qwen2_vl.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Family

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"

_GROUPS = {
    "vision": r"(^|\.)visual\.(?!merger\.)",
    "projector": r"(^|\.)visual\.merger\.",
    "lm": r"(^|\.)language_model\.|^lm_head\.",
}
_FORWARD_KEYS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")


@dataclass(frozen=True)
class QwenVLFamily(Family):
    """``Family`` whose image placeholder is the three tokens the chat template writes."""

    def placeholder(self, processor) -> str:
        """``<|vision_start|><|image_pad|><|vision_end|>`` (``processor.image_token`` is only the pad
        the processor expands; the template wraps it in vision start/end)."""
        return VISION_START + (getattr(processor, "image_token", None) or "<|image_pad|>") + VISION_END


QWEN2_VL = QwenVLFamily(name="qwen2_vl", model_types=("qwen2_vl",), forward_keys=_FORWARD_KEYS, groups=_GROUPS)
QWEN2_5_VL = QwenVLFamily(name="qwen2_5_vl", model_types=("qwen2_5_vl",), forward_keys=_FORWARD_KEYS,
                          groups=_GROUPS)

FAMILIES = (QWEN2_VL, QWEN2_5_VL)
