"""KD numerics (issue #13, fault class 5): every divergence on every path is finite with
zero-probability teacher entries, runs in the precision asked for (float64 in -> float64 math,
the teacher's tail mass always formed in float64), and a non-finite loss or gradient never
reaches the weights in training.

The expected values come from an independent float64 reference written here with numpy and
``math.fsum`` (no helper of ``losses.py`` is called): forward KL, reverse KL and the generalised
JSD of Agarwal et al. (GKD, ICLR 2024, Eq. 1; TRL's ``beta`` convention), on the full
vocabulary and on the top-k + tail buckets, following the formulas documented in
``stages/train_student/losses.py`` (including its zero-probability rule: a teacher probability
is floored at ``P_FLOOR`` where it is the reference measure of a KL, i.e. in reverse KL).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llavadi.stages.train_student.losses import (chunked_exact_kd_loss, dense_kd_loss, fused_head_loss,
                                                 topk_kd_loss)

# the documented constants, restated (not imported): the reference must not share code with the module
P_FLOOR = 1e-30  # teacher probability floor inside reverse KL
TAIL_EPS = 1e-8  # added to both tail buckets after tempering, then renormalised
STD_EPS = 1e-7  # logit standardization: (z - mean) / (std + STD_EPS)
TOL64 = 1e-10  # float64 path: |got - ref| <= TOL64 * (1 + |ref|)

KINDS = [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0)]
NEG_INF = -math.inf


# ----------------------------------------------------------------- independent float64 reference
def ref_log_softmax(x):
    """Row-wise log-softmax in float64; -inf entries (probability 0) stay -inf."""
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def ref_zscore(z):
    """(z - mean) / (std + 1e-7) over the row's finite entries (Bessel); -inf stays -inf."""
    z = np.asarray(z, np.float64)
    out = np.full_like(z, NEG_INF)
    for i, row in enumerate(z):
        f = np.isfinite(row)
        out[i, f] = (row[f] - row[f].mean()) / (row[f].std(ddof=1) + STD_EPS)
    return out


def ref_kl(la, lb):
    """KL(a || b) = sum a (log a - log b) from log-probs of one row, 0 log 0 = 0, exactly summed."""
    return math.fsum(math.exp(x) * (x - y) for x, y in zip(la, lb) if x != NEG_INF)


def ref_divergence(lp, lq, kind, beta):
    """Teacher ``lp``, student ``lq`` (log-probs of one row). GKD's generalised JSD with TRL's ends:
    beta = 0 is forward KL, beta = 1 reverse KL; reverse KL floors the teacher at P_FLOOR."""
    if kind == "fkl" or (kind == "jsd" and beta == 0.0):
        return ref_kl(lp, lq)
    if kind == "rkl" or (kind == "jsd" and beta == 1.0):
        return ref_kl(lq, np.maximum(lp, math.log(P_FLOOR)))
    lm = np.log(beta * np.exp(lp) + (1.0 - beta) * np.exp(lq))  # the mixture, in probability space
    return beta * ref_kl(lp, lm) + (1.0 - beta) * ref_kl(lq, lm)


def ref_dense(s, t, kind, beta, T, standardize):
    """[N] exact full-vocabulary divergences x T^2."""
    if standardize:
        s, t = ref_zscore(s), ref_zscore(t)
    lq, lp = ref_log_softmax(np.asarray(s) / T), ref_log_softmax(np.asarray(t) / T)
    return np.array([ref_divergence(a, b, kind, beta) for a, b in zip(lp, lq)]) * T * T


def ref_tail(lp_top):
    """1 - sum(exp(lp_top)) without cancellation: -expm1(max) minus the others, summed exactly; 0
    when within the documented float64 formation rounding (k + 2) 2^-53 (-expm1(max) + others)."""
    x = sorted((float(v) for v in lp_top if v != NEG_INF), reverse=True)
    if not x:
        return 1.0
    head, others = -math.expm1(x[0]), math.fsum(math.exp(v) for v in x[1:])
    tail = math.fsum([head] + [-math.exp(v) for v in x[1:]])
    return tail if tail > (len(lp_top) + 2) * 2.0 ** -53 * (head + others) else 0.0


def ref_topk(s, ids, lp_top, kind, beta, T, standardize, t_std):
    """[N] top-k + tail divergences x T^2, per the module docstring: teacher buckets (top-k, tail)
    re-tempered as p ** (1 / T_eff) renormalised (T_eff = T, or (std + 1e-7) T with
    standardization), the student tempered over the full vocabulary then bucketed; both tails + TAIL_EPS, renormalised."""
    s = ref_zscore(s) if standardize else np.asarray(s, np.float64)
    lq_full = ref_log_softmax(s / T)
    out = []
    for i in range(s.shape[0]):
        tail = ref_tail(lp_top[i])
        logb = np.append(np.asarray(lp_top[i], np.float64), math.log(tail) if tail > 0 else NEG_INF)
        t_eff = (float(t_std[i]) + STD_EPS) * T if standardize else T
        lpb = ref_log_softmax(logb / t_eff)
        lp = np.append(lpb[:-1], np.logaddexp(lpb[-1], math.log(TAIL_EPS))) - math.log1p(TAIL_EPS)
        q = np.exp(lq_full[i])
        rest = np.ones(q.shape, bool)
        rest[ids[i]] = False
        q_tail = math.fsum(q[rest])  # the complement summed directly, not 1 - sum(top)
        lq = np.append(lq_full[i][ids[i]], math.log(q_tail + TAIL_EPS)) - math.log1p(TAIL_EPS)
        out.append(ref_divergence(lp, lq, kind, beta))
    return np.array(out) * T * T


def ref_ce(z, targets):
    return -np.take_along_axis(ref_log_softmax(z), np.asarray(targets)[:, None], -1)[:, 0]


# ------------------------------------------------------------------------------------ inputs
def case(n=6, v=40, k=5, hs=12, seed=0):
    """A confident teacher with zero-probability entries, and a student head, all float64.

    Row 0: one token 30 nats above the rest (top-1 log-prob ~ -1e-11, tail ~ 1e-12).
    Row 1: only 3 tokens possible (the other 37 are -inf): two -inf entries in the top-5, tail 0.
    Row 2: 10 impossible tokens (outside the top-k). Row 3: confident and 20 impossible tokens.
    Rows 4-5: ordinary rows. ``t`` = teacher logits; ``t_exact = hidden_t @ I + bias_t`` has -inf
    columns from its bias (the exact path's teacher logits come from a head)."""
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(n, v)) * 2.0
    t[0, 3] += 30.0
    t[1, 3:] = NEG_INF
    t[2, rng.choice(v, 10, replace=False)] = NEG_INF
    t[3, 7] += 30.0
    t[3, rng.choice([j for j in range(v) if j != 7], 20, replace=False)] = NEG_INF
    ids = np.argsort(-t, axis=-1, kind="stable")[:, :k]
    lp_top = np.take_along_axis(ref_log_softmax(t), ids, -1)
    t_std = np.array([row[np.isfinite(row)].std(ddof=1) for row in t])
    h = rng.normal(size=(n, hs)) * 1.5
    w = rng.normal(size=(v, hs)) * 0.6
    targets = rng.integers(0, v, size=n)
    bias_t = np.zeros(v)
    bias_t[[5, 11, 12, 30]] = NEG_INF
    hidden_t = rng.normal(size=(n, v)) * 2.0
    hidden_t[:, 0] += 25.0  # confident on token 0
    return dict(t=t, ids=ids, lp_top=lp_top, t_std=t_std, h=h, w=w, s=h @ w.T, targets=targets,
                hidden_t=hidden_t, bias_t=bias_t, t_exact=hidden_t + bias_t)


def T64(x):
    return torch.tensor(np.asarray(x), dtype=torch.int64 if np.issubdtype(np.asarray(x).dtype, np.integer)
                        else torch.float64)


def close64(got, ref):
    got = np.asarray(got, np.float64)
    err = np.abs(got - ref)
    assert np.all(np.isfinite(got)), got
    assert np.all(err <= TOL64 * (1.0 + np.abs(ref))), f"max abs error {err.max():.3g}\n got {got}\n ref {ref}"


# ------------------------------------------------------------------ float64 path vs reference
@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("kind,beta", KINDS)
def test_reference_losses_float64_match_reference_with_zero_probability_entries(kind, beta, T, standardize):
    x = case()
    kw = dict(kind=kind, beta=beta, temperature=T, standardize=standardize, reduction="none")
    # dense, teacher logits with -inf entries
    s = T64(x["s"]).requires_grad_()
    got = dense_kd_loss(s, T64(x["t"]), **kw)
    assert got.dtype == torch.float64
    close64(got.detach().numpy(), ref_dense(x["s"], x["t"], kind, beta, T, standardize))
    got.sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # top-k + tail, -inf top-k entries and a confident teacher (k = 5)
    s = T64(x["s"]).requires_grad_()
    got = topk_kd_loss(s, T64(x["ids"]), T64(x["lp_top"]), teacher_logit_std=T64(x["t_std"]), **kw)
    assert got.dtype == torch.float64
    close64(got.detach().numpy(), ref_topk(x["s"], x["ids"], x["lp_top"], kind, beta, T, standardize, x["t_std"]))
    got.sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("kind,beta", KINDS)
def test_fused_head_loss_float64_matches_reference(kind, beta, T, standardize):
    x = case()
    kw = dict(kind=kind, beta=beta, temperature=T, standardize=standardize, targets=T64(x["targets"]),
              ce_weight=0.7, kd_weight=1.3, block_rows=4)
    ce_ref = ref_ce(x["s"], x["targets"]).sum()
    for mode in ("topk", "exact"):
        if mode == "topk":
            teacher = dict(topk_ids=T64(x["ids"]), topk_logprobs=T64(x["lp_top"]), teacher_logit_std=T64(x["t_std"]))
            kd_ref = ref_topk(x["s"], x["ids"], x["lp_top"], kind, beta, T, standardize, x["t_std"]).sum()
        else:
            teacher = dict(teacher_hidden=T64(x["hidden_t"]), teacher_head_weight=torch.eye(40, dtype=torch.float64),
                           teacher_head_bias=T64(x["bias_t"]))
            kd_ref = ref_dense(x["s"], x["t_exact"], kind, beta, T, standardize).sum()
        h, w = T64(x["h"]).requires_grad_(), T64(x["w"]).requires_grad_()
        total, ce, kd = fused_head_loss(h, w, **teacher, **kw)
        assert total.dtype == kd.dtype == torch.float64
        close64(kd.item(), kd_ref)
        close64(ce.item(), ce_ref)
        close64(total.item(), 0.7 * ce_ref + 1.3 * kd_ref)
        total.backward()
        assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all() and h.grad.abs().sum() > 0


@pytest.mark.parametrize("kind,beta", KINDS)
def test_chunked_exact_float64_matches_reference(kind, beta):
    x = case()
    h, w = T64(x["h"]).requires_grad_(), T64(x["w"]).requires_grad_()
    got = chunked_exact_kd_loss(h, w, T64(x["hidden_t"]), torch.eye(40, dtype=torch.float64),
                                teacher_head_bias=T64(x["bias_t"]), kind=kind, beta=beta, temperature=2.0,
                                chunk_size=4, reduction="none")
    assert got.dtype == torch.float64
    close64(got.detach().numpy(), ref_dense(x["s"], x["t_exact"], kind, beta, 2.0, False))
    got.sum().backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("kind,beta", [("rkl", 0.5), ("jsd", 0.5), ("jsd", 1.0)])
def test_autograd_path_gradients_float64_gradcheck_with_zero_probability_entries(kind, beta):
    """The non-closed-form divergences' gradients (the fused head differentiates the reference
    functions block by block) against finite differences, float64, with -inf teacher entries in the
    top-k and in the dense row, and the reverse-KL floor active (fast_mode: random directions)."""
    x = case(seed=3)
    ids, lp, std = T64(x["ids"]), T64(x["lp_top"]), T64(x["t_std"])
    assert torch.isinf(lp).any() and torch.isinf(T64(x["t"])).any()
    kw = dict(kind=kind, beta=beta, temperature=2.0)

    def fused(h, w):
        return fused_head_loss(h, w, targets=T64(x["targets"]), topk_ids=ids, topk_logprobs=lp, block_rows=4, **kw)[0]

    def topk(z):
        return topk_kd_loss(z, ids, lp, standardize=True, teacher_logit_std=std, reduction="sum", **kw)

    def dense(z):
        return dense_kd_loss(z, T64(x["t"]), standardize=True, reduction="sum", **kw)

    gc = dict(eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=True)
    assert torch.autograd.gradcheck(fused, (T64(x["h"]).requires_grad_(), T64(x["w"]).requires_grad_()), **gc)
    assert torch.autograd.gradcheck(topk, (T64(x["s"]).requires_grad_(),), **gc)
    assert torch.autograd.gradcheck(dense, (T64(x["s"]).requires_grad_(),), **gc)


def test_reference_sees_the_zero_probability_rule_and_the_confident_tail():
    """Negative controls for the reference itself: without the floor reverse KL is infinite on these
    rows, and a tail formed as 1 - sum in float32 arithmetic is far from the exact one."""
    x = case()
    lq = ref_log_softmax(x["s"])
    lp = ref_log_softmax(x["t"])
    with np.errstate(invalid="ignore"):
        plain = math.fsum(math.exp(a) * (a - b) for a, b in zip(lq[1], lp[1]))
    assert plain == math.inf and math.isfinite(ref_divergence(lp[1], lq[1], "rkl", 0.5))
    exact = ref_tail(x["lp_top"][0])
    assert 1e-13 < exact < 1e-10
    f32 = float(np.float32(1.0) - np.exp(x["lp_top"][0].astype(np.float32)).sum(dtype=np.float32))
    assert abs(f32 - exact) > 0.5 * exact  # float32: 0 or rounding noise


# --------------------------------------------------------------------------- float32 path
@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("kind,beta", KINDS)
def test_float32_path_is_finite_and_close_with_zero_probability_entries(kind, beta, T, standardize):
    """float32 and float16 inputs: finite losses and gradients on every path, float32 results, and
    values at float32 accuracy of the float64 reference of the same (rounded) inputs."""
    x = case()
    s32, lp32, lp16 = torch.tensor(x["s"], dtype=torch.float32), torch.tensor(x["lp_top"], dtype=torch.float32), \
        torch.tensor(x["lp_top"], dtype=torch.float16)
    kw = dict(kind=kind, beta=beta, temperature=T, standardize=standardize)
    std = torch.tensor(x["t_std"], dtype=torch.float32)
    for lp in (lp32, lp16):
        s = s32.clone().requires_grad_()
        got = topk_kd_loss(s, T64(x["ids"]), lp, teacher_logit_std=std, reduction="none", **kw)
        got.sum().backward()
        assert got.dtype == torch.float32 and torch.isfinite(got).all() and torch.isfinite(s.grad).all()
        ref = ref_topk(s32.double().numpy(), x["ids"], lp.double().numpy(), kind, beta, T, standardize,
                       std.double().numpy())
        np.testing.assert_allclose(got.detach().double().numpy(), ref, rtol=2e-4, atol=2e-5)
    s = s32.clone().requires_grad_()
    got = dense_kd_loss(s, torch.tensor(x["t"], dtype=torch.float32), reduction="none", **kw)
    got.sum().backward()
    assert got.dtype == torch.float32 and torch.isfinite(got).all() and torch.isfinite(s.grad).all()
    ref = ref_dense(s32.double().numpy(), torch.tensor(x["t"], dtype=torch.float32).double().numpy(), kind, beta, T,
                    standardize)
    np.testing.assert_allclose(got.detach().double().numpy(), ref, rtol=2e-4, atol=2e-5)
    for teacher in (dict(topk_ids=T64(x["ids"]), topk_logprobs=lp16, teacher_logit_std=std),
                    dict(teacher_hidden=torch.tensor(x["hidden_t"], dtype=torch.float16),
                         teacher_head_weight=torch.eye(40), teacher_head_bias=torch.tensor(x["bias_t"]).float())):
        h, w = torch.tensor(x["h"]).float().requires_grad_(), torch.tensor(x["w"]).float().requires_grad_()
        total, _, kd = fused_head_loss(h, w, targets=T64(x["targets"]), block_rows=4, **teacher, **kw)
        total.backward()
        assert total.dtype == torch.float32 and torch.isfinite(total) and torch.isfinite(kd)
        assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
def test_float32_path_forms_the_tail_mass_in_float64(kind):
    """float32 log-probs of a confident teacher: 1 - sum(exp) in float32 is rounding noise (the true
    tail is ~1e-12), so at T = 2 (tail ** 0.5 ~ 1e-6) the loss is only right if the tail is formed
    in float64 from the given float32 values."""
    x = case()
    s = torch.tensor(x["s"], dtype=torch.float32)
    lp = torch.tensor(x["lp_top"], dtype=torch.float32)
    ref = ref_topk(s.double().numpy(), x["ids"], lp.double().numpy(), kind, 0.5, 2.0, False, None)
    got = topk_kd_loss(s, T64(x["ids"]), lp, kind=kind, temperature=2.0, reduction="none")
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-5, atol=1e-6)
    h, w = torch.tensor(x["h"]).float(), torch.tensor(x["w"]).float()
    _, _, kd = fused_head_loss(h, w, targets=T64(x["targets"]), topk_ids=T64(x["ids"]), topk_logprobs=lp, kind=kind,
                               temperature=2.0)
    ref = ref_topk((h.double() @ w.double().T).numpy(), x["ids"], lp.double().numpy(), kind, 0.5, 2.0, False, None)
    np.testing.assert_allclose(kd.item(), ref.sum(), rtol=1e-5)


# -------------------------------------------------------------- training: non-finite steps
def _tiny_step(loss_fn, nonfinite, max_grad_norm=1.0, state=None, ids=("s-0", "s-1")):
    """One training step on a tiny model through ``loop.apply_update`` (what the loop calls after
    backward): returns (model, weights before, result or the StageError raised, state, optimizer)."""
    from types import SimpleNamespace

    from llavadi.pipeline.runner import StageError
    from llavadi.stages.train_student.step import apply_update

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    c = SimpleNamespace(max_grad_norm=max_grad_norm, nonfinite=nonfinite)
    state = state or {"global_step": 6, "epoch": 1, "step_in_epoch": 2}
    before = [p.detach().clone() for p in params]
    loss, terms = loss_fn(model)
    loss.backward()
    sums = {k: float(v) for k, v in terms.items()}
    try:
        out = apply_update(opt, sched, params, c, state, sums, math.isfinite(float(loss.detach())), list(ids), world=1)
    except StageError as e:
        out = e
    return model, before, out, state, opt, sched


def _nan_kd(model):
    """A batch whose KD term is non-finite (as a bad cache entry would make it): NaN loss and gradients."""
    y = model(torch.ones(2, 4))
    ce, kd = y.square().sum(), (y * float("nan")).sum()
    return ce + kd, {"ce": ce.detach(), "kd": kd.detach()}


def _nan_grad_only(model):
    """A finite loss (0) whose gradient is NaN: sqrt at 0 times a zero factor."""
    y = (model.weight * 0.0).sqrt().sum()
    return y, {"ce": y.detach()}


def _finite(model):
    y = model(torch.ones(2, 4)).square().sum()
    return y, {"ce": y.detach()}


@pytest.mark.parametrize("loss_fn", [_nan_kd, _nan_grad_only])
@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_nonfinite_step_stops_with_step_and_sample_ids_and_never_updates(loss_fn, max_grad_norm):
    from llavadi.pipeline.runner import StageError

    model, before, out, state, opt, _ = _tiny_step(loss_fn, "stop", max_grad_norm, ids=("img-17", "img-42"))
    assert isinstance(out, StageError)
    msg = str(out)
    assert "non-finite loss or gradient at step 7" in msg and "epoch 1" in msg
    assert "img-17" in msg and "img-42" in msg and "train_student.nonfinite=skip" in msg
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters()) and not opt.state  # nothing reached AdamW


@pytest.mark.parametrize("loss_fn", [_nan_kd, _nan_grad_only])
@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_nonfinite_step_is_skipped_and_counted_with_weights_unchanged(loss_fn, max_grad_norm):
    model, before, out, state, opt, sched = _tiny_step(loss_fn, "skip", max_grad_norm)
    vec, gnorm, applied = out
    assert applied is False and state["skipped_nonfinite"] == 1
    assert not torch.isfinite(vec).all() or loss_fn is _nan_grad_only
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters()) and not opt.state
    assert sched.last_epoch == 1  # the schedule stays aligned with global_step
    # negative control: the same step with a finite loss does update the weights (the test can fail)
    model, before, out, state, opt, _ = _tiny_step(_finite, "skip", max_grad_norm)
    assert out[2] is True and "skipped_nonfinite" not in state
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
