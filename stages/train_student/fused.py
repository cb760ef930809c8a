"""The fused head loss: the student's LM head, cross-entropy and KD in one blockwise pass, the gradient
taken in forward (conventions: ``divergences.py``; shapes: ``losses.py``)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .divergences import (TAIL_EPS, _check_bucket_kind, _check_kd_args, _check_sampled_args, _compute_dtype,
                          _dense_rows, _drop_teacher, _gather, _kl_rows, _out_of_range, _put_, _sampled_estimate,
                          _teacher_topk_buckets)
from .kd import topk_kd_loss


# ------------------------------------------------------------- fused head: CE + KD, one pass
def _analytic(kind: str, beta: float, standardize: bool) -> bool:
    """Forward KL without standardization has a closed-form logit gradient (the default recipe)."""
    return not standardize and (kind == "fkl" or (kind == "jsd" and float(beta) == 0.0))


# A term's coefficient of each row's loss in L: the float term weight when every row weighs 1 (the code
# path, and so the bits, of the unweighted loss), else the [n, 1] column term weight x row weight.
def _coef(w: float, row_weight: Optional[torch.Tensor]):
    return w if row_weight is None else w * row_weight.view(-1, 1)


def _term(rows: torch.Tensor, c) -> torch.Tensor:
    """``sum_i c_i rows_i`` for a float or ``[n, 1]`` coefficient ``c``."""
    return c * rows.sum() if isinstance(c, float) else (c.view(-1) * rows).sum()


def _sub_target_(g: torch.Tensor, targets: torch.Tensor, c, lse: torch.Tensor) -> torch.Tensor:
    """CE's ``-c onehot(target)`` share of the logit gradient, added to ``g [n, V]`` in place (``lse [n, 1]``
    gives the column's shape and dtype)."""
    return g.scatter_add_(-1, targets.view(-1, 1), torch.full_like(lse, -c) if isinstance(c, float) else -c)


def _add_scaled_(g: torch.Tensor, x: torch.Tensor, c) -> torch.Tensor:
    """``g += c x`` in place, for a float or ``[n, 1]`` coefficient ``c``."""
    return g.add_(x, alpha=c) if isinstance(c, float) else g.addcmul_(x, c)


def _block_loss_grad(z: torch.Tensor, blk: dict, ce_w: float, kd_w: float, kw: dict, want_grad: bool):
    """One row block of student logits ``z [n, V]`` (float32 or float64, no graph) → (ce ``[n]`` or None,
    kd ``[n]`` or None, ``dL/dz [n, V]`` or None) for ``L = sum(ce_c * ce) + sum(kd_c * kd)``, with
    ``ce_c = ce_w * ce_row_weight`` and ``kd_c = kd_w * kd_row_weight`` (row weight 1 where absent).

    Forward KL (any ``T``, no standardization) uses closed forms; the other divergences differentiate
    the reference functions with autograd on this block only, in ``z``'s dtype. ``blk`` holds the block's
    ``targets``, ``ce_row_weight``/``kd_row_weight``, and ``topk_ids``/``topk_logprobs``/``teacher_logit_std``
    (top-k), ``teacher_logits`` (exact) or ``sampled_ids``/``sample_w``/``sampled_log_p_hat`` (sampled), whichever
    apply.
    """
    t = float(kw["temperature"])
    kind, beta, standardize = kw["kind"], float(kw["beta"]), bool(kw["standardize"])
    use_ce, use_kd = ce_w != 0.0 and blk.get("targets") is not None, kd_w != 0.0
    exact, sampled = "teacher_logits" in blk, "sampled_ids" in blk
    ce_c, kd_c = _coef(ce_w, blk.get("ce_row_weight")), _coef(kd_w, blk.get("kd_row_weight"))
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
            total = _term(kd, kd_c) + (_term(ce, ce_c) if use_ce else 0.0)
            g = torch.autograd.grad(total, zl)[0] if want_grad else None
        return (None if ce is None else ce.detach()), kd.detach(), g

    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # [n, 1]
    ce = kd = None
    if use_ce:
        ce = (lse - z.gather(-1, blk["targets"].view(-1, 1))).squeeze(-1)
    q = torch.exp(z - lse)  # [n, V] softmax at T = 1; becomes the gradient buffer below
    if not use_kd:
        if want_grad:
            _sub_target_(q.mul_(ce_c), blk["targets"], ce_c, lse)
        return ce, None, (q if want_grad else None)
    if sampled:  # T = 1 (_check_sampled_args): sum_j w_j (log p_hat(x_j) - log q(x_j)), see sampled_kd_loss in kd.py
        ids, w = blk["sampled_ids"], blk["sample_w"]
        kd = (w * (blk["sampled_log_p_hat"] - (z.gather(-1, ids) - lse))).sum(dim=-1)
        if not want_grad:
            return ce, kd, None
        # dL/dz = kd_c ((sum_j w_j) q - p_hat) + ce_c (q - onehot(target)): q's share in one in-place pass,
        # then p_hat as the draws' weights added at their ids (scatter_add_ sums a token's repeated draws)
        g = q.mul_(kd_c * w.sum(dim=-1, keepdim=True) + (ce_c if use_ce else 0.0))
        g.scatter_add_(-1, ids, -(kd_c * w))
        return ce, kd, (_sub_target_(g, blk["targets"], ce_c, lse) if use_ce else g)
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
        coef = kd_c * t
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
            coef = kd_c * t
            # written straight over the top-k ids (not added to the tail formula's q_j (c - r) there):
            # q_j c - p_j has no q_j r - q_j r cancellation, which cost ~q_j r eps when r >> 1
            g_kd_top = (q_top * c - p[:, :-1]) * coef  # [n, k]
    if not want_grad:
        return ce, kd, None
    if exact:
        g = g_kd
        if use_ce:
            _add_scaled_(g, q, ce_c)
    else:
        if use_ce:  # CE's share q_j at the top-k ids (q at T = 1; q_top is a copy taken before q changes)
            g_kd_top = g_kd_top + ce_c * (q_top if t == 1.0 else _gather(q, ids, oob, 0.0))
        if t == 1.0:  # qt is q: one in-place pass gives CE's and KD's share of q
            g = q.mul_((c - r) * coef + (ce_c if use_ce else 0.0))
        else:
            g = qt.mul_((c - r) * coef)
            if use_ce:
                _add_scaled_(g, q, ce_c)
        _put_(g, ids, oob, g_kd_top)  # an out-of-range entry is no column: its column keeps the tail formula
    if use_ce:
        _sub_target_(g, blk["targets"], ce_c, lse)
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
            if ce is not None:  # weighted by the row weights, where given (float weight 1.0: the plain sum)
                ce_sum += _term(ce, blk["ce_row_weight"]) if "ce_row_weight" in blk else ce.sum()
            if kd is not None:
                kd_sum += _term(kd, blk["kd_row_weight"]) if "kd_row_weight" in blk else kd.sum()
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


def _row_weight(name: str, w: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    if w is not None and (tuple(w.shape) != (n,) or not w.dtype.is_floating_point):
        raise ValueError(f"{name} must be a float tensor [N={n}], got {w.dtype} {tuple(w.shape)}")
    return None if w is None else w.detach()


def _kd_source(spec: dict, rows: dict, n: int, v: int, kind: str, temperature: float, standardize: bool,
               topk_ids, topk_logprobs, teacher_logit_std, teacher_hidden, teacher_head_weight, teacher_head_bias,
               sampled_ids, sample_weights) -> None:
    """Checks the one KD source given and puts its tensors in ``spec`` (whole) and ``rows`` (cut by block)."""
    given = [name for name, x in (("teacher_hidden", teacher_hidden), ("topk_ids", topk_ids),
                                  ("sampled_ids", sampled_ids)) if x is not None]
    if len(given) > 1:
        raise ValueError(f"KD reads one teacher source (teacher_hidden + head: exact; topk_ids + topk_logprobs; "
                         f"sampled_ids), got {given}")
    if teacher_hidden is not None:
        if teacher_head_weight is None or teacher_head_weight.shape[0] != v:
            raise ValueError(f"exact KD needs teacher_head_weight [V={v}, Ht]")
        if teacher_hidden.shape[0] != n or teacher_hidden.shape[1] != teacher_head_weight.shape[1]:
            raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} must be [N={n}, Ht]")
        spec["teacher_hidden"] = teacher_hidden.detach()
        spec["teacher_weight"] = teacher_head_weight.detach()
        spec["teacher_bias"] = None if teacher_head_bias is None else teacher_head_bias.detach()
    elif sampled_ids is not None:
        _check_sampled_args(kind, temperature, standardize)
        if sampled_ids.dim() != 2 or sampled_ids.shape[0] != n or (
                sample_weights is not None and tuple(sample_weights.shape) != tuple(sampled_ids.shape)):
            raise ValueError(f"sampled KD needs sampled_ids [N={n}, s] (and sample_weights of that shape), got "
                             f"{tuple(sampled_ids.shape)}")
        rows["sampled_ids"], rows["sample_w"] = sampled_ids, sample_weights  # estimated once the dtype is known
    else:
        _check_bucket_kind(kind)
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


def fused_head_loss(student_hidden: torch.Tensor, head_weight: torch.Tensor, head_bias: Optional[torch.Tensor] = None,
                    *, targets: Optional[torch.Tensor] = None, ce_weight: float = 1.0, kd_weight: float = 1.0,
                    ce_row_weight: Optional[torch.Tensor] = None, kd_row_weight: Optional[torch.Tensor] = None,
                    topk_ids: Optional[torch.Tensor] = None, topk_logprobs: Optional[torch.Tensor] = None,
                    teacher_logit_std: Optional[torch.Tensor] = None, teacher_hidden: Optional[torch.Tensor] = None,
                    teacher_head_weight: Optional[torch.Tensor] = None,
                    teacher_head_bias: Optional[torch.Tensor] = None, sampled_ids: Optional[torch.Tensor] = None,
                    sample_weights: Optional[torch.Tensor] = None, kind: str = "fkl", beta: float = 0.5,
                    temperature: float = 1.0, standardize: bool = False, block_rows: int = 512):
    """The student's LM head, cross-entropy and KD in one pass: ``(total, ce, kd)``, scalars.

    ``student_hidden [N, Hs]`` at answer positions, ``head_weight [V, Hs]`` (+ ``head_bias [V]``).
    ``ce = sum_i ce_row_weight_i * CE_i`` (cross-entropy against ``targets [N]`` int) and
    ``kd = sum_i kd_row_weight_i * KD_i`` (the per-row divergence), a row weight ``[N]`` float being 1 where
    the argument is None (the plain sums); ``total = ce_weight * ce + kd_weight * kd`` is differentiable with
    respect to the hidden states, head weight and bias, ``ce`` and ``kd`` are detached, for logging. The row
    weights are how a caller makes its reduction (``1 / N`` for the token mean; ``1 / (S n_s)`` at a row of
    sample ``s`` of ``n_s`` rows for the study's per-sample mean; global counts under DDP) and puts CE and
    KD on different rows: a row weight of 0 leaves the row out of that term (a CE row of weight 0 may hold
    any target, e.g. -100; every row's KD inputs must still be finite).

    KD reads one teacher source: top-k + tail (``topk_ids``/``topk_logprobs``, as ``topk_kd_loss``),
    exact full-vocabulary (``teacher_hidden [N, Ht]`` + ``teacher_head_weight [V, Ht]``, as
    ``chunked_exact_kd_loss``) or sampled (``sampled_ids [N, s]`` + ``sample_weights [N, s]`` or None, as
    ``sampled_kd_loss``: ``kind="fkl"``, ``temperature=1``, no standardization). ``kd_weight=0`` gives CE
    only. Values and gradients equal ``F.cross_entropy(reduction="none")`` and the matching reference loss
    with ``reduction="none"``, weighted and summed as above.

    Work runs ``block_rows`` rows at a time, in float32 (float64 if any floating input but the row weights is
    float64, and the losses come back in that dtype): each block's ``[block_rows, V]`` logits
    give their losses and logit gradient at once (closed form for forward KL without
    standardization, the row weights as ``[n, 1]`` columns; autograd on the block otherwise) and are folded
    into ``dL/dh`` and ``dL/dW`` straight away. So the student's logits are computed once (not once for CE
    and again for KD, nor recomputed in backward as a checkpoint would) and peak extra memory is a few
    ``block_rows x V`` buffers plus the stored ``[V, Hs]`` head gradient.

    Raises ``ValueError`` on a bad ``kind``/``beta``/``temperature``, mismatched shapes, a missing or second
    KD source, ``"mse"`` on the top-k path, or the sampled source's rules (``sampled_kd_loss``).
    """
    _check_kd_args(kind, beta, temperature, "sum")
    if student_hidden.dim() != 2 or head_weight.dim() != 2 or student_hidden.shape[1] != head_weight.shape[1]:
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} must be [N, Hs] and head_weight "
                         f"{tuple(head_weight.shape)} [V, Hs]")
    if int(block_rows) < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows!r}")
    n, v = student_hidden.shape[0], head_weight.shape[0]
    ce_w, kd_w = float(ce_weight), float(kd_weight)
    ce_rw, kd_rw = _row_weight("ce_row_weight", ce_row_weight, n), _row_weight("kd_row_weight", kd_row_weight, n)
    rows = {}
    if ce_w != 0.0:
        if targets is None or tuple(targets.shape) != (n,):
            raise ValueError(f"ce_weight != 0 needs targets [N={n}]")
        # a row out of the CE term may hold any target (-100...): a valid id there keeps gather in range
        rows["targets"] = targets.long() if ce_rw is None else torch.where(ce_rw != 0, targets.long(), 0)
    spec = {"ce_w": ce_w, "kd_w": kd_w, "block": int(block_rows), "rows": rows,
            "kw": dict(kind=kind, beta=float(beta), temperature=float(temperature), standardize=bool(standardize))}
    if kd_w != 0.0:
        _kd_source(spec, rows, n, v, kind, temperature, standardize, topk_ids, topk_logprobs, teacher_logit_std,
                   teacher_hidden, teacher_head_weight, teacher_head_bias, sampled_ids, sample_weights)
    cd = spec["dtype"] = _compute_dtype(student_hidden, head_weight, head_bias, *(
        spec.get(key) for key in ("teacher_hidden", "teacher_weight", "teacher_bias")), rows.get("topk_logprobs"),
        rows.get("sample_w"))
    if "sampled_ids" in rows:
        rows["sampled_ids"], rows["sample_w"], rows["sampled_log_p_hat"] = _sampled_estimate(
            rows["sampled_ids"], rows["sample_w"], v, cd)
    if ce_rw is not None and ce_w != 0.0:
        rows["ce_row_weight"] = ce_rw.to(cd)
    if kd_rw is not None and kd_w != 0.0:
        rows["kd_row_weight"] = kd_rw.to(cd)
    spec["want_grad"] = torch.is_grad_enabled() and (student_hidden.requires_grad or head_weight.requires_grad
                                                     or (head_bias is not None and head_bias.requires_grad))
    return _FusedHeadLoss.apply(student_hidden, head_weight, head_bias, spec)
