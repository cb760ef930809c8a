"""LoRA for ``llavadi train-student`` (``train_student.lora``; issue #15 item 3), with PEFT.

What trains (``wrap``):

- **LoRA adapters** on the student's language-model linear layers: the leaf names of
  ``train_student.lora.target_modules`` (null: the family's ``models.base.Family.lora_targets``,
  the attention and MLP projections), restricted by ``Family.lora_modules`` to modules of the
  family's "lm" parameter group — the vision tower's ``q_proj``/``gate_proj`` … are never adapted.
  An adapted ``nn.Linear`` computes ``W x + (alpha / rank) · B A dropout(x)`` with ``A [rank, in]``
  (Kaiming-uniform init), ``B [out, rank]`` (zeros: the wrapped student starts as the student) —
  Hu et al. 2021, "LoRA", §4.1; PEFT's ``tuners/lora/layer.py`` (``scaling = lora_alpha / r``).
- **In full**, as without LoRA: every parameter outside the "lm" group that no ``freeze_*`` flag
  freezes — the multimodal projector by default (``freeze_projector=false``), the vision tower only
  with ``freeze_vision=false``. The LM's base weights (LM head and embeddings included) are frozen
  whatever ``freeze_lm`` says. These are plain ``requires_grad`` parameters, not PEFT
  ``modules_to_save``: a projector is not always a module of its own (LLaVA-NeXT's
  ``image_newline`` and Gemma3's ``mm_input_projection_weight`` are bare parameters), and
  ``modules_to_save`` would keep a second copy of what it wraps.
- llavadi's feature projector (``objective.Objective.projector``) is untouched: trained and checkpointed in
  ``training_state.pt`` as without LoRA.
- ``lm_head`` and ``embed_tokens`` may be targets too (issue #22 class 6). The embeddings run in the
  student's own forward, so PEFT's ``lora.Embedding`` (``E[id] + (alpha / rank) · (B A)ᵀ[id]``) trains as
  any layer. The LM head is not called by the loss — ``losses.fused_head_loss`` reads its weight — so
  ``head.operands`` hands the loss the adapted head's effective operands (base weight and ``B``, input and
  ``s·A dropout(h)``): the adapter gets its gradient and the merged head is ``W + s·B A``. Refused before
  work: either target on a student whose embeddings and head are one tied matrix (merging would change
  both), and an adapted head the fused loss cannot read (DoRA…: ``head.problems``).

Checkpoint layout (``save``), ``train_student/checkpoints/step_NNNNNN/``:

- ``adapter/adapter_config.json`` + ``adapter/adapter_model.safetensors``: PEFT's own format
  (``PeftModel.save_pretrained``; ``PeftModel.from_pretrained(student, "…/adapter")`` loads it), the
  adapter tensors only: ``save_embedding_layers=False``, since PEFT's default would add the whole base
  embedding / head matrix whenever ``embed_tokens`` / ``lm_head`` is a target, though LoRA never changes it;
  ``adapter/trained_base_params.safetensors``: the parameters trained in full (base-model names,
  float32 as trained). Kept inside ``adapter/`` so that no stray ``*.safetensors`` sits beside a
  merged student (vLLM loads every ``*.safetensors`` of a model directory).
- ``training_state.pt`` / ``trainer_state.json`` as without LoRA (optimizer over the trainable
  parameters only, scheduler, feature projector, RNG; step and loader position).
- The final step also holds the **merged** student (``merge_and_unload``: ``W + (alpha/rank)·B A``
  in float32, then the family's ``save``): a plain model directory that transformers and vLLM load
  with no PEFT. Earlier steps hold no full model (the base is ``train_student.student``).

Resume (``wrap`` with ``resume``) rebuilds the student from ``train_student.student``, wraps it,
and loads the adapter and the trained-in-full parameters: bit-for-bit the state that was saved.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import torch

ADAPTER_DIR = "adapter"
TRAINED_FILE = "trained_base_params.safetensors"
ADAPTER_NAME = "default"  # PEFT's adapter name (dropped from the saved keys by PEFT)


def is_lora_param(name: str) -> bool:
    """A LoRA parameter of the wrapped student: PEFT's ``lora_`` prefix (``peft.tuners.lora.LoraModel.prefix``,
    what its ``mark_only_lora_as_trainable`` tests) — ``….lora_A.default.weight`` / ``lora_B`` of a Linear,
    ``….lora_embedding_A.default`` / ``lora_embedding_B`` of an Embedding."""
    return ".lora_" in name


def target_regex(modules: list[str]) -> str:
    """A PEFT ``target_modules`` regex (matched with ``re.fullmatch`` against each module name,
    ``peft/utils/other.py`` ``match_target_against_key``) that matches exactly the module names of
    ``modules`` and their siblings at other layer indices: layer numbers become ``\\d+``, leaves under one
    parent are grouped, e.g. ``model\\.language_model\\.layers\\.\\d+\\.self_attn\\.(?:q_proj|v_proj)``."""
    by_parent: dict[str, list[str]] = {}
    for name in modules:
        parent, _, leaf = name.rpartition(".")
        pat = re.sub(r"\\\.\d+(?=\\\.|$)", r"\\.\\d+", re.escape(parent))
        leaves = by_parent.setdefault(pat, [])
        if leaf not in leaves:
            leaves.append(leaf)
    parts = [(f"{p}\\." if p else "") + (f"(?:{'|'.join(ls)})" if len(ls) > 1 else ls[0]) for p, ls in by_parent.items()]
    return "|".join(parts)


def peft_config(model, family, c):
    """(``peft.LoraConfig``, the module names it adapts) for ``train_student`` config ``c`` and the unwrapped
    ``model``: r = ``lora.rank``, ``lora_alpha`` = ``lora.alpha``, ``lora_dropout`` = ``lora.dropout``, no bias
    training, target modules = ``target_regex(family.lora_modules(model, lora.target_modules))``
    (``ValueError`` when a target name matches no language-model layer)."""
    from peft import LoraConfig

    mods = family.lora_modules(model, c.lora.target_modules)
    return LoraConfig(r=c.lora.rank, lora_alpha=c.lora.alpha, lora_dropout=c.lora.dropout, bias="none",
                      target_modules=target_regex(mods)), mods


def problems(model, family, c) -> list[str]:
    """Config problems found on a (meta-device) student before any weight loads: LoRA with FSDP, target names
    matching no LM layer, ``embed_tokens``/``lm_head`` targets on tied embeddings, and an adapted LM head the fused
    head loss cannot read (``head.problems``; ``model`` is wrapped in place to see it, so pass a throwaway)."""
    if not c.lora.enabled:
        return []
    if getattr(c, "parallel", "ddp") != "ddp":  # FSDP's sharded checkpoints hold no adapter (not built nor tested)
        return [f"train_student.lora.enabled=true is not supported with parallel={c.parallel} (FSDP's sharded "
                f"checkpoints hold no adapter): use parallel=ddp"]
    try:
        cfg, mods = peft_config(model, family, c)
    except ValueError as e:
        return [f"train_student.lora.target_modules: {e}"]
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    io_names = {n for n, m in model.named_modules() if m is out_emb or m is in_emb}
    if io_names & set(mods) and out_emb is not None and out_emb.weight is in_emb.weight:
        # one matrix: merge_and_unload would add the embedding's (or head's) update to both
        return [f"train_student.lora.target_modules adapts {sorted(io_names & set(mods))} of a student whose input "
                f"embeddings and LM head are one tied matrix: the merged student would not be the one trained "
                f"(merging changes both); leave embed_tokens and lm_head out of the targets"]
    from peft import get_peft_model

    from . import head

    get_peft_model(model, cfg, adapter_name=ADAPTER_NAME)  # on the meta model: the head exactly as training sees it
    return [f"train_student.lora.target_modules: {p}" for p in head.problems(model.get_output_embeddings())]


def trained_in_full(student, family, frozen: set[str]) -> list[str]:
    """Parameter names (unwrapped student) trained in full beside the adapters: not frozen by a
    ``freeze_*`` flag and outside the family's "lm" group."""
    lm = set(family.group_params(student, "lm"))
    return [n for n, _ in student.named_parameters() if n not in frozen and n not in lm]


def wrap(student, family, c, frozen: set[str], resume: Optional[Path] = None):
    """Inject LoRA adapters into ``student`` (in place: its forward now runs them) and set
    ``requires_grad``: True on the adapters and on ``trained_in_full`` parameters, False elsewhere.
    ``frozen``: the names ``freeze_*`` froze (``setup.frozen_parameters``). With ``resume`` (a checkpoint
    directory) the adapter and trained-in-full parameters are loaded from it. Returns the ``PeftModel``
    (``.base_model.model is student``), the handle ``save`` takes."""
    from peft import get_peft_model

    cfg, mods = peft_config(student, family, c)
    full = trained_in_full(student, family, frozen)
    peft_model = get_peft_model(student, cfg, adapter_name=ADAPTER_NAME)
    wrapped = sorted(n for n, m in student.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    if wrapped != sorted(mods):  # the regex must adapt exactly the modules Family.lora_modules chose
        raise RuntimeError(f"LoRA wrapped {sorted(set(wrapped) ^ set(mods))[:8]} contrary to the family's choice")
    keep = set(full)
    for n, p in student.named_parameters():
        p.requires_grad_(is_lora_param(n) or n in keep)
    if resume is not None:
        load(peft_model, Path(resume))
    return peft_model


def load(peft_model, ckpt: Path) -> None:
    """Load a checkpoint's adapter and trained-in-full parameters into the wrapped student, checking that
    every saved tensor has a place and every trainable parameter a saved value."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    student = peft_model.base_model.model
    dev = next(student.parameters()).device
    sd = load_file(str(ckpt / ADAPTER_DIR / "adapter_model.safetensors"), device=str(dev))
    want = set(get_peft_model_state_dict(peft_model, adapter_name=ADAPTER_NAME, save_embedding_layers=False))
    if set(sd) != want:
        raise RuntimeError(f"{ckpt}/{ADAPTER_DIR}: adapter keys differ from this run's LoRA setup "
                           f"(e.g. {sorted(set(sd) ^ want)[:4]})")
    set_peft_model_state_dict(peft_model, sd, adapter_name=ADAPTER_NAME)
    full = load_file(str(ckpt / ADAPTER_DIR / TRAINED_FILE), device=str(dev))
    params = dict(student.named_parameters())
    expect = {n for n, p in params.items() if p.requires_grad and not is_lora_param(n)}
    if set(full) != expect:
        raise RuntimeError(f"{ckpt}/{ADAPTER_DIR}/{TRAINED_FILE}: its parameters differ from the ones this run trains "
                           f"in full (e.g. {sorted(set(full) ^ expect)[:4]})")
    with torch.no_grad():
        for n, v in full.items():
            params[n].copy_(v)


def save(peft_model, model_adapter, out_dir: Path, *, merged: bool) -> None:
    """Write ``out_dir/adapter/`` (PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``, and
    ``trained_base_params.safetensors``); with ``merged`` also the merged student in ``out_dir`` by the
    family's ``save`` (the layout transformers and vLLM load). ``model_adapter``: the student's
    ``models.adapter.ModelAdapter`` (family + processor). Merging replaces the LoRA layers of the
    in-memory student by merged ``nn.Linear`` layers (``merge_and_unload``): the final checkpoint only."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    student = peft_model.base_model.model
    ad = out_dir / ADAPTER_DIR
    # the adapter's own tensors only: with embed_tokens / lm_head among the targets PEFT's default ("auto") would
    # also save the whole base embedding / head matrix, which LoRA never changes (the base is train_student.student)
    peft_model.save_pretrained(str(ad), save_embedding_layers=False)
    full = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in student.named_parameters()
            if p.requires_grad and not is_lora_param(n)}
    save_file(full, str(ad / TRAINED_FILE), metadata={"format": "pt"})
    for p in ad.iterdir():
        os.chmod(p, 0o644)
    if merged:
        model_adapter.family.save(peft_model.merge_and_unload(), model_adapter.processor, out_dir)
