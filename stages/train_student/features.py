"""Feature distillation: the projector of the student's hidden states, the feature loss, and the
image x answer affinity loss.

Features (``FeatureProjector``, ``feature_loss``)
-------------------------------------------------
``FeatureProjector(Hs, H)`` maps the student's hidden state to the teacher's width (``"mlp"``:
Linear-GELU-Linear, the study's; ``"linear"``: one Linear; ``"none"``: the identity, for ``Hs == H``).
``feature_loss`` is ``"mse"`` (per row: the mean over ``H`` of the squared error; ``"mean"`` then
averages rows, i.e. the mean over all ``N * H`` elements, as ``F.mse_loss``) or ``"cosine"`` (per row
``1 - cos_sim``).

Affinity (``affinity_loss``)
----------------------------
The study's ``align_affinity`` (LLAVADI, ``projects/distill/distill_llava_llama.py``): both models' final
hidden states are L2-normalised (``F.normalize``), the cosine block between image positions and answer
positions is formed in each, and the student's is regressed onto the teacher's by squared error,
averaged over the block's elements (the study's ``.sum() / masks.sum()``). The cache stores the
teacher's block (``affinity``, ``[n_image, n_answer]`` per sample), so only the student's is formed here.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .divergences import REDUCTIONS, _no_autocast, _reduce

FEATURE_KINDS = ("mse", "cosine")
PROJECTOR_KINDS = ("mlp", "linear", "none")


# ----------------------------------------------------------------------------------- features
class FeatureProjector(nn.Module):
    """Student hidden ``[N, in_dim]`` -> teacher width ``[N, out_dim]``; trained, not saved with the student.

    ``kind="mlp"``: Linear(in, out) - GELU - Linear(out, out) (the study's); ``kind="linear"``:
    Linear(in, out); the input is cast to the projector's parameter dtype. ``kind="none"``: the identity
    (no parameters: the student's hidden state is compared as it is, in its own dtype; ``feature_loss``
    upcasts), which needs ``in_dim == out_dim`` (``ValueError`` naming both otherwise).
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp"):
        super().__init__()
        if kind not in PROJECTOR_KINDS:
            raise ValueError(f"kind must be one of {PROJECTOR_KINDS}, got {kind!r}")
        self.in_dim, self.out_dim, self.kind = int(in_dim), int(out_dim), kind
        if kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        elif kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
        elif self.in_dim != self.out_dim:
            raise ValueError(f"projector kind='none' (identity) needs the student's hidden size {self.in_dim} to "
                             f"equal the teacher's {self.out_dim}: use kind='linear' or 'mlp'")
        else:
            self.net = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return x
        dtype = next(self.parameters()).dtype
        return self.net(x.to(dtype))

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, kind={self.kind!r}"


def feature_loss(projected: torch.Tensor, teacher_hidden: torch.Tensor, kind: str = "mse",
                 reduction: str = "mean") -> torch.Tensor:
    """Feature distillation between ``projected [N, H]`` and the teacher's ``hidden [N, H]``.

    ``"mse"``: per row the mean over ``H`` of ``(projected - teacher)**2`` (``"mean"`` = mean over
    all ``N * H`` elements); ``"cosine"``: per row ``1 - cos_sim`` (eps 1e-8). Float32; the teacher
    is detached. Returns a scalar or ``[N]`` (``"none"``).
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"kind must be one of {FEATURE_KINDS}, got {kind!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if projected.dim() != 2 or tuple(projected.shape) != tuple(teacher_hidden.shape):
        raise ValueError(f"projected {tuple(projected.shape)} and teacher_hidden {tuple(teacher_hidden.shape)} "
                         f"must both be [N, H]")
    with _no_autocast(projected.device):
        p = projected.float()
        t = teacher_hidden.detach().float()
        if kind == "mse":
            rows = (p - t).pow(2).mean(dim=-1)
        else:
            rows = 1.0 - F.cosine_similarity(p, t, dim=-1, eps=1e-8)
        return _reduce(rows, reduction)


def affinity_loss(student_image_hidden: torch.Tensor, student_answer_hidden: torch.Tensor,
                  teacher_block: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Image x answer affinity distillation (the study's ``align_affinity``, module docstring).

    ``student_image_hidden [n_i, Hs]`` and ``student_answer_hidden [n_a, Hs]`` (any float; the student's
    hidden states at one sample's image and answer positions), ``teacher_block [n_i, n_a]`` (the cache's
    ``affinity``: the teacher's cosines, detached). The student's block is
    ``S = normalize(image) @ normalize(answer).T`` (``F.normalize``, eps 1e-12) and the loss is
    ``(S - teacher_block)**2`` elementwise: summed (``"sum"``), averaged over the ``n_i * n_a`` elements
    (``"mean"``, the study's per-sample normaliser; 0 for an empty block) or the ``[n_i, n_a]`` block
    (``"none"``). Float32 (float64 if any input is float64). Raises ``ValueError`` on mismatched shapes or
    an unknown ``reduction``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    hi, ha, tb = student_image_hidden, student_answer_hidden, teacher_block
    if hi.dim() != 2 or ha.dim() != 2 or hi.shape[1] != ha.shape[1] or tuple(tb.shape) != (hi.shape[0], ha.shape[0]):
        raise ValueError(f"student_image_hidden {tuple(hi.shape)} must be [n_i, Hs], student_answer_hidden "
                         f"{tuple(ha.shape)} [n_a, Hs] and teacher_block {tuple(tb.shape)} [n_i, n_a]")
    dt = torch.float64 if torch.float64 in (hi.dtype, ha.dtype, tb.dtype) else torch.float32
    with _no_autocast(hi.device):
        s = F.normalize(hi.to(dt), dim=-1) @ F.normalize(ha.to(dt), dim=-1).T
        return _reduce((s - tb.detach().to(dt)).square(), reduction)
