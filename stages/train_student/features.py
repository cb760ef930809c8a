"""Feature distillation: the projector of the student's hidden states and the feature loss.

Features (``FeatureProjector``, ``feature_loss``)
-------------------------------------------------
``FeatureProjector(Hs, H)`` maps the student's hidden state to the teacher's width (``"mlp"``:
Linear-GELU-Linear, the study's; ``"linear"``: one Linear). ``feature_loss`` is ``"mse"`` (per row:
the mean over ``H`` of the squared error; ``"mean"`` then averages rows, i.e. the mean over all
``N * H`` elements, as ``F.mse_loss``) or ``"cosine"`` (per row ``1 - cos_sim``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .divergences import REDUCTIONS, _no_autocast, _reduce

FEATURE_KINDS = ("mse", "cosine")
PROJECTOR_KINDS = ("mlp", "linear")


# ----------------------------------------------------------------------------------- features
class FeatureProjector(nn.Module):
    """Student hidden ``[N, in_dim]`` -> teacher width ``[N, out_dim]``; trained, not saved with the student.

    ``kind="mlp"``: Linear(in, out) - GELU - Linear(out, out) (the study's); ``kind="linear"``:
    Linear(in, out). The input is cast to the projector's parameter dtype.
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp"):
        super().__init__()
        if kind not in PROJECTOR_KINDS:
            raise ValueError(f"kind must be one of {PROJECTOR_KINDS}, got {kind!r}")
        self.in_dim, self.out_dim, self.kind = int(in_dim), int(out_dim), kind
        if kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        else:
            self.net = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
