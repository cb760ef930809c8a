"""Distillation losses for ``llavadi train-student`` (pure PyTorch).

Every function takes **answer positions only**, flattened to rows: ``N`` answer tokens, vocabulary
``V``, top-k width ``k``, hidden sizes ``Hs`` (student) / ``Ht`` / ``H`` (teacher).

==========================  ===================  ==========================================
argument                    shape                dtype
==========================  ===================  ==========================================
``student_logits``          ``[N, V]``           float64 / float32 / float16 / bfloat16
``teacher_logits``          ``[N, V]``           float64 / float32 / float16 / bfloat16 (``-inf`` = p 0)
``topk_ids``                ``[N, k]``           int32 / int64 (distinct ids per row)
``topk_logprobs``           ``[N, k]``           float64 / float32 / float16, raw log-probs at T = 1
                                                 (``-inf`` = a zero-probability entry)
``teacher_logit_std``       ``[N]`` or ``[N,1]`` float32 / float64 (the cache's ``logit_stats[:, 1]``)
``student_hidden``          ``[N, Hs]``          any float (the student's final hidden state)
``student_head_weight``     ``[V, Hs]``          any float (the student's ``lm_head.weight``)
``teacher_hidden``          ``[N, Ht]``          any float (the cache's ``hidden``)
``teacher_head_weight``     ``[V, Ht]``          any float (``teacher_head.safetensors``)
==========================  ===================  ==========================================

Conventions
-----------
* Precision: the arithmetic runs in the inputs' precision -- float64 when any floating input
  (student logits / hidden states / head, teacher logits / log-probs) is float64, float32
  otherwise (half inputs are upcast). Autocast is switched off inside the losses, and results
  come back in that dtype. The teacher's tail mass ``1 - sum(exp(topk_logprobs))`` is always
  formed in float64 (see below), whatever the compute dtype.
* The teacher side is a constant target: it is detached and never receives gradients.
* ``kind``: ``"fkl"`` = KL(teacher || student) (the default, the study's: LLAVADI, Xu et al.,
  arXiv 2407.19409), ``"rkl"`` = KL(student || teacher), ``"jsd"`` = the generalised Jensen-Shannon
  divergence of GKD (Agarwal et al., "On-Policy Distillation of Language Models", ICLR 2024,
  Eq. 1) with TRL's ``generalized_jsd_loss`` convention: ``beta == 0`` is exactly forward KL,
  ``beta == 1`` exactly reverse KL, otherwise with ``M = beta * P_teacher + (1 - beta) * P_student``
  ``JSD = beta * KL(P_teacher || M) + (1 - beta) * KL(P_student || M)``
  (so it is discontinuous at the two ends, as in TRL).
* Zero-probability teacher entries (a ``-inf`` log-prob or logit, as vLLM returns for a token
  its sampler rules out): ``0 * log 0 = 0``, so such an entry contributes nothing to
  ``KL(P_teacher || .)`` (forward KL, the teacher half of JSD); the JSD mixture ``M`` is > 0
  wherever the student is, so JSD (0 < beta < 1) is finite as it stands. Reverse KL (and JSD at
  ``beta == 1``) has the teacher as the reference measure and is genuinely infinite when the
  student puts mass where the teacher has none, so there the teacher probability is floored:
  ``KL(q || p) = sum q (log q - log max(p, P_FLOOR))``, ``P_FLOOR = 1e-30``, applied to the
  tempered (and standardized) teacher distribution. A zero-probability token then costs the
  student ``q (log q + 69.1)`` (finite, with a finite gradient that still pushes its mass away),
  and reverse KL is unchanged wherever the teacher gives every token >= 1e-30 (at T = 1 that
  needs a logit gap above 69 nats, beyond real teacher rows). Prior art: TRL's GKD
  ``generalized_jsd_loss`` has no guard (``inf``); TRL's GOLD trainer clamps probabilities at
  ``1e-8`` before the log, which would change reverse KL on every confident teacher row (a
  1e-11 token counted as 1e-8); DistiLLM (Ko et al. 2024) drops positions whose logits are
  ``-inf`` from the sum, which lets reverse KL go negative and rewards student mass on impossible
  tokens. With ``standardize=True`` a dense teacher row is z-scored over its finite entries and
  its ``-inf`` entries stay ``-inf``.
* Temperature ``T``: both distributions are softened by ``T`` and the divergence is multiplied by
  ``T**2`` (Hinton et al.: keeps gradient magnitudes comparable across temperatures). At
  ``T = 1`` the factor is 1.
* ``standardize=True`` is logit standardization (Sun et al., CVPR 2024, "Logit Standardization
  in Knowledge Distillation"): each logit row ``z`` is replaced by ``(z - mean(z)) / (std(z) + 1e-7)``
  over the vocabulary (``std`` with Bessel's correction, as ``torch.std`` and the paper's code)
  before dividing by ``T``. The cache's ``logit_stats[:, 1]`` must use the same std.
* Reduction: ``"mean"`` = mean over the ``N`` rows of the per-row divergence (summed over the
  vocabulary / buckets), ``"sum"`` = sum over rows, ``"none"`` = the ``[N]`` per-row values.
  ``"mean"`` over zero rows is 0 (still attached to the graph), not NaN.

Top-k + tail bucket (``topk_kd_loss``)
--------------------------------------
Both distributions are coarsened to ``k + 1`` buckets: the teacher's top-k ids, and one tail
bucket for the rest of the vocabulary. The teacher's tail mass is ``1 - sum(exp(topk_logprobs))``,
formed in float64 from the given log-probs without cancellation as
``-expm1(max) - sum(exp(others))`` (``max`` the largest top-k log-prob: exact to float64 rounding
even when the sum is 1 - 1e-12, where a float32 ``1 - sum`` is pure rounding noise) and taken as
0 when negative or within that float64 rounding (``(k + 2) 2**-53 (-expm1(max) + sum(others))``:
not resolvable, e.g. a teacher with fewer than k possible tokens); the teacher's ``k + 1`` buckets are tempered in float64 too (``[N, k + 1]``: cheap), then
cast to the compute dtype. The student's tail is the
log-sum-exp of its log-probs over the complement of the top-k ids (computed directly, not as
``1 - sum``, so it stays exact when the tail is tiny). After tempering, both tails get ``TAIL_EPS``
(1e-8) added and both bucket vectors are renormalised, which keeps the losses and their gradients finite when a
tail is ~0 (k = V, or a teacher whose top-k holds all the mass, e.g. after float16 rounding makes
the top-k sum exceed 1). The guard is part of the formula in every dtype (float32 and float64
compute the same function; the perturbation is below float32 resolution of the bucket masses).
A ``-inf`` top-k log-prob is a zero-probability bucket, under the zero-probability rule above.
A top-k id ``>= V`` (a row of a padded teacher head that the student's head lacks; issue #22) is no bucket:
its teacher probability joins the tail, and the student's tail is its mass outside the in-range ids, so both
are coarsened to {each in-range top-k id, everything else} (``_out_of_range``).
At ``T = 1`` (and no standardization) the loss is the exact divergence between the coarsened
distributions.

At ``T != 1`` the student is tempered over the full vocabulary *before* coarsening (exact), but
the teacher's full logit row is not in the cache, so its ``k + 1`` buckets are re-tempered as
``p_i ** (1/T)`` renormalised. For the top-k buckets relative to each other this is exact; the tail
is treated as a single token, which is an approximation (the true tempered tail mass is
``sum over the tail of p_j ** (1/T)``, larger than ``p_tail ** (1/T)`` for ``T > 1``).
With ``standardize=True`` the student row is z-scored over the full vocabulary; for the teacher,
standardizing then dividing by ``T`` equals tempering its raw logits by ``std * T`` (the mean
shift cancels in the softmax), so its buckets are re-tempered with ``T_eff = (std + 1e-7) * T``
per row from ``teacher_logit_std`` -- the same single-tail-bucket approximation. Note that tempering
raises small tail masses a lot (``1e-7 ** (1/5) = 0.04``), including the rounding of the cached
log-probs themselves, which ``1 - sum(exp(topk_logprobs))`` inherits however precisely it is formed
(up to about ``k * 1e-7`` for float32 log-probs, ``k * 1e-3`` for float16), so with large ``T_eff``
the tail bucket is only as good as the cached log-probs' precision.

Exact full vocabulary (``dense_kd_loss``, ``chunked_exact_kd_loss``)
--------------------------------------------------------------------
``dense_kd_loss`` takes both full logit rows. ``chunked_exact_kd_loss`` recomputes the teacher's
logits from the cached hidden states and the teacher head, and the student's from its hidden
states and head, ``chunk_size`` rows at a time; each chunk runs under
``torch.utils.checkpoint.checkpoint(use_reentrant=False)``, so only the ``[N]`` per-row losses
(and the inputs, which are resident anyway) are kept for backward and the ``[chunk, V]`` logits
are recomputed chunk by chunk during backward: full ``[N, V]`` logits of either model never exist,
forward or backward. Peak extra memory is a few ``chunk_size x V`` buffers of the compute dtype
(plus one copy of a head weight that is not in the compute dtype already). Value and gradients equal
``dense_kd_loss`` of the unchunked logits.

Features (``FeatureProjector``, ``feature_loss``)
-------------------------------------------------
``FeatureProjector(Hs, H)`` maps the student's hidden state to the teacher's width (``"mlp"``:
Linear-GELU-Linear, the study's; ``"linear"``: one Linear). ``feature_loss`` is ``"mse"`` (per row:
the mean over ``H`` of the squared error; ``"mean"`` then averages rows, i.e. the mean over all
``N * H`` elements, as ``F.mse_loss``) or ``"cosine"`` (per row ``1 - cos_sim``).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

KD_KINDS = ("fkl", "rkl", "jsd")
FEATURE_KINDS = ("mse", "cosine")
PROJECTOR_KINDS = ("mlp", "linear")
REDUCTIONS = ("mean", "sum", "none")
TAIL_EPS = 1e-8  # added to both tail buckets (top-k path) before renormalising
STD_EPS = 1e-7  # logit standardization: (z - mean) / (std + STD_EPS), as Sun et al.
P_FLOOR = 1e-30  # teacher probability floor where it is a KL's reference measure (reverse KL)
LOG_P_FLOOR = math.log(P_FLOOR)

__all__ = ["topk_kd_loss", "dense_kd_loss", "chunked_exact_kd_loss", "fused_head_loss", "FeatureProjector",
           "feature_loss", "KD_KINDS", "FEATURE_KINDS", "PROJECTOR_KINDS", "REDUCTIONS", "TAIL_EPS", "P_FLOOR"]


# ----------------------------------------------------------------------------------- helpers
def _no_autocast(device: torch.device):
    """Context that switches autocast off so the loss math really runs in the compute dtype."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # a device type autocast does not know
        return contextlib.nullcontext()


def _compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any floating input is float64, else float32 (half inputs are upcast)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_kd_args(kind: str, beta: float, temperature: float, reduction: str) -> None:
    if kind not in KD_KINDS:
        raise ValueError(f"kind must be one of {KD_KINDS}, got {kind!r}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _standardize(z: torch.Tensor) -> torch.Tensor:
    """Per-row z-score over the last dim (Bessel-corrected std, + STD_EPS), Sun et al. 2024.
    ``z [n, V]`` finite (the student's logits); differentiable."""
    mean = z.mean(dim=-1, keepdim=True)
    std = z.std(dim=-1, keepdim=True)
    return (z - mean) / (std + STD_EPS)


def _standardize_teacher(z: torch.Tensor) -> torch.Tensor:
    """The teacher's z-score: as ``_standardize`` over each row's finite entries; ``-inf``
    (zero-probability) entries stay ``-inf``. ``z [n, V]``, no gradient needed."""
    fin = torch.isfinite(z)
    cnt = fin.sum(dim=-1, keepdim=True).to(z.dtype)
    zf = torch.where(fin, z, torch.zeros((), dtype=z.dtype, device=z.device))
    mean = zf.sum(dim=-1, keepdim=True) / cnt
    dev = torch.where(fin, z - mean, torch.zeros((), dtype=z.dtype, device=z.device))
    std = (dev.square().sum(dim=-1, keepdim=True) / (cnt - 1.0)).sqrt()
    return torch.where(fin, dev / (std + STD_EPS), z)


def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row from normalised log-probs ``[n, K]`` (any float dtype, kept); 0 * log 0 = 0
    with finite gradients (an entry with a = 0 contributes 0 whatever b is)."""
    a = log_a.exp()
    pos = a > 0
    zero = torch.zeros((), dtype=log_a.dtype, device=log_a.device)
    la = torch.where(pos, log_a, zero)
    lb = torch.where(pos, log_b, zero)
    return (a * (la - lb)).sum(dim=-1)


def _divergence_rows(log_p: torch.Tensor, log_q: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Per-row divergence between teacher ``log_p`` and student ``log_q`` (normalised, last dim),
    ``[n, K]`` -> ``[n]`` in their dtype. Forward KL, reverse KL with the teacher floored at
    ``P_FLOOR`` (the zero-probability rule), or GKD's generalised JSD (Agarwal et al. 2024, Eq. 1)
    with TRL's ends (beta = 0: forward KL, beta = 1: reverse KL)."""
    beta = float(beta)
    if kind == "fkl" or (kind == "jsd" and beta == 0.0):
        return _kl_rows(log_p, log_q)
    if kind == "rkl" or (kind == "jsd" and beta == 1.0):
        return _kl_rows(log_q, log_p.clamp(min=LOG_P_FLOOR))
    # M = beta P + (1 - beta) Q > 0 wherever Q > 0: finite with P = 0 entries (logsumexp of -inf and a finite value)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0)
    return beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)


def _reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() * 0.0 if rows.numel() == 0 else rows.mean()


def _dense_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, beta: float,
                temperature: float, standardize: bool) -> torch.Tensor:
    """``[n, V]`` student and teacher logits -> ``[n]`` divergences x T^2, in the compute dtype."""
    dt = _compute_dtype(student_logits, teacher_logits)
    zs = student_logits.to(dt)
    zt = teacher_logits.detach().to(dt)
    if standardize:
        zs, zt = _standardize(zs), _standardize_teacher(zt)
    t = float(temperature)
    log_q = F.log_softmax(zs / t, dim=-1)
    log_p = F.log_softmax(zt / t, dim=-1)
    return _divergence_rows(log_p, log_q, kind, beta) * (t * t)


def _teacher_log_tail(lp: torch.Tensor) -> torch.Tensor:
    """``log(1 - sum(exp(lp)))`` per row, ``lp [n, k]`` float64 -> ``[n, 1]`` float64 (``-inf`` for 0).

    Formed as ``-expm1(max) - sum(exp(others))``: ``-expm1`` is exact near 0, so a tail of 1e-12
    under a top-1 log-prob of -1e-11 keeps float64's relative precision (``1 - sum`` would keep
    ~1e-4 of it in float64 and none in float32). A tail within the float64 rounding error of its
    own formation, ``(k + 2) * 2**-53 * (-expm1(max) + sum(exp(others)))``, is not resolvable and
    is taken as 0, as is a negative one (float16 rounding can push the sum above 1): tempering
    would otherwise blow that residue up (4e-19 is a 1e-6 bucket at ``T_eff = 3``). ``-inf``
    entries contribute 0; a row of ``-inf`` has tail 1."""
    top, arg = lp.max(dim=-1, keepdim=True)
    others = lp.exp().scatter(-1, arg, 0.0).sum(dim=-1, keepdim=True)
    head = -torch.expm1(top)  # 1 - p_max
    tail = head - others
    noise = (lp.shape[-1] + 2) * 2.0 ** -53 * (head + others)
    return torch.log(torch.where(tail > noise, tail, torch.zeros_like(tail)))


def _teacher_topk_buckets(topk_logprobs: torch.Tensor, t: float, standardize: bool,
                          teacher_logit_std: Optional[torch.Tensor], dtype=torch.float32) -> torch.Tensor:
    """Teacher's ``k + 1`` bucket log-probs ``[N, k+1]`` in ``dtype`` (top-k + tail; used by
    ``topk_kd_loss`` and the fused head loss), from ``topk_logprobs [N, k]`` (any float dtype). All
    in float64 (cheap at ``[N, k+1]``): tail = 1 - sum(exp(logprobs)) (``_teacher_log_tail``), then
    re-tempered and given the ``TAIL_EPS`` guard after tempering (so tempering never inflates it)."""
    n = topk_logprobs.shape[0]
    f64 = torch.float64
    lp_top = topk_logprobs.detach().to(f64)
    log_p = torch.cat([lp_top, _teacher_log_tail(lp_top)], dim=-1)  # log(0) = -inf is fine
    if standardize:
        log_p = log_p / ((teacher_logit_std.detach().to(f64).reshape(n, 1).to(log_p.device) + STD_EPS) * t)
    elif t != 1.0:
        log_p = log_p / t
    log_p = F.log_softmax(log_p, dim=-1)
    log_p_tail = torch.logaddexp(log_p[:, -1:], torch.full_like(log_p[:, -1:], math.log(TAIL_EPS)))
    return F.log_softmax(torch.cat([log_p[:, :-1], log_p_tail], dim=-1), dim=-1).to(dtype)


# ------------------------------------------------------------------------------ top-k + tail
def topk_kd_loss(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, *,
                 kind: str = "fkl", beta: float = 0.5, temperature: float = 1.0, standardize: bool = False,
                 teacher_logit_std: Optional[torch.Tensor] = None, reduction: str = "mean") -> torch.Tensor:
    """KD on the teacher's cached top-k log-probs plus one tail bucket (see the module docstring).

    ``student_logits [N, V]``, ``topk_ids [N, k]`` (distinct per row), ``topk_logprobs [N, k]``
    (raw teacher log-probs at T = 1). Exact coarsened divergence at ``T = 1`` without
    standardization; at ``T != 1`` or with ``standardize=True`` (which needs
    ``teacher_logit_std [N]``) the teacher's ``k + 1`` buckets are re-tempered as
    ``p ** (1 / T_eff)`` renormalised, ``T_eff = T`` or ``(std + 1e-7) * T``: an approximation,
    because the teacher's tail is a single bucket. Multiplied by ``T**2``. Runs in float64 if
    ``student_logits`` or ``topk_logprobs`` is float64, else float32 (the teacher's tail mass is
    formed in float64 either way), and returns that dtype: a scalar (``"mean"``/``"sum"``) or
    ``[N]`` (``"none"``). Finite with ``-inf`` entries in ``topk_logprobs`` (zero-probability rule).
    An id ``>= V`` (a teacher head row the student lacks) is no bucket: its teacher mass joins the tail
    (``_out_of_range`` above).
    """
    _check_kd_args(kind, beta, temperature, reduction)
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got shape {tuple(student_logits.shape)}")
    n, v = student_logits.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != n or tuple(topk_logprobs.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} "
                         f"must both be [N={n}, k]")
    if topk_ids.shape[1] > v:
        raise ValueError(f"k={topk_ids.shape[1]} exceeds the vocabulary size V={v}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise TypeError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if standardize:
        if teacher_logit_std is None:
            raise ValueError("standardize=True on the top-k path needs teacher_logit_std (logit_stats[:, 1])")
        if teacher_logit_std.numel() != n:
            raise ValueError(f"teacher_logit_std must have N={n} values, got shape {tuple(teacher_logit_std.shape)}")
    t = float(temperature)
    with _no_autocast(student_logits.device):
        dt = _compute_dtype(student_logits, topk_logprobs)
        # student: (standardize,) temper over the full vocabulary, then coarsen to k + 1 buckets
        z = student_logits.to(dt)
        if standardize:
            z = _standardize(z)
        log_q_full = F.log_softmax(z / t, dim=-1)
        ids = topk_ids.long()
        oob = _out_of_range(ids, v)
        log_q_top = _gather(log_q_full, ids, oob, torch.finfo(log_q_full.dtype).min)
        # the student's top-k mask over its own rows; an id it lacks marks the extra column v, dropped
        in_topk = torch.zeros((n, v + 1), dtype=torch.bool, device=ids.device).scatter_(
            -1, ids if oob is None else ids.masked_fill(oob, v), True)[:, :v]
        # finfo.min, not -inf: an all-masked row (k == V) stays finite in value and in gradient
        log_q_tail = torch.logsumexp(log_q_full.masked_fill(in_topk, torch.finfo(log_q_full.dtype).min),
                                     dim=-1, keepdim=True)
        log_q_tail = torch.logaddexp(log_q_tail, torch.full_like(log_q_tail, math.log(TAIL_EPS)))
        log_q = F.log_softmax(torch.cat([log_q_top, log_q_tail], dim=-1), dim=-1)

        log_p = _teacher_topk_buckets(_drop_teacher(topk_logprobs, oob), t, standardize, teacher_logit_std, dt)

        rows = _divergence_rows(log_p, log_q, kind, beta) * (t * t)
        return _reduce(rows, reduction)


# ------------------------------------------------- top-k ids beyond the student's head (issue #22 class 4)
# A teacher head padded past the tokenizer (llava-1.5-hf: 32064 rows for 32002 tokens) can put such a padding
# row in its top-k; a student with fewer rows (32002) has no logit there. Such an entry is no bucket: its
# teacher probability joins the teacher's tail (formed as 1 - the sum over the remaining top-k entries), and
# the student's tail is its mass outside the in-range top-k ids. Both are then the same coarsening — each
# in-range top-k id, plus everything else — and the divergence is exact between those coarsened distributions
# (the teacher's "everything else" includes its rows the student lacks). The empty bucket is -inf for the
# teacher (the zero-probability rule) and finfo.min for the student (zero mass, but finite: JSD's mixture and
# its gradient stay finite where both sides are empty).
def _out_of_range(ids: torch.Tensor, v: int) -> Optional[torch.Tensor]:
    """``ids >= v`` ``[n, k]`` bool, or None when every id is a row of the student's head (the usual case)."""
    oob = ids >= v
    return oob if bool(oob.any()) else None


def _gather(x: torch.Tensor, ids: torch.Tensor, oob: Optional[torch.Tensor], fill: float) -> torch.Tensor:
    """``x.gather(-1, ids)`` ``[n, k]``, with ``fill`` where ``oob``."""
    if oob is None:
        return x.gather(-1, ids)
    return x.gather(-1, ids.masked_fill(oob, 0)).masked_fill(oob, fill)


def _put_(x: torch.Tensor, ids: torch.Tensor, oob: Optional[torch.Tensor], vals: torch.Tensor) -> torch.Tensor:
    """``x.scatter_(-1, ids, vals)`` over the in-range entries only (distinct per row: deterministic)."""
    if oob is None:
        return x.scatter_(-1, ids, vals)
    sel = (~oob).nonzero(as_tuple=True)
    x[sel[0], ids[sel]] = vals[sel].to(x.dtype)
    return x


def _drop_teacher(topk_logprobs: torch.Tensor, oob: Optional[torch.Tensor]) -> torch.Tensor:
    """The teacher's log-probs with out-of-range entries at ``-inf``: their mass goes to its tail bucket."""
    return topk_logprobs if oob is None else topk_logprobs.masked_fill(oob, float("-inf"))


# ------------------------------------------------------------------------------ full vocab
def dense_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, kind: str = "fkl",
                  beta: float = 0.5, temperature: float = 1.0, standardize: bool = False,
                  reduction: str = "mean") -> torch.Tensor:
    """Exact full-vocabulary KD between ``student_logits [N, V]`` and ``teacher_logits [N, V]``.

    Both rows are (optionally z-scored, then) divided by ``T``; the divergence is multiplied by
    ``T**2``. Runs in float64 if either input is float64, else float32, and returns that dtype: a
    scalar (``"mean"``/``"sum"``) or ``[N]`` (``"none"``). ``-inf`` teacher logits are
    zero-probability entries (module docstring: finite on every divergence; with
    ``standardize=True`` the teacher row is z-scored over its finite entries).
    """
    _check_kd_args(kind, beta, temperature, reduction)
    if student_logits.dim() != 2 or tuple(student_logits.shape) != tuple(teacher_logits.shape):
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must both be [N, V]")
    with _no_autocast(student_logits.device):
        return _reduce(_dense_rows(student_logits, teacher_logits, kind, beta, temperature, standardize), reduction)


def _chunk_rows(student_hidden: torch.Tensor, student_head_weight: torch.Tensor,
                student_head_bias: Optional[torch.Tensor], teacher_hidden: torch.Tensor,
                teacher_head_weight: torch.Tensor, teacher_head_bias: Optional[torch.Tensor], *,
                kind: str, beta: float, temperature: float, standardize: bool) -> torch.Tensor:
    """Per-row loss of one chunk: both models' ``[chunk, V]`` logits live only in here."""
    dt = _compute_dtype(student_hidden, student_head_weight, student_head_bias, teacher_hidden,
                        teacher_head_weight, teacher_head_bias)
    with _no_autocast(student_hidden.device):
        zs = F.linear(student_hidden.to(dt), student_head_weight.to(dt),
                      None if student_head_bias is None else student_head_bias.to(dt))
        with torch.no_grad():
            zt = F.linear(teacher_hidden.to(dt), teacher_head_weight.to(dt),
                          None if teacher_head_bias is None else teacher_head_bias.to(dt))
        return _dense_rows(zs, zt, kind, beta, temperature, standardize)


def chunked_exact_kd_loss(student_hidden: torch.Tensor, student_head_weight: torch.Tensor,
                          teacher_hidden: torch.Tensor, teacher_head_weight: torch.Tensor, *,
                          teacher_head_bias: Optional[torch.Tensor] = None,
                          student_head_bias: Optional[torch.Tensor] = None, kind: str = "fkl",
                          beta: float = 0.5, temperature: float = 1.0, standardize: bool = False,
                          chunk_size: int = 1024, reduction: str = "mean") -> torch.Tensor:
    """Exact full-vocabulary KD with logits recomputed ``chunk_size`` rows at a time.

    Student logits = ``student_hidden [N, Hs] @ student_head_weight [V, Hs].T (+ bias)``, teacher
    logits = ``teacher_hidden [N, Ht] @ teacher_head_weight [V, Ht].T (+ bias)``; each chunk is
    checkpointed (``use_reentrant=False``) so no ``[N, V]`` tensor is ever materialised, in forward
    or backward. Gradients flow to ``student_hidden``, ``student_head_weight`` and
    ``student_head_bias``; the teacher side is detached. Equal in value and gradients to
    ``dense_kd_loss`` on the unchunked logits; float64 math and result if any input is float64.
    """
    _check_kd_args(kind, beta, temperature, reduction)
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    if student_hidden.dim() != 2 or student_head_weight.dim() != 2 or student_hidden.shape[1] != student_head_weight.shape[1]:
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} must be [N, Hs] and "
                         f"student_head_weight {tuple(student_head_weight.shape)} [V, Hs]")
    if teacher_hidden.dim() != 2 or teacher_head_weight.dim() != 2 or teacher_hidden.shape[1] != teacher_head_weight.shape[1]:
        raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} must be [N, Ht] and "
                         f"teacher_head_weight {tuple(teacher_head_weight.shape)} [V, Ht]")
    n, v = student_hidden.shape[0], student_head_weight.shape[0]
    if teacher_hidden.shape[0] != n:
        raise ValueError(f"student_hidden has {n} rows but teacher_hidden has {teacher_hidden.shape[0]}")
    if teacher_head_weight.shape[0] != v:
        raise ValueError(f"vocabulary mismatch: student head V={v}, teacher head V={teacher_head_weight.shape[0]}")
    for name, b in (("student_head_bias", student_head_bias), ("teacher_head_bias", teacher_head_bias)):
        if b is not None and tuple(b.shape) != (v,):
            raise ValueError(f"{name} must be [V={v}], got {tuple(b.shape)}")

    fn = functools.partial(_chunk_rows, kind=kind, beta=float(beta), temperature=float(temperature),
                           standardize=bool(standardize))
    t_w = teacher_head_weight.detach()
    t_b = None if teacher_head_bias is None else teacher_head_bias.detach()
    chunk = int(chunk_size)
    rows = []
    for start in range(0, n, chunk):
        args = (student_hidden[start:start + chunk], student_head_weight, student_head_bias,
                teacher_hidden[start:start + chunk].detach(), t_w, t_b)
        if torch.is_grad_enabled():
            rows.append(checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            rows.append(fn(*args))
    if rows:
        out = torch.cat(rows)
    else:  # N == 0: an empty, graph-attached result
        dt = _compute_dtype(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight)
        out = student_hidden.to(dt).sum(dim=-1) * 0.0
    return _reduce(out, reduction)


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


# ------------------------------------------------------------- fused head: CE + KD, one pass
def _analytic(kind: str, beta: float, standardize: bool) -> bool:
    """Forward KL without standardization has a closed-form logit gradient (the default recipe)."""
    return not standardize and (kind == "fkl" or (kind == "jsd" and float(beta) == 0.0))


def _block_loss_grad(z: torch.Tensor, blk: dict, ce_w: float, kd_w: float, kw: dict, want_grad: bool):
    """One row block of student logits ``z [n, V]`` (float32 or float64, no graph) → (ce ``[n]`` or None,
    kd ``[n]`` or None, ``dL/dz [n, V]`` or None) for ``L = ce_w * sum(ce) + kd_w * sum(kd)``.

    Forward KL (any ``T``, no standardization) uses closed forms; the other divergences differentiate
    the reference functions with autograd on this block only, in ``z``'s dtype. ``blk`` holds the block's
    ``targets``, and ``topk_ids``/``topk_logprobs``/``teacher_logit_std`` (top-k) or
    ``teacher_logits`` (exact), whichever apply.
    """
    t = float(kw["temperature"])
    kind, beta, standardize = kw["kind"], float(kw["beta"]), bool(kw["standardize"])
    use_ce, use_kd = ce_w != 0.0 and blk.get("targets") is not None, kd_w != 0.0
    exact = "teacher_logits" in blk
    if use_kd and not _analytic(kind, beta, standardize):
        with torch.enable_grad():
            zl = z.detach().requires_grad_(want_grad)
            ce = F.cross_entropy(zl, blk["targets"], reduction="none") if use_ce else None
            if exact:
                kd = _dense_rows(zl, blk["teacher_logits"], kind, beta, t, standardize)
            else:
                kd = topk_kd_loss(zl, blk["topk_ids"], blk["topk_logprobs"], kind=kind, beta=beta, temperature=t,
                                  standardize=standardize, teacher_logit_std=blk.get("teacher_logit_std"),
                                  reduction="none")
            total = kd_w * kd.sum() + (ce_w * ce.sum() if use_ce else 0.0)
            g = torch.autograd.grad(total, zl)[0] if want_grad else None
        return (None if ce is None else ce.detach()), kd.detach(), g

    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # [n, 1]
    ce = kd = None
    if use_ce:
        ce = (lse - z.gather(-1, blk["targets"].view(-1, 1))).squeeze(-1)
    q = torch.exp(z - lse)  # [n, V] softmax at T = 1; becomes the gradient buffer below
    if not use_kd:
        if want_grad:
            q.mul_(ce_w).scatter_add_(-1, blk["targets"].view(-1, 1), torch.full_like(lse, -ce_w))
        return ce, None, (q if want_grad else None)
    if t == 1.0:
        qt, lse_t, zt_s = q, lse, z
    else:
        zt_s = z / t
        lse_t = torch.logsumexp(zt_s, dim=-1, keepdim=True)
        qt = torch.exp(zt_s - lse_t)
    if exact:
        log_p = F.log_softmax(blk["teacher_logits"].to(z.dtype) / t, dim=-1)
        kd = _kl_rows(log_p, zt_s - lse_t) * (t * t)
        # d/dz of T² KL(p || softmax(z/T)) = T (q_T - p)
        coef = kd_w * t
        if want_grad:
            g_kd = (qt - log_p.exp()).mul_(coef)
    else:
        ids = blk["topk_ids"].long()
        oob = blk.get("topk_oob")  # [n, k] bool: ids the student's head lacks (None: all in range)
        q_top = _gather(qt, ids, oob, 0.0)  # [n, k]
        # the tail mass summed directly over the complement (exact when tiny): zero the top-k, sum, restore
        _put_(qt, ids, oob, torch.zeros_like(q_top))
        q_tail = qt.sum(-1, keepdim=True)
        _put_(qt, ids, oob, q_top)
        u_tail = q_tail + TAIL_EPS
        z_top = _gather(zt_s - lse_t, ids, oob, torch.finfo(z.dtype).min)
        log_q = F.log_softmax(torch.cat([z_top, torch.log(u_tail)], dim=-1), dim=-1)
        log_p = _teacher_topk_buckets(_drop_teacher(blk["topk_logprobs"], oob), t, standardize,
                                      blk.get("teacher_logit_std"), z.dtype)
        kd = _kl_rows(log_p, log_q) * (t * t)
        if want_grad:
            # buckets u = (q_top, q_tail + eps), sum(u) = 1 + eps constant in z, so for KL(p || u / sum u):
            # dL/dz_j = q_j (P_top + r q_tail) - p_j  (j in top-k),  q_j (P_top + r q_tail - r)  (tail),
            # r = p_tail / (q_tail + eps); then the chain rule for z / T and the T² factor give T x that.
            p = log_p.exp()
            p_tail = p[:, -1:]
            r = p_tail / u_tail
            c = (1.0 - p_tail) + r * q_tail
            coef = kd_w * t
            # written straight over the top-k ids (not added to the tail formula's q_j (c - r) there):
            # q_j c - p_j has no q_j r - q_j r cancellation, which cost ~q_j r eps when r >> 1
            g_kd_top = (q_top * c - p[:, :-1]) * coef  # [n, k]
    if not want_grad:
        return ce, kd, None
    if exact:
        g = g_kd
        if use_ce:
            g.add_(q, alpha=ce_w)
    else:
        if use_ce:  # CE's share q_j at the top-k ids (q at T = 1; q_top is a copy taken before q changes)
            g_kd_top = g_kd_top + ce_w * (q_top if t == 1.0 else _gather(q, ids, oob, 0.0))
        if t == 1.0:  # qt is q: one in-place pass gives CE's and KD's share of q
            g = q.mul_((c - r) * coef + (ce_w if use_ce else 0.0))
        else:
            g = qt.mul_((c - r) * coef)
            if use_ce:
                g.add_(q, alpha=ce_w)
        _put_(g, ids, oob, g_kd_top)  # an out-of-range entry is no column: its column keeps the tail formula
    if use_ce:
        g.scatter_add_(-1, blk["targets"].view(-1, 1), torch.full_like(lse, -ce_w))
    return ce, kd, g


class _FusedHeadLoss(torch.autograd.Function):
    """Student head + CE + KD, row block by row block, with the gradients taken in forward.

    Each block's ``[rows, V]`` logits are made, turned into losses and their logit gradient, and
    folded into ``dL/dh`` and ``dL/dW`` at once, so no ``[N, V]`` tensor outlives its block and
    backward only scales the stored gradients (no recomputation, unlike a checkpointed chunk).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, spec):
        want = spec["want_grad"]
        n = h.shape[0]
        cd = spec["dtype"]  # float64 in -> float64 throughout (the golden tests), else float32
        hf = h.detach().to(cd)
        wf = weight.detach().to(cd)
        bf = None if bias is None else bias.detach().to(cd)
        gh = torch.zeros_like(hf) if want else None
        gw = torch.zeros_like(wf) if want else None
        gb = torch.zeros_like(bf) if (want and bf is not None) else None
        ce_sum = torch.zeros((), dtype=cd, device=h.device)
        kd_sum = torch.zeros((), dtype=cd, device=h.device)
        tw = spec.get("teacher_weight")
        tw = None if tw is None else tw.to(cd)
        tb = spec.get("teacher_bias")
        tb = None if tb is None else tb.to(cd)
        for s in range(0, n, spec["block"]):
            e = min(n, s + spec["block"])
            blk = {key: val[s:e] for key, val in spec["rows"].items()}
            if tw is not None:
                blk["teacher_logits"] = F.linear(spec["teacher_hidden"][s:e].to(cd), tw, tb)
            z = F.linear(hf[s:e], wf, bf)
            ce, kd, g = _block_loss_grad(z, blk, spec["ce_w"], spec["kd_w"], spec["kw"], want)
            if ce is not None:
                ce_sum += ce.sum()
            if kd is not None:
                kd_sum += kd.sum()
            if want:
                torch.mm(g, wf, out=gh[s:e])
                gw.addmm_(g.t(), hf[s:e])
                if gb is not None:
                    gb += g.sum(0)
            del z, g, blk
        ctx.grads = (gh, gw, gb)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        total = spec["ce_w"] * ce_sum + spec["kd_w"] * kd_sum
        return total, ce_sum, kd_sum

    @staticmethod
    def backward(ctx, g_total, _g_ce, _g_kd):
        # not in place: backward may run again on a retained graph (gradcheck, retain_graph=True)
        out = [None if (g is None or not need) else (g * g_total).to(dt)
               for g, dt, need in zip(ctx.grads, ctx.dtypes, ctx.needs_input_grad[:3])]
        return out[0], out[1], out[2], None


def fused_head_loss(student_hidden: torch.Tensor, head_weight: torch.Tensor, head_bias: Optional[torch.Tensor] = None,
                    *, targets: Optional[torch.Tensor] = None, ce_weight: float = 1.0, kd_weight: float = 1.0,
                    topk_ids: Optional[torch.Tensor] = None, topk_logprobs: Optional[torch.Tensor] = None,
                    teacher_logit_std: Optional[torch.Tensor] = None, teacher_hidden: Optional[torch.Tensor] = None,
                    teacher_head_weight: Optional[torch.Tensor] = None,
                    teacher_head_bias: Optional[torch.Tensor] = None, kind: str = "fkl", beta: float = 0.5,
                    temperature: float = 1.0, standardize: bool = False, block_rows: int = 512):
    """The student's LM head, cross-entropy and KD in one pass: ``(total, ce_sum, kd_sum)``.

    ``student_hidden [N, Hs]`` at answer positions, ``head_weight [V, Hs]`` (+ ``head_bias [V]``).
    ``total = ce_weight * ce_sum + kd_weight * kd_sum`` is differentiable with respect to the
    hidden states, head weight and bias; ``ce_sum`` (cross-entropy against ``targets [N]``, summed)
    and ``kd_sum`` (summed per-row divergence) are detached, for logging. KD is top-k + tail
    (``topk_ids``/``topk_logprobs``, as ``topk_kd_loss``) or exact full-vocabulary
    (``teacher_hidden [N, Ht]`` + ``teacher_head_weight [V, Ht]``, as ``chunked_exact_kd_loss``);
    ``kd_weight=0`` gives CE only. Values and gradients equal ``F.cross_entropy(reduction="sum")``
    plus the matching reference loss with ``reduction="sum"``.

    Work runs ``block_rows`` rows at a time, in float32 (float64 if any floating input is float64,
    and the losses come back in that dtype): each block's ``[block_rows, V]`` logits
    give their losses and logit gradient at once (closed form for forward KL without
    standardization; autograd on the block otherwise) and are folded into ``dL/dh`` and
    ``dL/dW`` straight away. So the student's logits are computed once (not once for CE and again
    for KD, nor recomputed in backward as a checkpoint would) and peak extra memory is a few
    ``block_rows x V`` buffers plus the stored ``[V, Hs]`` head gradient.
    """
    _check_kd_args(kind, beta, temperature, "sum")
    if student_hidden.dim() != 2 or head_weight.dim() != 2 or student_hidden.shape[1] != head_weight.shape[1]:
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} must be [N, Hs] and head_weight "
                         f"{tuple(head_weight.shape)} [V, Hs]")
    if int(block_rows) < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows!r}")
    n, v = student_hidden.shape[0], head_weight.shape[0]
    ce_w, kd_w = float(ce_weight), float(kd_weight)
    rows = {}
    if ce_w != 0.0:
        if targets is None or tuple(targets.shape) != (n,):
            raise ValueError(f"ce_weight != 0 needs targets [N={n}]")
        rows["targets"] = targets.long()
    spec = {"ce_w": ce_w, "kd_w": kd_w, "block": int(block_rows), "rows": rows,
            "kw": dict(kind=kind, beta=float(beta), temperature=float(temperature), standardize=bool(standardize))}
    if kd_w != 0.0:
        if teacher_hidden is not None:
            if teacher_head_weight is None or teacher_head_weight.shape[0] != v:
                raise ValueError(f"exact KD needs teacher_head_weight [V={v}, Ht]")
            if teacher_hidden.shape[0] != n or teacher_hidden.shape[1] != teacher_head_weight.shape[1]:
                raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} must be [N={n}, Ht]")
            spec["teacher_hidden"] = teacher_hidden.detach()
            spec["teacher_weight"] = teacher_head_weight.detach()
            spec["teacher_bias"] = None if teacher_head_bias is None else teacher_head_bias.detach()
        else:
            if topk_ids is None or topk_logprobs is None or topk_ids.dim() != 2 or topk_ids.shape[0] != n \
                    or tuple(topk_logprobs.shape) != tuple(topk_ids.shape) or topk_ids.shape[1] > v:
                raise ValueError(f"top-k KD needs topk_ids and topk_logprobs [N={n}, k<=V]")
            if standardize and (teacher_logit_std is None or teacher_logit_std.numel() != n):
                raise ValueError("standardize=True on the top-k path needs teacher_logit_std [N]")
            rows["topk_ids"], rows["topk_logprobs"] = topk_ids, topk_logprobs
            oob = _out_of_range(topk_ids, v)  # teacher head rows the student lacks: their mass goes to the tail
            if oob is not None:
                rows["topk_oob"] = oob
            if teacher_logit_std is not None:
                rows["teacher_logit_std"] = teacher_logit_std.reshape(n)
    spec["dtype"] = _compute_dtype(student_hidden, head_weight, head_bias, *(
        spec.get(key) for key in ("teacher_hidden", "teacher_weight", "teacher_bias")), rows.get("topk_logprobs"))
    spec["want_grad"] = torch.is_grad_enabled() and (student_hidden.requires_grad or head_weight.requires_grad
                                                     or (head_bias is not None and head_bias.requires_grad))
    return _FusedHeadLoss.apply(student_hidden, head_weight, head_bias, spec)
