"""The student, its feature projectors and the declared terms (``terms.py``) as one module: DDP and FSDP must
see every use of the student's parameters (the LM head too) inside ``forward``, and sync the projectors'
gradients with the student's.

``forward(mb)`` returns ``(loss, values)``: ``loss = Σ_t weight_t · value_t`` of this rank's share of the
global batch and ``values[t.name]`` (detached). Each term's rows carry a weight — ``1 / N_t`` (``reduction:
token``, ``N_t`` = the term's rows in the global batch, all ranks) or ``1 / (n_{s,t} · S_t)`` (``sample``:
``n_{s,t}`` the sample's rows of that term, ``S_t`` the samples that have any) — from the counts the step
all-reduced first (``mb["norms"]``), so every rank's loss is its exact share of the global mean and the
summed gradients equal the single-process ones whatever the world size.

Head terms (CE, KD) run through ``losses.fused_head_loss`` in one pass over KD's rows (CE weighs only the
answer rows among them): the student's logits exist one block of rows at a time, never ``[N, V]``.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import losses
from .batch import row_key
from .head import operands as head_operands
from .terms import Term, home
from ...schemas.teacher_cache.fields import KIND_ANSWER, hidden_field_name

# The fused head's row blocks: on CPU about this many bytes of float32 logits (blocks this small come from
# the allocator's reused memory and stay in cache, while the per-block [V, Hs] head-gradient update stays
# amortised: measured on V = 32064, 16 MiB blocks ~1.5-2x faster than 8 MiB or one block at Hs 768); on GPU
# blocks of ``kd.chunk_size`` rows (big kernels). ``kd.chunk_size`` caps the block on both.
CPU_LOGITS_BLOCK_BYTES = 16 << 20


def block_rows(vocab: int, chunk_size: int, device: torch.device) -> int:
    if device.type != "cpu":
        return int(chunk_size)
    return max(16, min(int(chunk_size), CPU_LOGITS_BLOCK_BYTES // (4 * max(1, vocab))))


def projector_key(t: Term) -> str:
    """ModuleDict key of a feature term's projector (``feat`` / ``feat[s,t]`` → ``feat`` / ``feat_s_t``)."""
    return t.name.replace("[", "_").replace(",", "_").replace("]", "").replace("-", "m")


def counts(terms: list[Term], mb: dict) -> list[float]:
    """``[rows_t, samples_t]`` for every term of one micro-batch (affinity: block elements, blocks)."""
    out = []
    for t in terms:
        if t.name == "aff":
            out += [float(sum(a["block"].numel() for a in mb["aff"])), float(len(mb["aff"]))]
            continue
        s = mb["sets"][row_key(home(t, terms))]
        sel = s["sample"][_in_term(t, s)] if t.name == "ce" else s["sample"]
        out += [float(sel.numel()), float(torch.unique(sel).numel())]
    return out


def _in_term(t: Term, s: dict) -> torch.Tensor:
    return s["kind"] == KIND_ANSWER if t.name == "ce" else torch.ones_like(s["sample"], dtype=torch.bool)


def row_weights(sample: torch.Tensor, mask: torch.Tensor, n: float, s: float, reduction: str) -> torch.Tensor:
    """Per-row weights of one term (module docstring): ``[N]`` float64; 0 on rows outside the term."""
    m = mask.to(torch.float64)
    if reduction == "token":
        return m / max(n, 1.0)
    per = torch.zeros(int(sample.max()) + 1 if sample.numel() else 1, dtype=torch.float64, device=sample.device)
    per.index_add_(0, sample, m)
    return m / (per[sample].clamp(min=1.0) * max(s, 1.0))


def sample_weights(s: dict, t: float) -> Optional[torch.Tensor]:
    """RS-KD's self-normalised importance weights of the cached draws (Anshumann et al., ACL 2025): drawn from
    ``q ∝ p^(1/t)``, a draw x weighs ``p(x)/q(x) ∝ p(x)^(1 - 1/t)``, normalised per row; None (each draw 1/s) when
    the proposal was the teacher itself (``t = 1``)."""
    if t == 1.0:
        return None
    return torch.softmax((1.0 - 1.0 / t) * s["sampled_logprobs"].double(), dim=-1).to(torch.float32)


class Objective(torch.nn.Module):
    """``student`` (a transformers image-text-to-text model), one ``FeatureProjector`` per feature term
    (``projector``: a ModuleDict; trained, checkpointed for resume, never saved with the student), the terms,
    the teacher head (``head_t``: ``{"weight", "bias"}`` for the exact KD source or CE on the teacher's argmax)."""

    def __init__(self, student, terms: list[Term], teacher_hidden: dict, head_t: Optional[dict], autocast,
                 reduction: str):
        super().__init__()
        self.student, self.terms, self.head_t = student, terms, head_t
        self.autocast, self.reduction = autocast, reduction
        hs = student.config.get_text_config().hidden_size
        self.projector = torch.nn.ModuleDict({
            projector_key(t): losses.FeatureProjector(hs, teacher_hidden[t.params["teacher_layer"]], t.params["projector"])
            for t in terms if t.name.startswith("feat")})

    def forward(self, mb: dict):
        norms = mb["norms"]  # term name → (rows, samples) in the global batch
        layers = sorted({t.layer for t in self.terms if t.layer is not None and t.layer != -1})
        with self.autocast():
            out = self.student.model(**mb["inputs"], output_hidden_states=bool(layers))
        flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731 - [B, L, H] → [B·L, H]
        hid = {-1: flat(out.last_hidden_state), **{x: flat(out.hidden_states[x]) for x in layers}}
        total = hid[-1].new_zeros((), dtype=torch.float32)
        values = {}
        head = [t for t in self.terms if t.head]
        if head:
            loss, vals = self._head(head, hid[-1], mb, norms)
            total, values = total + loss, {**values, **vals}
        for t in self.terms:
            if t.name.startswith("feat"):
                s = mb["sets"][row_key(t.kinds)]
                with self.autocast():
                    proj = self.projector[projector_key(t)](hid[t.layer][s["rows"]])
                rows = losses.feature_loss(proj.float(), s[hidden_field_name(t.params["teacher_layer"])],
                                           kind=t.params["kind"], reduction="none")
                w = row_weights(s["sample"], _in_term(t, s), *norms[t.name], self.reduction).to(rows.dtype)
                v = (rows * w).sum()
                total, values[t.name] = total + t.weight * v, v.detach()
            elif t.name == "aff":
                v = self._affinity(hid[-1], mb, norms[t.name])
                total, values[t.name] = total + t.weight * v, v.detach()
        return total, values

    def _head(self, head: list[Term], h_all: torch.Tensor, mb: dict, norms: dict):
        """CE and KD in one fused pass over their shared rows."""
        kd = next((t for t in head if t.name == "kd"), None)
        ce = next((t for t in head if t.name == "ce"), None)
        s = mb["sets"][row_key(home(head[0], self.terms))]
        h = h_all[s["rows"]].float()
        kw, teacher = {}, {}
        if ce is not None:
            kw["ce_weight"] = ce.weight
            kw["ce_row_weight"] = row_weights(s["sample"], _in_term(ce, s), *norms["ce"], self.reduction)
            kw["targets"] = s["token_ids"] if ce.params["target"] == "label" else self._argmax(s)
        else:
            kw["ce_weight"] = 0.0
        if kd is not None:
            p = kd.params
            kw.update(kd_weight=kd.weight, kind=p["kind"], beta=p["beta"], temperature=p["temperature"],
                      standardize=p["standardize"],
                      kd_row_weight=row_weights(s["sample"], _in_term(kd, s), *norms["kd"], self.reduction))
            if p["source"] == "exact":
                teacher = dict(teacher_hidden=s["hidden"], teacher_head_weight=self.head_t["weight"],
                               teacher_head_bias=self.head_t.get("bias"))
            elif p["source"] == "sampled":
                teacher = dict(sampled_ids=s["sampled_ids"], sample_weights=sample_weights(s, p["sample_temperature"]))
            else:
                teacher = dict(topk_ids=s["topk_ids"], topk_logprobs=s["topk_logprobs"],
                               teacher_logit_std=s["logit_stats"][:, 1] if "logit_stats" in s else None)
        else:
            kw["kd_weight"] = 0.0
        x, w, b = head_operands(self.student.get_output_embeddings(), h)  # LoRA on lm_head included (head.py)
        chunk = kd.params["chunk_size"] if kd is not None else 512
        loss, ce_v, kd_v = losses.fused_head_loss(x, w, b, block_rows=block_rows(w.shape[0], chunk, h.device),
                                                  **kw, **teacher)
        vals = {}
        if ce is not None:
            vals["ce"] = ce_v.detach()
        if kd is not None:
            vals["kd"] = kd_v.detach()
        return loss, vals

    def _argmax(self, s: dict) -> torch.Tensor:
        """The teacher's most likely next token per row: the top-1 id, else from the cached hidden + head."""
        if "topk_ids" in s:
            return s["topk_ids"][:, 0]
        return losses.teacher_argmax(s["hidden"], self.head_t["weight"], self.head_t.get("bias"))

    def _affinity(self, h_all: torch.Tensor, mb: dict, norm) -> torch.Tensor:
        total = h_all.new_zeros((), dtype=torch.float32)
        elements, samples = norm
        for a in mb["aff"]:
            sq = losses.affinity_loss(h_all[a["img"]].float(), h_all[a["ans"]].float(), a["block"], reduction="sum")
            n = a["block"].numel()
            total = total + (sq / max(elements, 1.0) if self.reduction == "token" else sq / (n * max(samples, 1.0)))
        return total
