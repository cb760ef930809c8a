"""Gemma 3 (``gemma3``, e.g. google/gemma-3-4b-it): SigLIP tower + average-pool/RMSNorm/matmul projector
+ Gemma3 LM (tied LM head).

What is particular, and where it comes from (transformers 5.19):

- **Image placeholder**: the published chat template writes ``<start_of_image>`` (the tokenizer's
  ``boi_token``) for an image item; ``Gemma3Processor`` counts and expands exactly that string into
  ``"\\n\\n<start_of_image>" + "<image_soft_token>" * image_seq_length + "<end_of_image>\\n\\n"``
  (``processing_gemma3.py``: ``image_token = tokenizer.boi_token``, ``full_image_sequence``,
  ``validate_inputs`` → "Prompt contained 0 image tokens but received 1 images" when the text carries
  any other placeholder). The number of soft tokens is read off the processor's output
  (``models.adapter``), never assumed.
- **BOS**: the template writes ``{{ bos_token }}``; ``models.base.add_special_tokens`` then keeps the
  tokenizer from adding a second one.
- **token_type_ids** (``[1, L]`` int64): 1 on ``<image_soft_token>`` positions, 0 elsewhere — the processor
  returns them as ``mm_token_type_ids`` renamed ``token_type_ids`` (``Gemma3Processor.__call__``).
  ``Gemma3Model.forward`` turns them into a bidirectional block mask over each image
  (``get_block_sequence_ids_for_mask`` + ``create_masks_for_vision_model`` in ``modeling_gemma3.py``); without
  them image tokens attend causally and the hidden states change. They are always produced here,
  zeros on text-only rows (the processor's text-only output carries them too; older transformers
  raised in training mode without them), so a batch of any mix of rows has the same keys.
  Right-padding them with 0 (``models.base.collate``) marks pads as text: no block, no effect.
- **LM head**: ``lm_head.weight`` is tied to ``model.language_model.embed_tokens.weight``
  (``_tied_weights_keys``); the input embedding is scaled by ``sqrt(hidden_size)``
  (``Gemma3TextScaledWordEmbedding``) but the output projection is the plain matrix, so a teacher
  head is ``lm_head.weight`` ``[V, H]`` with no bias. ``Gemma3ForConditionalGeneration.forward``
  computes ``logits = lm_head(h)`` and applies NO ``final_logit_softcapping`` (only the text-only
  ``Gemma3ForCausalLM`` does); the published gemma-3 configs set it to null, and vLLM's Gemma3
  (``vllm/model_executor/models/gemma3.py``: ``LogitsProcessor(soft_cap=final_logit_softcapping)``)
  agrees only while it is null. So the teacher head cache-teacher stores (``lm_head.weight``, no
  transform) is what the HF forward applies.
- **Parameter groups** (``named_parameters`` of ``Gemma3ForConditionalGeneration`` in transformers 5.19):
  ``model.vision_tower.{embeddings,encoder,post_layernorm}.*`` (the SigLIP tower, no ``vision_model.``
  level any more), ``model.multi_modal_projector.{mm_input_projection_weight, mm_soft_emb_norm.weight}``,
  ``model.language_model.*``; ``lm_head.weight`` is the tied embedding and is listed once, as
  ``model.language_model.embed_tokens.weight`` (the ``lm`` group).
- **Save layout**: ``save_pretrained`` writes the published (pre-4.52) key names —
  ``language_model.model.*``, ``multi_modal_projector.*``, ``vision_tower.embeddings.*`` — but the
  published gemma-3 checkpoints and vLLM's ``SiglipVisionModel`` (``vllm/model_executor/models/gemma3_mm.py``
  loads ``vision_tower`` as ``SiglipVisionModel``, whose weights sit under ``vision_model.``) want
  ``vision_tower.vision_model.*``: ``vllm_rename`` inserts ``vision_model.``; transformers loads both
  spellings (tests/test_family_gemma.py reloads a save bit for bit, vision tower included).
- **vLLM's CPU build**: refused (``VLLM_CPU_REASON``, measured); vLLM's GPU attention backends implement the
  image block (read in vLLM 0.32's code, not measured here).
"""
from __future__ import annotations

from .base import Family

GROUPS = {
    "vision": r"^model\.vision_tower\.",
    "projector": r"^model\.multi_modal_projector\.",
    "lm": r"^model\.language_model\.|^lm_head\.",
}

# Measured with vLLM 0.32 (CPU build) on the tiny gemma3 teacher of tests/families/gemma.py
# (tests/test_family_gemma.py::test_vllm_cpu_is_not_the_models_forward): vLLM loads and runs it, its
# prompt log-probs equal the HF forward WITHOUT token_type_ids (causal image tokens) to 1e-6 and differ
# from the model's own forward by up to 0.17. By vLLM's code (not measured here), its GPU backends
# (FlashAttention, Triton, FlexAttention) implement the bidirectional image block ("mm_prefix"; gemma3
# is in MM_PREFIX_LM_MODELS of vllm/transformers_utils/model_arch_config_convertor.py); the CPU backend
# (CPU_ATTN, the only one vllm/platforms/cpu.py selects) does not, and says nothing.
VLLM_CPU_REASON = (
    "vLLM's CPU attention backend has no bidirectional image-block mask (mm_prefix, which only its GPU "
    "backends implement): Gemma3's image tokens attend causally there, so prompt log-probs and hidden "
    "states differ from the model's own (HF) forward (up to 0.17 nats on a tiny model); use engine=hf on CPU")


class Gemma3Family(Family):
    """``Family`` with Gemma3's placeholder (``boi_token``) and ``token_type_ids`` on every row."""

    def placeholder(self, processor) -> str:
        """``<start_of_image>``: the string ``Gemma3Processor`` counts and expands (its ``boi_token``)."""
        return getattr(processor, "boi_token", None) or "<start_of_image>"

    def processor_call(self, processor, text: str, image) -> dict:
        """``Gemma3Processor`` outputs for one sample: ``input_ids``/``attention_mask``/``token_type_ids``
        ``[1, L]`` int64, plus ``pixel_values`` ``[1, 3, S, S]`` float32 on image rows. ``token_type_ids``
        are added as zeros if a processor leaves them out of a text-only call."""
        import torch

        out = super().processor_call(processor, text, image)
        if "mm_token_type_ids" in out and "token_type_ids" not in out:
            out["token_type_ids"] = out.pop("mm_token_type_ids")
        if "token_type_ids" not in out:
            out["token_type_ids"] = torch.zeros_like(out["input_ids"])
        return out


GEMMA3 = Gemma3Family(name="gemma3", model_types=("gemma3",), forward_keys=("pixel_values", "token_type_ids"),
                      groups=GROUPS, vllm_cpu=VLLM_CPU_REASON,
                      vllm_rename=("vision_tower.", "vision_model."), causal_image_rows=False)

FAMILIES = (GEMMA3,)
