"""The student's output layer as the fused head loss reads it (issue #22, class 6).

``losses.fused_head_loss`` does not call the LM head: it takes the head's weight and bias and makes the
logits itself, a block of rows at a time. So whatever wraps the head must be honoured here, or the loss
trains a head other than the one the model runs. Before this module the loop passed ``head.weight``,
which for a PEFT-wrapped head is the frozen base weight: a LoRA adapter on ``lm_head`` got no gradient
(its ``lora_B`` stayed exactly 0; unsloth#9326 is the same fault).

``operands(head, h)`` returns ``(x, weight, bias)`` with ``F.linear(x, weight, bias) == head(h)`` for
every head the trainer can meet:

- a plain ``nn.Linear`` (also inside an FSDP2 root unit: the loss runs inside the root's forward, where
  its parameters are all-gathered, so ``weight`` is the full ``[V, Hs]`` tensor; a ``DTensor`` — a
  sharded weight read outside that forward — is refused, ``HeadError``): ``(h, W, b)``;
- a PEFT LoRA ``Linear`` (``train_student.lora.target_modules`` naming ``lm_head``), whose forward is
  ``W h + b + Σ_a s_a · B_a A_a dropout_a(h)`` over its active adapters (PEFT ``tuners/lora/layer.py``):
  ``x = [h | s_a · A_a dropout_a(h) …]`` ``[N, Hs + Σ r_a]`` and ``weight = [W | B_a …]``
  ``[V, Hs + Σ r_a]`` — the same logits, and autograd carries the fused loss's ``dL/dx`` and
  ``dL/dweight`` to ``h``, ``A_a`` and ``B_a`` (``W`` is frozen). The dropout is the adapter's own module,
  drawn once per micro-batch as PEFT's forward draws it. Cost: the concatenated weight is one more
  ``[V, Hs]`` copy per micro-batch (the fused loss's gradient buffer for it is ``[V, Hs + Σ r]``).

Anything else — DoRA, ``lora_bias``, ``fan_in_fan_out``, an adapter merged into the base weight, a
wrapper this module does not know — is refused before work (``problems``, from the preflight on a
meta-device student), naming the module: the loss would silently read the wrong weight.
"""
from __future__ import annotations

from typing import Optional

import torch


class HeadError(ValueError):
    """The fused head loss cannot read this output layer faithfully (the message says why)."""


def _lora_layer(head) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # PEFT absent: nothing can be wrapped by it
        return False
    return isinstance(head, LoraLayer)


def problems(head) -> list[str]:
    """Why ``operands`` cannot read ``head`` (``[]`` when it can); structural only, so it works on a
    meta-device model before any weight loads."""
    if _lora_layer(head):
        base = head.get_base_layer()
        if not isinstance(base, torch.nn.Linear) or _lora_layer(base):
            return [f"the LM head is a LoRA layer around {type(base).__name__}, not an nn.Linear: the fused head "
                    f"loss cannot read it; leave lm_head out of train_student.lora.target_modules"]
        bad = [k for k in ("use_dora", "lora_bias") if any(dict(getattr(head, k, {}) or {}).values())]
        if getattr(head, "fan_in_fan_out", False):
            bad.append("fan_in_fan_out")
        if getattr(head, "merged", False):
            bad.append("merged adapters")
        if bad:
            return [f"the LM head's LoRA uses {', '.join(bad)}, which the fused head loss does not compute: "
                    f"leave lm_head out of train_student.lora.target_modules"]
        return []
    if isinstance(head, torch.nn.Linear):
        return []
    return [f"the LM head is a {type(head).__name__}, not an nn.Linear (nor a PEFT LoRA Linear): the fused head "
            f"loss reads a weight [V, Hs] and cannot honour this module's forward"]


def operands(head, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(x [N, Hs'], weight [V, Hs'], bias [V] or None)`` with ``F.linear(x, weight, bias)`` equal to
    ``head(h)`` for ``h [N, Hs]`` (float; rows = answer positions), differentiable to ``h`` and to every
    trained parameter of ``head`` (module docstring). Raises ``HeadError`` for a head ``problems`` refuses
    or a sharded (``DTensor``) weight."""
    p = problems(head)
    if p:
        raise HeadError(p[0])
    if not _lora_layer(head):
        _not_sharded(head.weight)
        return h, head.weight, head.bias
    base = head.get_base_layer()
    _not_sharded(base.weight)
    xs, ws = [h], [base.weight]
    if not head.disable_adapters:
        for name in head.active_adapters:
            if name not in head.lora_A:
                continue
            a, b = head.lora_A[name], head.lora_B[name]
            u = a(head.lora_dropout[name](h.to(a.weight.dtype))) * head.scaling[name]  # [N, r]
            xs.append(u.to(h.dtype))
            ws.append(b.weight.to(base.weight.dtype))
    if len(xs) == 1:
        return h, base.weight, base.bias
    return torch.cat(xs, dim=-1), torch.cat(ws, dim=-1), base.bias


def _not_sharded(w) -> None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor has no FSDP2 either
        return
    if isinstance(w, DTensor):
        raise HeadError("the LM head's weight is a sharded DTensor here: the fused head loss must run inside the "
                        "FSDP root unit's forward (objective.Objective), where the weight is all-gathered")
