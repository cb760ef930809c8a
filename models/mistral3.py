"""Mistral3 (``mistral3``, e.g. mistralai/Mistral-Small-3.1-24B-Instruct-2503): Pixtral vision tower +
patch-merger projector + Mistral LM.

- Image placeholder: ``[IMG]`` (``PixtralProcessor.image_token``, ``transformers/models/pixtral/
  processing_pixtral.py``), which the processor expands per image into rows of ``[IMG]`` separated by
  ``[IMG_BREAK]`` and closed by ``[IMG_END]``: ``(W/(patch·merge) + 1) · H/(patch·merge)`` tokens for an
  image resized to H×W (``replace_image_token``) — the count depends on the image's size and aspect ratio.
- Forward inputs: ``pixel_values`` ``[n_images, 3, H_max, W_max]`` float32 and ``image_sizes``
  ``[n_images, 2]`` int64 (resized (H, W) per image). Images of different sizes are zero-padded at the
  bottom/right to the batch maximum, exactly as ``PixtralImageProcessor._pad_for_batching`` does and as
  ``models.base.collate`` does; the vision tower crops each image's patch grid back to ``image_sizes``
  before attention (``PixtralVisionModel.forward``, ``transformers/models/pixtral/modeling_pixtral.py``), so
  padding never reaches the model (without ``image_sizes`` the projector's patch merger, which iterates
  it, cannot run; the tower alone would take every image at the padded size).
- Parameter names (``transformers/models/mistral3/modeling_mistral3.py``): ``model.vision_tower.*``
  (``PixtralVisionModel``: ``patch_conv``, ``ln_pre``, ``transformer.layers.*``),
  ``model.multi_modal_projector.*`` (``norm``, ``patch_merger.merging_layer``, ``linear_1``, ``linear_2``),
  ``model.language_model.*`` + ``lm_head``.
- Save layout: transformers' own, no key renaming. transformers 5.19 writes the published files' names
  (``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*``,
  ``language_model.lm_head.weight``: it reverts its load-time ``llava`` key conversion,
  ``transformers/conversion_mapping.py``), which are vLLM 0.32's module names as they are
  (``vllm/model_executor/models/mistral3.py``: ``hf_to_vllm_mapper`` only rewrites the ``model.*`` spelling;
  the tower is ``PixtralHFVisionModel`` of ``pixtral.py`` with transformers' parameter names). The CLIP-tower
  renaming (``vision_tower.`` → ``vision_tower.vision_model.``) leaves every tower key unknown to both
  libraries: transformers re-initialises the tower on reload (regression test in
  ``tests/test_family_mistral3.py``).
- vLLM's CPU build (0.32) serves it (``vllm_cpu=None``): on the tiny checkpoints of
  ``tests/families/mistral3.py`` greedy tokens equal HF ``generate`` on an image and a text prompt
  (``tests/test_family_mistral3.py``), and prompt logprobs of an image prompt were measured within 9e-6 of
  HF's at every position. The published template writes ``<s>`` itself, so vLLM must get the
  prompt as token ids (``family.text_ids``: one BOS, ``[IMG]`` unexpanded — vLLM expands it): a text prompt
  would be tokenised with a second ``<s>``.
"""
from .base import Family


class Mistral3Family(Family):
    """``Family`` that refuses an image Pixtral expands into a single ``[IMG]`` token (an image of at most
    one merged patch, e.g. ≤ 28 px on the published checkpoint): transformers 5.19's
    ``Mistral3Model.get_image_features`` squeezes that one-token feature map to a vector and fails
    (``split_with_sizes``) — alone in a batch only, so it would pass cache-teacher beside larger images
    and crash train-student later. Rejected everywhere instead (``image_too_small``)."""

    def processor_call(self, processor, text: str, image) -> dict:
        from ..schemas.samples import Reject

        out = super().processor_call(processor, text, image)
        if image is not None:
            img_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
            if int((out["input_ids"] == img_id).sum()) == 1:
                raise Reject("image_too_small", f"a {image.size[0]}x{image.size[1]} image expands into one "
                                                f"[IMG] token, which transformers' Pixtral forward cannot take")
        return out


MISTRAL3 = Mistral3Family(
    name="mistral3",
    model_types=("mistral3",),
    forward_keys=("pixel_values", "image_sizes"),
    groups={
        "vision": r"(^|\.)vision_tower\.",
        "projector": r"(^|\.)multi_modal_projector\.",
        "lm": r"(^|\.)language_model\.|(^|\.)lm_head\.",
    },
    vllm_cpu=None,
    images_arg="flat",
    vllm_rename=None,
)

FAMILIES = (MISTRAL3,)
