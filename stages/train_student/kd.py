"""The KD reference losses on materialised or chunked logits (conventions: ``divergences.py``; shapes:
``losses.py``), the teacher's argmax from the exact path's cache, and the sampled (RS-KD) reference.

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
A ``-inf`` top-k log-prob is a zero-probability bucket, under the zero-probability rule (``divergences.py``).
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
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .divergences import (TAIL_EPS, _check_bucket_kind, _check_kd_args, _check_sampled_args, _compute_dtype,
                          _dense_rows, _divergence_rows, _drop_teacher, _gather, _no_autocast, _out_of_range, _reduce,
                          _sampled_estimate, _standardize, _teacher_topk_buckets)


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
    (``divergences._out_of_range``). ``kind``: ``"fkl"``, ``"rkl"``, ``"jsd"`` or ``"tvd"`` (on the
    ``k + 1`` buckets); ``"mse"`` raises ``ValueError`` (buckets hold no logits).
    """
    _check_kd_args(kind, beta, temperature, reduction)
    _check_bucket_kind(kind)
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


# ------------------------------------------------------------------------------ full vocab
def dense_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, kind: str = "fkl",
                  beta: float = 0.5, temperature: float = 1.0, standardize: bool = False,
                  reduction: str = "mean") -> torch.Tensor:
    """Exact full-vocabulary KD between ``student_logits [N, V]`` and ``teacher_logits [N, V]``.

    Both rows are (optionally z-scored, then) divided by ``T``; the divergence is multiplied by
    ``T**2``. Runs in float64 if either input is float64, else float32, and returns that dtype: a
    scalar (``"mean"``/``"sum"``) or ``[N]`` (``"none"``). ``-inf`` teacher logits are
    zero-probability entries (``divergences.py``: finite on every divergence but ``"mse"``; with
    ``standardize=True`` the teacher row is z-scored over its finite entries). ``kind`` is any of
    ``KD_KINDS``; ``"mse"`` (per row the mean over ``V`` of ``(z_s - z_t)**2``, on z-scores with
    ``standardize=True``) raises ``ValueError`` unless ``temperature == 1``.
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
    ``dense_kd_loss`` on the unchunked logits (every ``kind``, ``"mse"`` included); float64 math and result if
    any input is float64.
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


def teacher_argmax(teacher_hidden: torch.Tensor, teacher_head_weight: torch.Tensor,
                   teacher_head_bias: Optional[torch.Tensor] = None, *, block_rows: int = 1024) -> torch.Tensor:
    """The teacher's most likely token per row, ``[N] int64``: ``argmax(teacher_hidden [N, Ht] @
    teacher_head_weight [V, Ht].T (+ teacher_head_bias [V]))`` over ``V``, ``block_rows`` rows at a time
    (``[block_rows, V]`` logits at most, never ``[N, V]``), without gradient. The CE term's target when it
    trains on the teacher's argmax from the exact path's cache; on the top-k path the argmax is
    ``topk_ids[:, 0]`` (the cache stores the top-k sorted, largest first); a sampled cache has none.

    Float32 (float64 if any input is float64); ties go to the lowest id (``torch.argmax``). The cached
    hidden states are the teacher's final hidden state rounded to the cache's dtype, so on a near-tie
    this argmax may differ from the teacher's own. Raises ``ValueError`` on mismatched shapes or
    ``block_rows < 1``.
    """
    if int(block_rows) < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows!r}")
    th, wt, tb = teacher_hidden, teacher_head_weight, teacher_head_bias
    if th.dim() != 2 or wt.dim() != 2 or th.shape[1] != wt.shape[1]:
        raise ValueError(f"teacher_hidden {tuple(th.shape)} must be [N, Ht] and teacher_head_weight "
                         f"{tuple(wt.shape)} [V, Ht]")
    if tb is not None and tuple(tb.shape) != (wt.shape[0],):
        raise ValueError(f"teacher_head_bias must be [V={wt.shape[0]}], got {tuple(tb.shape)}")
    n, block = th.shape[0], int(block_rows)
    dt = _compute_dtype(th, wt, tb)
    out = torch.empty(n, dtype=torch.int64, device=th.device)
    with torch.no_grad(), _no_autocast(th.device):
        w, b = wt.to(dt), None if tb is None else tb.to(dt)
        for start in range(0, n, block):
            out[start:start + block] = F.linear(th[start:start + block].to(dt), w, b).argmax(dim=-1)
    return out


# ---------------------------------------------------------------------------- sampled (RS-KD)
def sampled_kd_loss(student_logits: torch.Tensor, sampled_ids: torch.Tensor,
                    sample_weights: Optional[torch.Tensor] = None, *, kind: str = "fkl", temperature: float = 1.0,
                    standardize: bool = False, reduction: str = "mean") -> torch.Tensor:
    """Forward KL from the teacher's sparse sampled estimate to the student (random-sampling KD, Anshumann
    et al., "Sparse Logit Sampling", ACL 2025): the reference of the fused head's sampled source.

    ``student_logits [N, V]`` (any float), ``sampled_ids [N, s]`` int (the cache's draws: with repetition,
    any order), ``sample_weights [N, s]`` float >= 0 or None (``1 / s`` per draw; with a proposal temperature
    != 1 the trainer passes self-normalised importance weights). The teacher estimate is
    ``p_hat = sum_j w_j onehot(x_j)`` (a token drawn c times of s gets ``c / s``) and the loss per row is
    ``sum_x p_hat(x) (log p_hat(x) - log q(x))`` = ``KL(p_hat || q)`` when the weights sum to 1; its logit
    gradient is ``(sum_j w_j) q - p_hat`` = ``q - p_hat``, unbiased for full forward KD's ``q - p``. A draw
    ``>= V`` (a padded teacher head's row, no student logit) is left out (weight 0). Float32 (float64 if
    ``student_logits`` or ``sample_weights`` is); a scalar (``"mean"``/``"sum"``) or ``[N]`` (``"none"``).

    Raises ``ValueError`` unless ``kind == "fkl"``, ``temperature == 1`` and ``standardize`` is False (the
    teacher's tempered / standardized distribution is not recoverable from draws), or on mismatched shapes.
    """
    _check_kd_args(kind, 0.0, temperature, reduction)
    _check_sampled_args(kind, temperature, standardize)
    if student_logits.dim() != 2 or sampled_ids.dim() != 2 or sampled_ids.shape[0] != student_logits.shape[0]:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} must be [N, V] and sampled_ids "
                         f"{tuple(sampled_ids.shape)} [N, s]")
    if sample_weights is not None and tuple(sample_weights.shape) != tuple(sampled_ids.shape):
        raise ValueError(f"sample_weights {tuple(sample_weights.shape)} must be [N, s] as sampled_ids "
                         f"{tuple(sampled_ids.shape)}")
    with _no_autocast(student_logits.device):
        dt = _compute_dtype(student_logits, sample_weights)
        ids, w, log_p_hat = _sampled_estimate(sampled_ids, sample_weights, student_logits.shape[1], dt)
        log_q = F.log_softmax(student_logits.to(dt), dim=-1).gather(-1, ids)
        return _reduce((w * (log_p_hat - log_q)).sum(dim=-1), reduction)
