"""KD divergence mathematics shared by every KD path (``kd.py``, ``fused.py``): the conventions, the
per-row divergences, the teacher's top-k + tail buckets, and the handling of top-k ids beyond the
student's head. Shapes and dtypes of the arguments: ``losses.py``.

Conventions
-----------
* Precision: the arithmetic runs in the inputs' precision -- float64 when any floating input
  (student logits / hidden states / head, teacher logits / log-probs) is float64, float32
  otherwise (half inputs are upcast). Autocast is switched off inside the losses, and results
  come back in that dtype. The teacher's tail mass ``1 - sum(exp(topk_logprobs))`` is always
  formed in float64 (``_teacher_log_tail`` below; ``kd.py``, top-k + tail), whatever the compute dtype.
* The teacher side is a constant target: it is detached and never receives gradients.
* ``kind``: ``"fkl"`` = KL(teacher || student) (the default, the study's: LLAVADI, Xu et al.,
  arXiv 2407.19409), ``"rkl"`` = KL(student || teacher), ``"jsd"`` = the generalised Jensen-Shannon
  divergence of GKD (Agarwal et al., "On-Policy Distillation of Language Models", ICLR 2024,
  Eq. 1) with TRL's ``generalized_jsd_loss`` convention: ``beta == 0`` is exactly forward KL,
  ``beta == 1`` exactly reverse KL, otherwise with ``M = beta * P_teacher + (1 - beta) * P_student``
  ``JSD = beta * KL(P_teacher || M) + (1 - beta) * KL(P_student || M)``
  (so it is discontinuous at the two ends, as in TRL); ``"tvd"`` = the total variation distance
  ``0.5 * sum |P_teacher - P_student|`` (bounded by 1, symmetric, no log: finite with zero-probability
  entries on either side; its gradient is ``0.5 * sign`` of each difference, 0 where they are equal);
  ``"mse"`` = the study's ``mse_distill`` (LLAVADI, ``projects/distill/distill_llava_llama.py``:
  ``F.mse_loss(stu_logits, tea_logits)``): per row the mean over ``V`` of ``(z_s - z_t)**2`` on the raw
  logits, or on the standardized ones with ``standardize=True`` (the study's ``norm_logits``). ``"mse"``
  regresses logits, not distributions, so it needs full logit rows (dense / exact paths; the top-k
  path raises) and ``temperature == 1`` (raises otherwise: a tempered regression is just a rescaled
  one); a ``-inf`` teacher logit makes its row infinite (no probability to apply the rule below to).
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
  ``T = 1`` the factor is 1. ``"tvd"`` is multiplied by ``T**2`` too, for uniformity only: one
  ``temperature`` knob means the same scaling for every kind (Hinton's argument is for the KL family,
  whose logit gradient shrinks as ``1/T**2``; the TVD's shrinks as ``1/T``).
* ``standardize=True`` is logit standardization (Sun et al., CVPR 2024, "Logit Standardization
  in Knowledge Distillation"): each logit row ``z`` is replaced by ``(z - mean(z)) / (std(z) + 1e-7)``
  over the vocabulary (``std`` with Bessel's correction, as ``torch.std`` and the paper's code)
  before dividing by ``T``. The cache's ``logit_stats[:, 1]`` must use the same std.
* Reduction: ``"mean"`` = mean over the ``N`` rows of the per-row divergence (summed over the
  vocabulary / buckets), ``"sum"`` = sum over rows, ``"none"`` = the ``[N]`` per-row values.
  ``"mean"`` over zero rows is 0 (still attached to the graph), not NaN.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F

KD_KINDS = ("fkl", "rkl", "jsd", "tvd", "mse")
REDUCTIONS = ("mean", "sum", "none")
TAIL_EPS = 1e-8  # added to both tail buckets (top-k path) before renormalising
STD_EPS = 1e-7  # logit standardization: (z - mean) / (std + STD_EPS), as Sun et al.
P_FLOOR = 1e-30  # teacher probability floor where it is a KL's reference measure (reverse KL)
LOG_P_FLOOR = math.log(P_FLOOR)


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
    if kind == "mse" and float(temperature) != 1.0:
        raise ValueError(f"kind='mse' regresses logits and takes no temperature: it must be 1, got {temperature!r}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_bucket_kind(kind: str) -> None:
    """The top-k + tail path holds ``k + 1`` bucket probabilities, no logit rows: ``"mse"`` cannot run there."""
    if kind == "mse":
        raise ValueError("kind='mse' needs the teacher's full logit rows (dense_kd_loss, the exact path from "
                         "teacher_hidden + teacher head); top-k + tail buckets hold no logits to regress on")


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
    ``P_FLOOR`` (the zero-probability rule), GKD's generalised JSD (Agarwal et al. 2024, Eq. 1)
    with TRL's ends (beta = 0: forward KL, beta = 1: reverse KL), or the total variation distance."""
    beta = float(beta)
    if kind == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)
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
    """``[n, V]`` student and teacher logits -> ``[n]`` divergences x T^2 (``"mse"``: the mean squared logit
    difference, T = 1), in the compute dtype."""
    dt = _compute_dtype(student_logits, teacher_logits)
    zs = student_logits.to(dt)
    zt = teacher_logits.detach().to(dt)
    if standardize:
        zs, zt = _standardize(zs), _standardize_teacher(zt)
    if kind == "mse":  # F.mse_loss per row, as the study's mse_distill (T = 1: _check_kd_args)
        return (zs - zt).square().mean(dim=-1)
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


# ------------------------------------------------------------------- sampled teacher (RS-KD)
# Random-sampling KD (Anshumann et al., "Sparse Logit Sampling", ACL 2025): the cache keeps s draws per
# row and the teacher is estimated by the sparse p_hat = sum_j w_j onehot(x_j). Only forward KL reads a
# sample correctly: KL(p || q) = E_p[log p - log q] is an expectation under the teacher, and its logit
# gradient q - p is linear in p, so q - p_hat is unbiased for it. Reverse KL, JSD, TVD and MSE need p (or
# its logits) at tokens the sample does not hold; tempering or standardizing the teacher needs its logits.
def _check_sampled_args(kind: str, temperature: float, standardize: bool) -> None:
    if kind != "fkl":
        raise ValueError(f"sampled KD takes kind='fkl' only, got {kind!r}: a sample estimates expectations under "
                         f"the teacher (forward KL), not the teacher's probability at the student's tokens")
    if float(temperature) != 1.0:
        raise ValueError(f"sampled KD needs temperature=1, got {temperature!r}: the teacher's tempered "
                         f"distribution is not recoverable from draws (the cache holds no logits)")
    if standardize:
        raise ValueError("sampled KD cannot standardize: the teacher's logit z-scores are not recoverable from "
                         "draws (the cache holds no logits)")


def _sampled_estimate(sampled_ids: torch.Tensor, sample_weights: Optional[torch.Tensor], v: int,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sparse teacher estimate of ``sampled_ids [n, s]`` (int; any order, repeats allowed) with
    ``sample_weights [n, s]`` (None: ``1 / s`` per draw) -> ``(ids [n, s] int64, w [n, s], log_p_hat [n, s])``
    in ``dtype``, draws sorted per row: ``p_hat(x) = sum of w over the draws of x`` (a token drawn c times of
    s gets c / s), ``log_p_hat`` at each draw (0 where ``w == 0``, so ``w * log_p_hat`` is 0 there). A draw
    ``>= v`` (a padded teacher head's row, which the student has no logit for: no finite KL exists there)
    gets weight 0 and id 0. Then ``sum_x p_hat(x) f(x) = sum_j w_j f(x_j)`` for any ``f``: the losses run
    over draws, never over ``[n, V]``."""
    ids = sampled_ids.long()
    w = (torch.full(ids.shape, 1.0 / max(1, ids.shape[-1]), dtype=dtype, device=ids.device)
         if sample_weights is None else sample_weights.detach().to(dtype))
    oob = ids >= v
    ids, w = ids.masked_fill(oob, 0), w.masked_fill(oob, 0.0)
    ids, order = ids.sort(dim=-1, stable=True)
    w = w.gather(-1, order)
    # runs of equal ids: the run index of each draw, the weight sum of each run, read back at every draw
    new_run = torch.ones_like(ids, dtype=torch.bool)
    new_run[:, 1:] = ids[:, 1:] != ids[:, :-1]
    run = new_run.long().cumsum(dim=-1) - 1
    p_hat = torch.zeros_like(w).scatter_add_(-1, run, w).gather(-1, run)
    log_p_hat = torch.where(w > 0, p_hat.clamp(min=torch.finfo(dtype).tiny).log(), torch.zeros_like(w))
    return ids, w, log_p_hat
