"""Distillation losses (``stages/train_student/losses.py``) against independent float64 references.

Every expected value here is computed in this file with plain numpy formulas (softmax, KL, the
coarsened top-k + tail distribution, the JSD mixture, z-scores), never with the module's helpers.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llavadi.stages.train_student.losses import (FeatureProjector, chunked_exact_kd_loss, dense_kd_loss, feature_loss,
                                                 fused_head_loss,
                                                 topk_kd_loss)

RTOL, ATOL = 1e-5, 1e-6


# ------------------------------------------------------------------ float64 numpy references
def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl(p, q):
    """sum_i p_i log(p_i / q_i) per row, 0 log 0 = 0."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    out = np.zeros(p.shape[:-1])
    for idx in np.ndindex(*p.shape[:-1]):
        for pi, qi in zip(p[idx], q[idx]):
            if pi > 0:
                out[idx] += pi * np.log(pi / qi)
    return out


def divergence(p, q, kind, beta=0.5):
    """Teacher p, student q; TRL's generalised JSD convention."""
    if kind == "fkl":
        return kl(p, q)
    if kind == "rkl":
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def zscore(z):
    z = np.asarray(z, np.float64)
    return (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True) + 1e-7)


def coarsen(probs, ids):
    """[N, V] probabilities -> [N, k+1]: the probs at ids, then the rest of the mass."""
    top = np.take_along_axis(probs, ids, axis=-1)
    return np.concatenate([top, 1.0 - top.sum(-1, keepdims=True)], axis=-1)


def make(n=6, v=50, k=5, seed=0, scale=3.0):
    """Random student/teacher logits and the teacher's raw top-k (ids, log-probs) in float64."""
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, v)) * scale
    t = rng.normal(size=(n, v)) * scale
    lp = np.log(softmax(t))
    ids = np.argsort(-t, axis=-1, kind="stable")[:, :k]
    return s, t, ids, np.take_along_axis(lp, ids, axis=-1)


def tt(x, dtype=None):
    """numpy -> torch: float32 for floats, int64 for integers unless dtype says otherwise."""
    x = np.asarray(x)
    if dtype is None:
        dtype = torch.int64 if np.issubdtype(x.dtype, np.integer) else torch.float32
    return torch.tensor(x, dtype=dtype)


def topk_reference(s, ids, top_lp, kind, beta=0.5, T=1.0, s_std=False, t_std=None):
    """Coarsened reference: student tempered over V then bucketed; teacher buckets p**(1/T_eff) renormalised."""
    zs = zscore(s) if s_std else s
    q = coarsen(softmax(zs / T), ids)
    p_top = np.exp(top_lp)
    p = np.concatenate([p_top, 1.0 - p_top.sum(-1, keepdims=True)], axis=-1)
    t_eff = T if t_std is None else (t_std[:, None] + 1e-7) * T
    p = p ** (1.0 / t_eff)
    p = p / p.sum(-1, keepdims=True)
    return divergence(p, q, kind, beta) * T * T


# ----------------------------------------------------------------------------- top-k + tail
def test_topk_forward_kl_with_tail_bucket_matches_reference():
    s, t, ids, top_lp = make()
    p_top = np.exp(top_lp)
    assert (1 - p_top.sum(-1)).min() > 0.05  # the tail bucket really matters here
    expected = kl(np.concatenate([p_top, 1 - p_top.sum(-1, keepdims=True)], -1), coarsen(softmax(s), ids))
    got = topk_kd_loss(tt(s), tt(ids, torch.int32), tt(top_lp), reduction="none")
    assert got.dtype == torch.float32 and got.shape == (6,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(topk_kd_loss(tt(s), tt(ids, torch.int64), tt(top_lp)).item(), expected.mean(), rtol=RTOL)
    np.testing.assert_allclose(topk_kd_loss(tt(s), tt(ids), tt(top_lp), reduction="sum").item(), expected.sum(), rtol=RTOL)
    # ignoring the tail (plain top-k renormalised) would give a different number: the test can tell
    q_top = np.take_along_axis(softmax(s), ids, -1)
    wrong = kl(p_top / p_top.sum(-1, keepdims=True), q_top / q_top.sum(-1, keepdims=True))
    assert not np.allclose(got.numpy(), wrong, rtol=1e-3)


def test_topk_reverse_kl_matches_reference():
    s, t, ids, top_lp = make(seed=1)
    p_top = np.exp(top_lp)
    p = np.concatenate([p_top, 1 - p_top.sum(-1, keepdims=True)], -1)
    expected = kl(coarsen(softmax(s), ids), p)
    got = topk_kd_loss(tt(s), tt(ids, torch.int32), tt(top_lp), kind="rkl", reduction="none")
    np.testing.assert_allclose(got.numpy(), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_topk_with_k_equal_v_is_the_full_vocabulary_divergence(kind):
    n, v = 5, 40
    s, t, ids, top_lp = make(n=n, v=v, k=v, seed=2)
    expected = divergence(softmax(t), softmax(s), kind, 0.3)
    got = topk_kd_loss(tt(s), tt(ids), tt(top_lp), kind=kind, beta=0.3, reduction="none")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    dense = dense_kd_loss(tt(s), tt(t), kind=kind, beta=0.3, reduction="none")
    np.testing.assert_allclose(dense.numpy(), expected, rtol=1e-5, atol=1e-6)
    # tempered (and standardized) with a tail that is exactly 0 (sum(exp) >= 1 after a uniform shift,
    # which the renormalisation removes): re-tempering the k + 1 buckets is then exact, and the eps
    # guard on the tail is not inflated by the temperature
    shifted = tt(top_lp) + 1e-6
    expected = 4.0 * divergence(softmax(t / 2.0), softmax(s / 2.0), kind, 0.3)
    got = topk_kd_loss(tt(s), tt(ids), shifted, kind=kind, beta=0.3, temperature=2.0, reduction="none")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    expected = 4.0 * divergence(softmax(zscore(t) / 2.0), softmax(zscore(s) / 2.0), kind, 0.3)
    got = topk_kd_loss(tt(s), tt(ids), shifted, kind=kind, beta=0.3, temperature=2.0, standardize=True,
                       teacher_logit_std=tt(t.std(-1, ddof=1)), reduction="none")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["dense", "topk"])
def test_jsd_beta_endpoints_and_mixture(path):
    s, t, ids, top_lp = make(seed=3)
    if path == "dense":
        p, q = softmax(t), softmax(s)
        run = lambda **kw: dense_kd_loss(tt(s), tt(t), reduction="none", **kw).numpy()
    else:
        p_top = np.exp(top_lp)
        p, q = np.concatenate([p_top, 1 - p_top.sum(-1, keepdims=True)], -1), coarsen(softmax(s), ids)
        run = lambda **kw: topk_kd_loss(tt(s), tt(ids), tt(top_lp), reduction="none", **kw).numpy()
    np.testing.assert_allclose(run(kind="jsd", beta=0.0), kl(p, q), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(run(kind="jsd", beta=1.0), kl(q, p), rtol=RTOL, atol=ATOL)
    m = 0.5 * p + 0.5 * q
    mixture = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    np.testing.assert_allclose(run(kind="jsd", beta=0.5), mixture, rtol=RTOL, atol=ATOL)
    m = 0.2 * p + 0.8 * q  # beta weights the teacher
    np.testing.assert_allclose(run(kind="jsd", beta=0.2), 0.2 * kl(p, m) + 0.8 * kl(q, m), rtol=RTOL, atol=ATOL)
    assert np.all(mixture <= np.log(2) + 1e-9) and np.all(mixture > 0)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_dense_temperature_two_with_t_squared(kind):
    s, t, _, _ = make(seed=4)
    expected = 4.0 * divergence(softmax(t / 2.0), softmax(s / 2.0), kind, 0.5)
    got = dense_kd_loss(tt(s), tt(t), kind=kind, temperature=2.0, reduction="none")
    np.testing.assert_allclose(got.numpy(), expected, rtol=RTOL, atol=ATOL)


def test_topk_temperature_retempers_teacher_buckets():
    s, t, ids, top_lp = make(seed=5)
    for kind in ("fkl", "rkl", "jsd"):
        expected = topk_reference(s, ids, top_lp, kind, T=2.0)
        got = topk_kd_loss(tt(s), tt(ids), tt(top_lp), kind=kind, temperature=2.0, reduction="none")
        np.testing.assert_allclose(got.numpy(), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_dense_standardization(T):
    s, t, _, _ = make(seed=6)
    s, t = s * 2.5 + 4.0, t * 0.7 - 1.0  # different scales and offsets: standardization matters
    for kind in ("fkl", "rkl", "jsd"):
        expected = T * T * divergence(softmax(zscore(t) / T), softmax(zscore(s) / T), kind, 0.5)
        got = dense_kd_loss(tt(s), tt(t), kind=kind, temperature=T, standardize=True, reduction="none")
        np.testing.assert_allclose(got.numpy(), expected, rtol=RTOL, atol=ATOL)
        plain = dense_kd_loss(tt(s), tt(t), kind=kind, temperature=T, reduction="none")
        assert not np.allclose(plain.numpy(), expected, rtol=1e-3)


def test_topk_standardization():
    n, v = 6, 50
    s, t, ids, top_lp = make(n=n, v=v, k=8, seed=7)
    t_std = t.std(-1, ddof=1)
    for T in (1.0, 2.0):
        expected = topk_reference(s, ids, top_lp, "fkl", T=T, s_std=True, t_std=t_std)
        got = topk_kd_loss(tt(s), tt(ids), tt(top_lp), temperature=T, standardize=True,
                           teacher_logit_std=tt(t_std), reduction="none")
        np.testing.assert_allclose(got.numpy(), expected, rtol=RTOL, atol=ATOL)
    # the teacher's buckets are tempered by its own std (a [N, 1] std works too): not by T alone
    no_std = topk_reference(s, ids, top_lp, "fkl", T=2.0, s_std=True, t_std=np.ones(n) - 1e-7)
    got = topk_kd_loss(tt(s), tt(ids), tt(top_lp), temperature=2.0, standardize=True,
                       teacher_logit_std=tt(t_std[:, None]), reduction="none")
    assert not np.allclose(got.numpy(), no_std, rtol=1e-3)
    with pytest.raises(ValueError, match="teacher_logit_std"):
        topk_kd_loss(tt(s), tt(ids), tt(top_lp), standardize=True)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("temperature,standardize", [(1.0, False), (2.0, True)])
def test_gradients_finite_when_teacher_tail_is_zero(kind, temperature, standardize):
    n, v, k = 4, 30, 6
    rng = np.random.default_rng(9)
    t = rng.normal(size=(n, v))
    t[:, :k] += 60.0  # top-k holds all the mass: tail ~ e^-50
    ids = np.tile(np.arange(k), (n, 1))
    top_lp = np.log(softmax(t))[:, :k]
    cases = [tt(top_lp), tt(top_lp).half()]  # float16 rounding can push sum(exp) above 1
    bumped = tt(top_lp).clone()
    bumped[:, 0] += 1e-3  # sum(exp) > 1: negative tail, clamped
    cases.append(bumped)
    for lp in cases:
        s = torch.randn(n, v, requires_grad=True)
        loss = topk_kd_loss(s, tt(ids), lp, kind=kind, temperature=temperature, standardize=standardize,
                            teacher_logit_std=tt(t.std(-1, ddof=1)))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # the student's tail ~0 too (k = V): still finite
    s = torch.randn(n, v, requires_grad=True)
    ids_all = torch.argsort(torch.tensor(t), dim=-1, descending=True)
    lp_all = torch.log_softmax(torch.tensor(t), -1).gather(-1, ids_all).float()
    loss = topk_kd_loss(s, ids_all, lp_all, kind=kind, temperature=temperature, standardize=standardize,
                        teacher_logit_std=tt(t.std(-1, ddof=1)))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_topk_gradient_matches_analytic_fkl_gradient():
    """d/dz KL(p || coarsen(softmax(z))) = softmax(z) * (1 - p_b / q_b) summed per bucket b ... per token:
    dL/dz_j = q_j - p_{b(j)} * q_j / q_{b(j)} (p_b, q_b the bucket masses)."""
    s, t, ids, top_lp = make(n=3, v=20, k=4, seed=10)
    q = softmax(s)
    qb = coarsen(q, ids)
    p_top = np.exp(top_lp)
    pb = np.concatenate([p_top, 1 - p_top.sum(-1, keepdims=True)], -1)
    bucket = np.full(s.shape, 4)
    np.put_along_axis(bucket, ids, np.arange(4)[None].repeat(3, 0), -1)
    ratio = np.take_along_axis(pb / qb, bucket, -1)
    expected = (q - q * ratio) / 3.0  # reduction mean over 3 rows
    z = tt(s).requires_grad_()
    topk_kd_loss(z, tt(ids), tt(top_lp)).backward()
    np.testing.assert_allclose(z.grad.numpy(), expected, rtol=1e-4, atol=1e-7)


def test_half_inputs_are_upcast_and_result_is_float32():
    s, t, ids, top_lp = make(seed=11)
    s16, t16 = tt(s).bfloat16(), tt(t).half()
    expected = kl(softmax(t16.double().numpy()), softmax(s16.double().numpy()))
    got = dense_kd_loss(s16, t16, reduction="none")
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=RTOL, atol=ATOL)
    assert topk_kd_loss(s16, tt(ids), tt(top_lp).half()).dtype == torch.float32


def test_teacher_side_gets_no_gradient():
    s, t, ids, top_lp = make(seed=14)
    zs, zt, lp = tt(s).requires_grad_(), tt(t).requires_grad_(), tt(top_lp).requires_grad_()
    for kind in ("fkl", "rkl", "jsd"):
        (dense_kd_loss(zs, zt, kind=kind) + topk_kd_loss(zs, tt(ids), lp, kind=kind)).backward()
    assert zt.grad is None and lp.grad is None and zs.grad is not None


def test_empty_rows_and_bad_arguments():
    z = torch.zeros(0, 10, requires_grad=True)
    loss = topk_kd_loss(z, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3))
    assert loss.item() == 0.0 and loss.requires_grad
    s, t, ids, top_lp = make()
    for bad in (dict(kind="kl"), dict(beta=1.5), dict(temperature=0.0), dict(reduction="avg")):
        with pytest.raises(ValueError):
            dense_kd_loss(tt(s), tt(t), **bad)
    with pytest.raises(ValueError):
        topk_kd_loss(tt(s), tt(ids)[:3], tt(top_lp))


# ---------------------------------------------------------------------- chunked exact path
def chunk_inputs(n=37, v=50, hs=16, ht=24, seed=12, bias=True):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(n, hs, generator=g)
    ws = torch.randn(v, hs, generator=g) * 0.5
    bs = torch.randn(v, generator=g) * 0.1 if bias else None
    th = torch.randn(n, ht, generator=g).half()  # the cache stores float16
    wt = torch.randn(v, ht, generator=g) * 0.5
    bt = torch.randn(v, generator=g) * 0.1 if bias else None
    return sh, ws, bs, th, wt, bt


@pytest.mark.parametrize("chunk", [8, 37, 100, 1])
@pytest.mark.parametrize("kind,temperature,standardize", [("fkl", 1.0, False), ("rkl", 2.0, True), ("jsd", 1.5, False)])
def test_chunked_equals_unchunked_dense(chunk, kind, temperature, standardize):
    sh, ws, bs, th, wt, bt = chunk_inputs()
    kw = dict(kind=kind, beta=0.4, temperature=temperature, standardize=standardize)

    leaves = [x.clone().requires_grad_() for x in (sh, ws, bs)]
    got = chunked_exact_kd_loss(leaves[0], leaves[1], th, wt, student_head_bias=leaves[2], teacher_head_bias=bt,
                                chunk_size=chunk, **kw)
    got.backward()

    ref_leaves = [x.clone().requires_grad_() for x in (sh, ws, bs)]
    zs = ref_leaves[0] @ ref_leaves[1].T + ref_leaves[2]
    zt = th.float() @ wt.T + bt
    ref = dense_kd_loss(zs, zt, **kw)
    ref.backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)

    # and the value against the float64 formula directly
    zs64, zt64 = zs.detach().double().numpy(), zt.double().numpy()
    if standardize:
        zs64, zt64 = zscore(zs64), zscore(zt64)
    expected = temperature ** 2 * divergence(softmax(zt64 / temperature), softmax(zs64 / temperature), kind, 0.4)
    np.testing.assert_allclose(got.item(), expected.mean(), rtol=1e-5)


def test_chunked_gradient_matches_analytic_float64_gradient():
    """Forward KL at T = 1, mean over N: dL/dZs = (softmax(Zs) - softmax(Zt)) / N, then the chain rule."""
    n = 37
    sh, ws, _, th, wt, _ = chunk_inputs(bias=False)
    h, w = sh.clone().requires_grad_(), ws.clone().requires_grad_()
    chunked_exact_kd_loss(h, w, th, wt, chunk_size=8).backward()
    h64, w64 = sh.double().numpy(), ws.double().numpy()
    g = (softmax(h64 @ w64.T) - softmax(th.double().numpy() @ wt.double().numpy().T)) / n
    np.testing.assert_allclose(h.grad.numpy(), g @ w64, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(w.grad.numpy(), g.T @ h64, rtol=1e-4, atol=1e-7)
    assert th.grad is None and not wt.requires_grad


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any ATen op outputs (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.max_numel, self.shapes = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor):
                self.max_numel = max(self.max_numel, o.numel())
                self.shapes.add(tuple(o.shape))
        return out


def test_chunked_path_never_materialises_n_by_v():
    n, v, chunk = 37, 50, 8
    sh, ws, bs, th, wt, bt = chunk_inputs(n=n, v=v, hs=16, ht=24)  # every input is < N*V elements
    assert max(x.numel() for x in (sh, ws, bs, th, wt, bt)) < n * v

    def run(chunked):
        h, w = sh.clone().requires_grad_(), ws.clone().requires_grad_()
        inputs = {x.untyped_storage().data_ptr() for x in (h, w, th, wt, bt)}
        saved = []

        def pack(x):
            saved.append((tuple(x.shape), x.untyped_storage().data_ptr() in inputs))
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            if chunked:
                loss = chunked_exact_kd_loss(h, w, th, wt, teacher_head_bias=bt, chunk_size=chunk)
            else:
                loss = dense_kd_loss(F.linear(h, w), F.linear(th.float(), wt, bt))
        mode = MaxNumel()
        with mode:
            loss.backward()
        return saved, mode

    saved, mode = run(chunked=True)
    # all that autograd keeps for backward are views of the (resident) inputs: no logits of any
    # chunk, so memory held between forward and backward does not grow with N * V
    assert saved and all(is_input for _, is_input in saved), saved
    assert not any(len(shape) == 2 and shape[1] == v for shape, _ in saved), saved
    assert mode.max_numel < n * v and (chunk, v) in mode.shapes  # nor created while recomputing in backward
    with MaxNumel() as fwd:
        chunked_exact_kd_loss(sh.clone().requires_grad_(), ws.clone().requires_grad_(), th, wt, chunk_size=chunk)
    assert fwd.max_numel < n * v and (chunk, v) in fwd.shapes
    # negative control: the unchunked path does keep [N, V] tensors, so these checks can fail
    saved, mode = run(chunked=False)
    assert ((n, v), False) in saved and mode.max_numel >= n * v


# ------------------------------------------------------------------------------ features
def test_feature_losses_match_reference():
    rng = np.random.default_rng(13)
    p, t = rng.normal(size=(7, 12)), rng.normal(size=(7, 12))
    mse_rows = ((p - t) ** 2).mean(-1)
    cos_rows = 1 - (p * t).sum(-1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(t, axis=-1))
    np.testing.assert_allclose(feature_loss(tt(p), tt(t), reduction="none").numpy(), mse_rows, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(feature_loss(tt(p), tt(t)).item(), mse_rows.mean(), rtol=RTOL)
    np.testing.assert_allclose(feature_loss(tt(p), tt(t).half(), reduction="sum").item(),
                               ((p - tt(t).half().double().numpy()) ** 2).mean(-1).sum(), rtol=RTOL)
    np.testing.assert_allclose(feature_loss(tt(p), tt(t), kind="cosine", reduction="none").numpy(), cos_rows,
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(feature_loss(tt(p), tt(t), kind="cosine").item(), cos_rows.mean(), rtol=RTOL)
    assert feature_loss(tt(p), tt(2.0 * p), kind="cosine").item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        feature_loss(tt(p), tt(t)[:, :5])
    with pytest.raises(ValueError):
        feature_loss(tt(p), tt(t), kind="l1")


def test_feature_projector_shapes_and_gradients():
    mlp, lin = FeatureProjector(16, 24), FeatureProjector(16, 24, kind="linear")
    linears = [m for m in mlp.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 24), (24, 24)]
    assert any(isinstance(m, torch.nn.GELU) for m in mlp.modules())
    assert [(m.in_features, m.out_features) for m in lin.modules() if isinstance(m, torch.nn.Linear)] == [(16, 24)]
    x = torch.randn(5, 16).bfloat16()
    for proj in (mlp, lin):
        y = proj(x)
        assert y.shape == (5, 24) and y.dtype == torch.float32
        feature_loss(y, torch.randn(5, 24).half()).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in proj.parameters())
    # the linear projector is exactly x @ W.T + b
    w, b = lin.net.weight.detach().double().numpy(), lin.net.bias.detach().double().numpy()
    np.testing.assert_allclose(lin(x).detach().numpy(), x.double().numpy() @ w.T + b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        FeatureProjector(4, 4, kind="conv")


# ------------------------------------------------------------ fused head: CE + KD in one pass
def fused_inputs(n=23, v=40, hs=12, ht=10, k=6, seed=21, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, hs, generator=g) * 1.5).to(dtype)
    w = (torch.randn(v, hs, generator=g) * 0.7).to(dtype)
    b = (torch.randn(v, generator=g) * 0.2).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    th = torch.randn(n, ht, generator=g).half()
    wt = torch.randn(v, ht, generator=g) * 0.8
    zt = (th.double() @ wt.double().T)
    lp = torch.log_softmax(zt, -1)
    ids = torch.argsort(-zt, dim=-1, stable=True)[:, :k]
    top_lp = lp.gather(-1, ids).float()
    t_std = zt.std(-1).float()
    return dict(h=h, w=w, b=b, targets=targets, th=th, wt=wt, ids=ids, top_lp=top_lp, t_std=t_std)


def reference_head_loss(x, h, w, b, mode, ce_w, kd_w, kw):
    """Autograd through the reference losses on full [N, V] logits: the independent path."""
    z = F.linear(h, w, b)
    total = z.new_zeros(()).float()
    ce = F.cross_entropy(z.float(), x["targets"], reduction="sum")
    if mode == "topk":
        kd = topk_kd_loss(z, x["ids"], x["top_lp"], teacher_logit_std=x["t_std"], reduction="sum", **kw)
    else:
        kd = dense_kd_loss(z, F.linear(x["th"].float(), x["wt"]), reduction="sum", **kw)
    return total + ce_w * ce + kd_w * kd, ce, kd


@pytest.mark.parametrize("mode", ["topk", "exact"])
@pytest.mark.parametrize("kind,temperature,standardize", [("fkl", 1.0, False), ("fkl", 2.0, False),
                                                          ("rkl", 1.0, False), ("jsd", 1.5, True), ("fkl", 1.0, True)])
@pytest.mark.parametrize("ce_w,kd_w,block", [(1.0, 1.0, 5), (0.3, 0.7, 100), (1.0, 0.0, 7), (0.0, 1.0, 23)])
def test_fused_head_loss_equals_reference_losses(mode, kind, temperature, standardize, ce_w, kd_w, block):
    x = fused_inputs()
    kw = dict(kind=kind, beta=0.4, temperature=temperature, standardize=standardize)
    leaves = [x[key].clone().requires_grad_() for key in ("h", "w", "b")]
    teacher = (dict(topk_ids=x["ids"], topk_logprobs=x["top_lp"], teacher_logit_std=x["t_std"]) if mode == "topk"
               else dict(teacher_hidden=x["th"], teacher_head_weight=x["wt"]))
    total, ce, kd = fused_head_loss(*leaves, targets=x["targets"], ce_weight=ce_w, kd_weight=kd_w, block_rows=block,
                                    **teacher, **kw)
    total.backward()
    ref_leaves = [x[key].clone().requires_grad_() for key in ("h", "w", "b")]
    ref_total, ref_ce, ref_kd = reference_head_loss(x, *ref_leaves, mode, ce_w, kd_w, kw)
    ref_total.backward()
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-5)
    if ce_w:
        torch.testing.assert_close(ce, ref_ce.detach(), rtol=1e-5, atol=1e-5)
    if kd_w:
        torch.testing.assert_close(kd, ref_kd.detach(), rtol=1e-5, atol=1e-5)
    assert not ce.requires_grad and not kd.requires_grad
    for a, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["topk", "exact"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_fused_closed_form_gradient_against_finite_differences(mode, temperature):
    """float64 gradcheck: the closed-form forward-KL gradient vs numerical differentiation, and the value
    against the numpy float64 formulas (an independent computation of both)."""
    x = fused_inputs(n=5, v=9, hs=4, ht=3, k=3, dtype=torch.float64)
    teacher = (dict(topk_ids=x["ids"], topk_logprobs=x["top_lp"].double()) if mode == "topk"
               else dict(teacher_hidden=x["th"].double(), teacher_head_weight=x["wt"].double()))

    def fn(h, w, b):
        return fused_head_loss(h, w, b, targets=x["targets"], ce_weight=0.6, kd_weight=1.3, block_rows=2,
                               temperature=temperature, **teacher)[0]

    leaves = [x[key].clone().requires_grad_() for key in ("h", "w", "b")]
    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-7, rtol=1e-6)

    z = (x["h"] @ x["w"].T + x["b"]).numpy()
    ce = -np.log(np.take_along_axis(softmax(z), x["targets"].numpy()[:, None], -1)).sum()
    if mode == "topk":
        kd = topk_reference(z, x["ids"].numpy(), x["top_lp"].double().numpy(), "fkl", T=temperature)
    else:
        zt = x["th"].double().numpy() @ x["wt"].double().numpy().T
        kd = kl(softmax(zt / temperature), softmax(z / temperature)) * temperature ** 2
    np.testing.assert_allclose(fn(*leaves).item(), 0.6 * ce + 1.3 * kd.sum(), rtol=1e-7)


def test_fused_gradients_finite_when_topk_holds_the_whole_vocabulary():
    x = fused_inputs(v=8, k=8)
    leaves = [x[key].clone().requires_grad_() for key in ("h", "w", "b")]
    total, _, kd = fused_head_loss(*leaves, targets=x["targets"], topk_ids=x["ids"], topk_logprobs=x["top_lp"])
    total.backward()
    assert torch.isfinite(total) and all(torch.isfinite(a.grad).all() for a in leaves)
    z = (x["h"] @ x["w"].T + x["b"]).double().numpy()
    zt = x["th"].double().numpy() @ x["wt"].double().numpy().T
    np.testing.assert_allclose(kd.item(), kl(softmax(zt), softmax(z)).sum(), rtol=1e-4)


def test_fused_head_loss_keeps_no_n_by_v_tensor():
    n, v, block = 37, 50, 8
    x = fused_inputs(n=n, v=v)
    for teacher in (dict(topk_ids=x["ids"], topk_logprobs=x["top_lp"]), dict(teacher_hidden=x["th"], teacher_head_weight=x["wt"])):
        leaves = [x[key].clone().requires_grad_() for key in ("h", "w", "b")]
        with MaxNumel() as fwd:
            total, _, _ = fused_head_loss(*leaves, targets=x["targets"], block_rows=block, **teacher)
        with MaxNumel() as bwd:
            total.backward()
        assert fwd.max_numel < n * v and (block, v) in fwd.shapes
        assert bwd.max_numel < n * v and not any(len(s) == 2 and s[1] == v and s[0] != v for s in bwd.shapes)


def test_fused_head_loss_without_grad_and_bad_arguments():
    x = fused_inputs()
    with torch.no_grad():
        total, ce, kd = fused_head_loss(x["h"], x["w"], x["b"], targets=x["targets"], topk_ids=x["ids"],
                                        topk_logprobs=x["top_lp"])
    ref_total, _, _ = reference_head_loss(x, x["h"], x["w"], x["b"], "topk", 1.0, 1.0, {})
    torch.testing.assert_close(total, ref_total.detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="targets"):
        fused_head_loss(x["h"], x["w"], topk_ids=x["ids"], topk_logprobs=x["top_lp"])
    with pytest.raises(ValueError, match="top-k KD needs"):
        fused_head_loss(x["h"], x["w"], targets=x["targets"])
    with pytest.raises(ValueError, match="teacher_logit_std"):
        fused_head_loss(x["h"], x["w"], targets=x["targets"], topk_ids=x["ids"], topk_logprobs=x["top_lp"],
                        standardize=True)
    with pytest.raises(ValueError, match="exact KD needs"):
        fused_head_loss(x["h"], x["w"], targets=x["targets"], teacher_hidden=x["th"], teacher_head_weight=x["wt"][:5])
