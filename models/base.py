"""What differs between model families, behind one interface (design §2, issue #12).

A ``Family`` says, for one transformers ``model_type``:

- how one image looks in a rendered prompt (``placeholder``: unexpanded, as the chat template writes it)
  and how the processor is called for one sample (``processor_call``);
- which processor outputs the forward needs (``forward_keys``); the rest are dropped;
- the parameter groups ``freeze_*`` act on (``groups``: regexes over ``named_parameters`` names), and the
  language-model layers LoRA adapts by default (``lora_targets``, kept inside the "lm" group: ``lora_modules``);
- the save layout both transformers and vLLM load (``save``), and whether vLLM's CPU build serves it
  (``vllm_cpu`` / ``vllm_gpu``: None, or the reason it cannot);
- the prompt ``prompt_format=auto`` falls back to when a checkpoint ships no chat template
  (``default_chat_template``: PaliGemma's processor layout).

How many tokens an image expands into is never a per-model constant: it is read off the processor's
own output for that image (``models.encoding``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

# processor outputs aligned with input_ids ([1, L]): padded with the sequence, not concatenated
SEQ_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


@dataclass(frozen=True)
class Family:
    name: str  # "llava", "llava_next", "qwen2_vl", …
    model_types: tuple[str, ...]  # config.json "model_type" values this family serves
    forward_keys: tuple[str, ...]  # processor outputs the model's forward takes besides input_ids/attention_mask
    groups: dict = field(default_factory=dict)  # "vision" | "projector" | "lm" → regex over parameter names
    vllm_cpu: Optional[str] = None  # None: vLLM's CPU build serves it; else why not (refused up front)
    vllm_gpu: Optional[str] = None  # the same for vLLM's GPU build
    # tokenizer / processor kwargs for images: "flat" images=[img]; "nested" images=[[img]]
    images_arg: str = "flat"
    # the vision tower's keys vLLM wants renamed on save: (prefix, insert) e.g. ("vision_tower.", "vision_model.")
    vllm_rename: Optional[tuple[str, str]] = None
    # LoRA's default targets (train_student.lora.target_modules=null): leaf names of the language model's
    # attention and MLP projections; only modules inside the "lm" group are adapted (``lora_modules``)
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # the hidden states at the image positions depend only on the tokens up to them and the image (causal
    # attention): the teacher cache may store them once per unique image (schemas/teacher_cache/image_rows.py).
    # False where image/prefix tokens attend to later tokens (PaliGemma's prefix-LM, Gemma3's image blocks)
    causal_image_rows: bool = True

    # ------------------------------------------------------------------ prompts and processor calls

    def placeholder(self, processor) -> str:
        """One image in a rendered prompt, before the processor expands it."""
        return getattr(processor, "image_token", None) or "<image>"

    def processor_call(self, processor, text: str, image) -> dict:
        """The processor's outputs for one sample (``text`` already has the placeholder, or none),
        as tensors with a batch dimension of 1."""
        kw = {}
        if image is not None:
            kw["images"] = [[image]] if self.images_arg == "nested" else [image]
        out = processor(text=[text], return_tensors="pt", add_special_tokens=add_special_tokens(processor, text),
                        **kw)
        return dict(out)

    def image_token_id(self, model_config) -> Optional[int]:
        """The id of the token whose positions receive the vision features (``config.image_token_id`` or
        ``image_token_index`` as the checkpoint's config names it): the cache's ``image`` rows."""
        for key in ("image_token_id", "image_token_index"):
            v = getattr(model_config, key, None)
            if v is not None:
                return int(v)
        return None

    def default_chat_template(self, processor) -> Optional[str]:
        """The template ``prompt_format=auto`` uses when the checkpoint ships none (None: refuse)."""
        return None

    def text_ids(self, processor, text: str) -> list[int]:
        """Token ids of ``text`` as the processor tokenises it, image placeholder NOT expanded."""
        tok = getattr(processor, "tokenizer", processor)
        return list(tok(text, add_special_tokens=add_special_tokens(processor, text))["input_ids"])

    def forward_inputs(self, out: dict) -> dict:
        keys = set(self.forward_keys) | {"input_ids", "attention_mask"}
        return {k: v for k, v in out.items() if k in keys}

    # ------------------------------------------------------------------ parameter groups

    def group_params(self, model, group: str) -> list[str]:
        """Names of ``model``'s parameters in ``group``; raises ``ValueError`` when none match (a
        ``freeze_*`` that matches nothing would silently train what the user froze)."""
        pat = self.groups.get(group)
        if pat is None:
            raise ValueError(f"model family {self.name!r} defines no {group!r} parameter group")
        rx = re.compile(pat)
        names = [n for n, _ in model.named_parameters() if rx.search(n)]
        if not names:
            raise ValueError(f"the {group!r} parameter group ({pat!r}) matches no parameter of this "
                             f"{self.name} model: the checkpoint's layout is not the one llavadi knows")
        return names

    def lora_modules(self, model, targets: Optional[Sequence[str]] = None) -> list[str]:
        """Names (``named_modules``) of the modules of ``model`` LoRA adapts: leaf name in ``targets``
        (None: ``lora_targets``), every parameter in the "lm" group and in no "vision"/"projector" group — a
        vision tower's ``q_proj``/``gate_proj`` (Pixtral, Qwen2.5-VL, SigLIP) is never adapted. Raises
        ``ValueError`` naming the LM's linear layers when a target matches none of them."""
        targets = tuple(targets or self.lora_targets)
        lm = re.compile(self.groups["lm"])
        others = [re.compile(p) for g, p in self.groups.items() if g != "lm"]
        out, linear = [], set()
        for name, mod in model.named_modules():
            params = [f"{name}.{p}" for p, _ in mod.named_parameters()]
            if not params or not all(lm.search(p) and not any(o.search(p) for o in others) for p in params):
                continue
            leaf = name.rsplit(".", 1)[-1]
            if type(mod).__name__ == "Linear":
                linear.add(leaf)
            if leaf in targets:
                out.append(name)
        missing = [t for t in targets if not any(n.rsplit(".", 1)[-1] == t for n in out)]
        if missing:
            raise ValueError(f"LoRA target module(s) {missing} match no module of this {self.name} model's language "
                             f"model; its linear layers are named {sorted(linear)}")
        return out

    # ------------------------------------------------------------------ save layout

    def save(self, model, processor, out_dir: Path | str) -> None:
        """``save_pretrained`` of model + processor in the layout transformers and vLLM both load
        (world-readable files; vision keys renamed where vLLM needs it)."""
        out_dir = Path(out_dir)
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
        for p in out_dir.glob("*.safetensors"):
            if self.vllm_rename:
                rename_keys(p, *self.vllm_rename)
            os.chmod(p, 0o644)


def add_special_tokens(processor, text: str) -> bool:
    """Whether tokenising ``text`` should add the tokenizer's special tokens: not when the text
    already starts with the BOS the tokenizer would add (templates such as Gemma's write
    ``{{ bos_token }}`` themselves: adding another would double it)."""
    tok = getattr(processor, "tokenizer", processor)
    bos = getattr(tok, "bos_token", None)
    return not (bos and text.startswith(bos))


def rename_keys(path: Path, prefix: str, insert: str) -> None:
    """Insert ``insert`` after ``prefix`` in every key that has ``prefix`` and not yet ``insert``
    (transformers 5 saves a CLIP tower as ``vision_tower.embeddings.*``; vLLM wants
    ``vision_tower.vision_model.*``; transformers loads either — shared/cpu-environment.md)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {"format": "pt"}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    out = {}
    for k, v in sd.items():
        i = k.find(prefix)
        if i >= 0 and insert not in k:
            j = i + len(prefix)
            k = k[:j] + insert + k[j:]
        out[k] = v.contiguous()
    save_file(out, path, metadata=meta)


def collate(outs: Sequence[dict], pad_token_id: int) -> dict:
    """Per-sample processor outputs → one right-padded batch.

    Sequence-aligned keys (``SEQ_KEYS``, ``[1, L_i]``) are right-padded to ``max L_i``
    (``pad_token_id`` for ids, 0 otherwise): positions inside a row do not move. Every other tensor
    (``pixel_values``, ``image_sizes``, ``image_grid_thw``, ``pixel_attention_mask`` …) is padded
    with zeros in its non-leading dimensions to the batch maximum (LLaVA-NeXT patch counts,
    Pixtral image sizes) and concatenated along dim 0 over the samples that have it — how each
    family's own processor batches them."""
    import torch

    L = max(int(o["input_ids"].shape[-1]) for o in outs)
    batch: dict = {}
    keys = sorted({k for o in outs for k in o})
    for k in keys:
        if k in SEQ_KEYS:
            fill = pad_token_id if k == "input_ids" else 0
            rows = []
            for o in outs:
                v = o.get(k)
                if v is None:
                    v = torch.zeros_like(o["input_ids"])
                v = v.reshape(1, -1)
                rows.append(torch.nn.functional.pad(v, (0, L - v.shape[1]), value=fill))
            batch[k] = torch.cat(rows, 0)
        else:
            vals = [o[k] for o in outs if k in o and o[k] is not None]
            if not vals:
                continue
            shape = [max(int(v.shape[d]) for v in vals) for d in range(1, vals[0].dim())]
            padded = []
            for v in vals:
                pad = []
                for d in reversed(range(1, v.dim())):
                    pad += [0, shape[d - 1] - int(v.shape[d])]
                padded.append(torch.nn.functional.pad(v, pad) if any(pad) else v)
            batch[k] = torch.cat(padded, 0)
    return batch
