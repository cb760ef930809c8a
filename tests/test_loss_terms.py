"""Loss mathematics of issue #21's terms against float64 references written here: total variation and
logit MSE (dense, exact, top-k buckets, fused), the fused head's per-row weights, sampled (RS-KD) KD,
the teacher's argmax, the identity projector and the image x answer affinity loss.

Every expected value and gradient comes from torch.float64 autograd on a plain formula in this file
(softmax, bucket coarsening, z-scores, counting draws), never from a helper of the modules under test.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from llavadi.stages.train_student.losses import (KD_KINDS, FeatureProjector, affinity_loss, chunked_exact_kd_loss,
                                                 dense_kd_loss, fused_head_loss, sampled_kd_loss, teacher_argmax,
                                                 topk_kd_loss)

# the documented constants, restated (not imported): the references must not share code with the module
TAIL_EPS = 1e-8  # added to both tail buckets after tempering, then renormalised
STD_EPS = 1e-7  # logit standardization: (z - mean) / (std + STD_EPS), std with Bessel's correction
F64 = dict(rtol=1e-9, atol=1e-11)  # float64 module vs float64 reference
F32 = dict(rtol=2e-5, atol=2e-6)  # float32 module vs float64 reference


# ------------------------------------------------------------------------ float64 references
def zscore(z):
    return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + STD_EPS)


def tvd_rows(p, q):
    return 0.5 * (p - q).abs().sum(-1)


def dense_ref(zs, zt, kind, T=1.0, std=False):
    """Per-row tvd (x T^2) or logit mse between full rows."""
    if std:
        zs, zt = zscore(zs), zscore(zt)
    if kind == "mse":
        return ((zs - zt) ** 2).mean(-1)
    return tvd_rows(torch.softmax(zt / T, -1), torch.softmax(zs / T, -1)) * T * T


def bucket_ref(zs, ids, top_lp, T=1.0):
    """Top-k + tail buckets: student tempered over V then coarsened; teacher's k + 1 buckets re-tempered
    as p ** (1/T) renormalised; TAIL_EPS added to both tails, both renormalised. -> (p [N, k+1], q)."""
    q = torch.softmax(zs / T, -1)
    in_top = torch.zeros_like(q, dtype=torch.bool).scatter(-1, ids, True)
    q_b = torch.cat([q.gather(-1, ids), (q * ~in_top).sum(-1, keepdim=True)], -1)
    p_top = top_lp.exp()
    p_b = torch.cat([p_top, 1.0 - p_top.sum(-1, keepdim=True)], -1).clamp(min=0) ** (1.0 / T)
    p_b = p_b / p_b.sum(-1, keepdim=True)
    eps = torch.tensor([0.0] * ids.shape[1] + [TAIL_EPS], dtype=torch.float64)
    return (p_b + eps) / (1 + TAIL_EPS), (q_b + eps) / (1 + TAIL_EPS)


def kl_rows(p, q):
    return (p * (p.log() - q.log())).sum(-1)


def problem(n=9, v=31, hs=6, ht=5, k=4, seed=0):
    """float64 student hidden/head/bias, teacher hidden/head, its logits and top-k; targets."""
    g = torch.Generator().manual_seed(seed)
    x = dict(h=torch.randn(n, hs, generator=g, dtype=torch.float64) * 1.3,
             w=torch.randn(v, hs, generator=g, dtype=torch.float64) * 0.8,
             b=torch.randn(v, generator=g, dtype=torch.float64) * 0.3,
             th=torch.randn(n, ht, generator=g, dtype=torch.float64),
             wt=torch.randn(v, ht, generator=g, dtype=torch.float64) * 1.1,
             targets=torch.randint(0, v, (n,), generator=g))
    x["zt"] = x["th"] @ x["wt"].T
    x["ids"] = torch.argsort(-x["zt"], dim=-1, stable=True)[:, :k]
    x["top_lp"] = torch.log_softmax(x["zt"], -1).gather(-1, x["ids"])
    return x


def leaves(x, dtype=torch.float64):
    return [x[key].to(dtype).clone().requires_grad_() for key in ("h", "w", "b")]


grads_of = torch.autograd.grad


def check_logits(got_fn, ref_fn, z, tol=F64):
    """``got_fn(z)`` equals ``ref_fn(z)`` (float64 ``[N]`` rows) in value and in its gradient in ``z``."""
    za, zr = z.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
    got, ref = got_fn(za), ref_fn(zr)
    torch.testing.assert_close(got.double(), ref.detach(), **tol)
    torch.testing.assert_close(grads_of(got.sum(), za)[0].double(), grads_of(ref.sum(), zr)[0], **tol)


def check_head(x, got_fn, ref_fn, dtype=torch.float64):
    """``got_fn(h, w, b)`` and ``ref_fn(h, w, b)`` (float64 leaves) give equal tuples of scalars, and equal
    gradients of their first entry (the total) in ``h``, ``w``, ``b``; the module's leaves in ``dtype``."""
    tol = F64 if dtype == torch.float64 else F32
    ls, rs = leaves(x, dtype), leaves(x)
    got, ref = got_fn(*ls), ref_fn(*rs)
    for a, r in zip(got, ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), r.detach(), **tol)
    for a, r in zip(grads_of(got[0], ls), grads_of(ref[0], rs)):
        torch.testing.assert_close(a.double(), r, **tol)


# -------------------------------------------------------------------------------- tvd
@pytest.mark.parametrize("T,std", [(1.0, False), (2.0, False), (1.5, True)])
def test_tvd_dense_and_exact_value_and_gradient(T, std):
    x = problem()
    kw = dict(kind="tvd", temperature=T, standardize=std)
    ref = lambda z: dense_ref(z, x["zt"], "tvd", T, std)  # noqa: E731
    check_logits(lambda z: dense_kd_loss(z, x["zt"], reduction="none", **kw), ref, x["h"] @ x["w"].T)
    # float32 inputs: float32 math, the same function
    check_logits(lambda z: dense_kd_loss(z.float(), x["zt"].float(), reduction="none", **kw), ref, x["h"] @ x["w"].T,
                 tol=F32)
    # the exact path from hidden states + heads: gradients into h, W and b
    check_head(x, lambda h, w, b: (chunked_exact_kd_loss(h, w, x["th"], x["wt"], student_head_bias=b, chunk_size=4,
                                                         reduction="sum", **kw),),
               lambda h, w, b: (ref(F.linear(h, w, b)).sum(),))


def test_tvd_bounds_and_zero_probability_teacher():
    x = problem()
    zs = x["h"] @ x["w"].T
    assert dense_kd_loss(zs, zs, kind="tvd", reduction="sum").item() == pytest.approx(0.0, abs=1e-15)
    zt = x["zt"].clone()
    zt[:, :5] = -math.inf  # tokens the teacher rules out: |0 - q| each, finite
    zs_l = zs.clone().requires_grad_()
    got = dense_kd_loss(zs_l, zt, kind="tvd", reduction="none")
    got.sum().backward()
    ref = tvd_rows(torch.softmax(zt, -1), torch.softmax(zs, -1))
    torch.testing.assert_close(got, ref, **F64)
    assert torch.isfinite(zs_l.grad).all() and (got <= 1.0).all()


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_tvd_topk_buckets_value_and_gradient(T):
    x = problem()
    check_logits(lambda z: topk_kd_loss(z, x["ids"], x["top_lp"], kind="tvd", temperature=T, reduction="none"),
                 lambda z: tvd_rows(*bucket_ref(z, x["ids"], x["top_lp"], T)) * T * T, x["h"] @ x["w"].T)


@pytest.mark.parametrize("source", ["topk", "exact"])
def test_tvd_fused_value_and_gradient(source):
    x = problem()
    T = 1.5
    teacher = (dict(topk_ids=x["ids"], topk_logprobs=x["top_lp"]) if source == "topk"
               else dict(teacher_hidden=x["th"], teacher_head_weight=x["wt"]))

    def ref(h, w, b):
        z = F.linear(h, w, b)
        kd = (tvd_rows(*bucket_ref(z, x["ids"], x["top_lp"], T)) if source == "topk"
              else tvd_rows(torch.softmax(x["zt"] / T, -1), torch.softmax(z / T, -1))).sum() * T * T
        ce = -torch.log_softmax(z, -1).gather(-1, x["targets"][:, None]).sum()
        return 0.3 * ce + 1.7 * kd, ce, kd

    check_head(x, lambda h, w, b: fused_head_loss(h, w, b, targets=x["targets"], ce_weight=0.3, kd_weight=1.7,
                                                  kind="tvd", temperature=T, block_rows=4, **teacher), ref)


# -------------------------------------------------------------------------------- mse
@pytest.mark.parametrize("std", [False, True])
def test_mse_dense_exact_and_fused_value_and_gradient(std):
    x = problem()
    zs = x["h"] @ x["w"].T + x["b"]
    ref = lambda z: dense_ref(z, x["zt"], "mse", std=std)  # noqa: E731
    check_logits(lambda z: dense_kd_loss(z, x["zt"], kind="mse", standardize=std, reduction="none"), ref, zs)
    # "mean" = the mean over all N x V elements: F.mse_loss, the study's mse_distill
    want = F.mse_loss(zscore(zs) if std else zs, zscore(x["zt"]) if std else x["zt"])
    torch.testing.assert_close(dense_kd_loss(zs, x["zt"], kind="mse", standardize=std), want, **F64)
    teacher = dict(teacher_hidden=x["th"], teacher_head_weight=x["wt"])

    def ref_head(h, w, b):
        z = F.linear(h, w, b)
        kd = ref(z).sum()
        return 0.5 * F.cross_entropy(z, x["targets"], reduction="sum") + 2.0 * kd, kd

    check_head(x, lambda h, w, b: fused_head_loss(h, w, b, targets=x["targets"], ce_weight=0.5, kd_weight=2.0,
                                                  kind="mse", standardize=std, block_rows=3, **teacher)[::2], ref_head)
    check_head(x, lambda h, w, b: (chunked_exact_kd_loss(h, w, x["th"], x["wt"], student_head_bias=b, kind="mse",
                                                         standardize=std, chunk_size=4, reduction="sum"),),
               lambda h, w, b: ref_head(h, w, b)[1:])


def test_mse_rules():
    x = problem()
    zs = x["h"] @ x["w"].T
    assert "mse" in KD_KINDS and "tvd" in KD_KINDS
    with pytest.raises(ValueError, match="temperature"):
        dense_kd_loss(zs, x["zt"], kind="mse", temperature=2.0)
    with pytest.raises(ValueError, match="full logit rows"):
        topk_kd_loss(zs, x["ids"], x["top_lp"], kind="mse")
    with pytest.raises(ValueError, match="full logit rows"):
        fused_head_loss(x["h"], x["w"], targets=x["targets"], topk_ids=x["ids"], topk_logprobs=x["top_lp"],
                        kind="mse")


# ------------------------------------------------------------------ fused: per-row weights
def per_row_refs(x, z, source, kind, T):
    """Per-row CE and KD (float64, differentiable in z) for the fused head's sources."""
    ce = -torch.log_softmax(z, -1).gather(-1, x["targets"].clamp(min=0)[:, None])[:, 0]
    if source == "exact":
        p, q = torch.softmax(x["zt"] / T, -1), torch.softmax(z / T, -1)
    else:
        p, q = bucket_ref(z, x["ids"], x["top_lp"], T)
    kd = {"fkl": kl_rows(p, q), "rkl": kl_rows(q, p), "tvd": tvd_rows(p, q)}[kind] * T * T
    return ce, kd


def weight_sets(n):
    """(CE row weights, KD row weights): CE on answer rows only, token mean; KD on every row, per sample."""
    answer = torch.tensor([i % 3 != 0 for i in range(n)], dtype=torch.float64)
    ce_w = answer / answer.sum()
    samples = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])[:n]  # 3 samples of 3, 2, 4 rows
    counts = torch.bincount(samples).double()
    kd_w = 1.0 / (len(counts) * counts[samples])  # the study's per-sample mean: mean over samples of row means
    return ce_w, kd_w


@pytest.mark.parametrize("source,kind,T", [("topk", "fkl", 1.0), ("topk", "fkl", 2.0), ("exact", "fkl", 1.0),
                                           ("exact", "fkl", 1.5), ("topk", "rkl", 1.0), ("exact", "tvd", 2.0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_row_weights_equal_weighted_per_row_references(source, kind, T, dtype):
    x = problem()
    n = x["h"].shape[0]
    ce_rw, kd_rw = weight_sets(n)
    targets = x["targets"].clone()
    targets[ce_rw == 0] = -100  # rows out of the CE term may hold an ignore index
    teacher = (dict(topk_ids=x["ids"], topk_logprobs=x["top_lp"].to(dtype)) if source == "topk"
               else dict(teacher_hidden=x["th"].to(dtype), teacher_head_weight=x["wt"].to(dtype)))

    def ref(h, w, b):
        ce_rows, kd_rows = per_row_refs(x, F.linear(h, w, b), source, kind, T)
        ce, kd = (ce_rw * ce_rows).sum(), (kd_rw * kd_rows).sum()
        return 0.7 * ce + 1.3 * kd, ce, kd

    check_head(x, lambda h, w, b: fused_head_loss(h, w, b, targets=targets, ce_weight=0.7, kd_weight=1.3,
                                                  ce_row_weight=ce_rw.to(dtype), kd_row_weight=kd_rw.to(dtype),
                                                  kind=kind, temperature=T, block_rows=4, **teacher), ref, dtype)


def test_fused_row_weights_of_one_are_the_unweighted_loss():
    x = problem()
    n = x["h"].shape[0]
    for teacher in (dict(topk_ids=x["ids"], topk_logprobs=x["top_lp"]),
                    dict(teacher_hidden=x["th"], teacher_head_weight=x["wt"])):
        out = [fused_head_loss(*leaves(x), targets=x["targets"], block_rows=4, **teacher, **rw)
               for rw in ({}, dict(ce_row_weight=torch.ones(n, dtype=torch.float64),
                                   kd_row_weight=torch.ones(n, dtype=torch.float64)))]
        for a, b in zip(*out):
            torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="kd_row_weight"):
        fused_head_loss(x["h"], x["w"], targets=x["targets"], topk_ids=x["ids"], topk_logprobs=x["top_lp"],
                        kd_row_weight=torch.ones(n - 1))
    with pytest.raises(ValueError, match="one teacher source"):
        fused_head_loss(x["h"], x["w"], targets=x["targets"], topk_ids=x["ids"], topk_logprobs=x["top_lp"],
                        teacher_hidden=x["th"], teacher_head_weight=x["wt"])


# ---------------------------------------------------------------------------- sampled (RS-KD)
def draws(n, v, s, seed):
    """Draws with many repeats (a peaked proposal), unsorted, plus random positive self-normalised weights."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 3, -1)
    ids = torch.multinomial(probs, s, replacement=True, generator=g)
    w = torch.rand(n, s, generator=g, dtype=torch.float64) + 0.1
    return ids, w / w.sum(-1, keepdim=True)


def p_hat_ref(ids, w, v):
    """The sparse estimate as a dense [N, V] float64 array, by counting draws one by one (ids >= v left out)."""
    out = torch.zeros(ids.shape[0], v, dtype=torch.float64)
    for (i, j), tok in zip(itertools.product(*map(range, ids.shape)), ids.flatten().tolist()):
        if tok < v:
            out[i, tok] += float(w[i, j])
    return out


def sampled_ref(z, p_hat):
    """sum_x p_hat (log p_hat - log q) per row, 0 log 0 = 0."""
    lq = torch.log_softmax(z, -1)
    lp = torch.where(p_hat > 0, p_hat.log(), torch.zeros_like(p_hat))
    return (p_hat * (lp - torch.where(p_hat > 0, lq, torch.zeros_like(lq)))).sum(-1)


@pytest.mark.parametrize("weighted", [False, True])
def test_sampled_kd_value_and_gradient_is_q_minus_p_hat(weighted):
    x = problem()
    n, v = x["h"].shape[0], x["w"].shape[0]
    ids, w = draws(n, v, 12, seed=5)
    assert any(len(set(r.tolist())) < ids.shape[1] for r in ids)  # the draws do repeat
    ids[0, 3] = v + 2  # a padded teacher head's row: left out
    sw = w if weighted else None
    p_hat = p_hat_ref(ids, w if weighted else torch.full(ids.shape, 1 / 12, dtype=torch.float64), v)
    zs = x["h"] @ x["w"].T
    check_logits(lambda z: sampled_kd_loss(z, ids, sw, reduction="none"), lambda z: sampled_ref(z, p_hat), zs)
    # the gradient in the logits: (sum of the kept weights) q - p_hat, = q - p_hat where nothing is left out
    z = zs.clone().requires_grad_()
    g = grads_of(sampled_kd_loss(z, ids, sw, reduction="sum"), z)[0]
    torch.testing.assert_close(g, p_hat.sum(-1, keepdim=True) * torch.softmax(zs, -1) - p_hat, **F64)
    assert torch.allclose(p_hat[1:].sum(-1), torch.ones(n - 1, dtype=torch.float64))
    # sorted draws (as the cache stores them) give the same loss: order does not matter
    order = ids.sort(-1).indices
    torch.testing.assert_close(sampled_kd_loss(zs, ids.gather(-1, order), None if sw is None else sw.gather(-1, order)),
                               sampled_kd_loss(zs, ids, sw), **F64)
    ids = x["targets"][:, None].repeat(1, 8)  # one token drawn s times: p_hat = onehot(target), KL = CE
    torch.testing.assert_close(sampled_kd_loss(zs, ids), F.cross_entropy(zs, x["targets"]), **F64)


@pytest.mark.parametrize("weighted", [False, True])
def test_sampled_fused_value_and_gradient(weighted):
    x = problem()
    n, v = x["h"].shape[0], x["w"].shape[0]
    ids, w = draws(n, v, 10, seed=7)
    ids[2, 4] = v  # a padded teacher head's row: left out, so that row's kept weights sum to < 1
    sw = w if weighted else None
    p_hat = p_hat_ref(ids, w if weighted else torch.full(ids.shape, 0.1, dtype=torch.float64), v)
    ce_rw, kd_rw = weight_sets(n)
    for rw in ({}, dict(ce_row_weight=ce_rw, kd_row_weight=kd_rw)):
        cw, kw = (rw["ce_row_weight"], rw["kd_row_weight"]) if rw else (1.0, 1.0)

        def ref(h, w, b):
            z = F.linear(h, w, b)
            ce, kd = (cw * F.cross_entropy(z, x["targets"], reduction="none")).sum(), (kw * sampled_ref(z, p_hat)).sum()
            return 0.4 * ce + 1.6 * kd, ce, kd

        check_head(x, lambda h, w, b: fused_head_loss(h, w, b, targets=x["targets"], ce_weight=0.4, kd_weight=1.6,
                                                      sampled_ids=ids, sample_weights=sw, block_rows=4, **rw), ref)


def test_sampled_rules():
    x = problem()
    zs = x["h"] @ x["w"].T
    ids, _ = draws(x["h"].shape[0], x["w"].shape[0], 4, seed=1)
    for kw in (dict(kind="rkl"), dict(temperature=2.0), dict(standardize=True)):
        with pytest.raises(ValueError, match="sampled KD"):
            sampled_kd_loss(zs, ids, **kw)
        with pytest.raises(ValueError, match="sampled KD"):
            fused_head_loss(x["h"], x["w"], targets=x["targets"], sampled_ids=ids, **kw)
    with pytest.raises(ValueError, match="sample_weights"):
        sampled_kd_loss(zs, ids, torch.ones(ids.shape[0], 3))


# ------------------------------------------------------------------------------ teacher argmax
def test_teacher_argmax_in_blocks():
    x = problem(n=23)
    b = torch.randn(x["wt"].shape[0], dtype=torch.float64)
    want = (x["th"] @ x["wt"].T + b).argmax(-1)
    for block in (1, 5, 100):
        got = teacher_argmax(x["th"], x["wt"], b, block_rows=block)
        assert got.dtype == torch.int64 and torch.equal(got, want)
    # float32 / half inputs: float32 math; a tie (two equal head rows) goes to the lowest id
    wt = x["wt"].float().clone()
    top = int((x["th"][0].float() @ wt.T).argmax())
    twin = top + 1 if top + 1 < wt.shape[0] else top - 1
    wt[twin] = wt[top]
    assert int(teacher_argmax(x["th"].half(), wt, block_rows=4)[0]) == min(top, twin)
    with pytest.raises(ValueError):
        teacher_argmax(x["th"], x["wt"][:, :3])


# ------------------------------------------------------------------------------ projector none
def test_projector_none_is_the_identity():
    proj = FeatureProjector(6, 6, kind="none")
    assert list(proj.parameters()) == []
    x = torch.randn(4, 6).bfloat16()
    assert proj(x) is x
    with pytest.raises(ValueError, match="6.*8|8.*6"):
        FeatureProjector(6, 8, kind="none")


# ------------------------------------------------------------------------------ affinity
def affinity_ref(hi, ha, tb):
    si = hi / hi.norm(dim=-1, keepdim=True)
    sa = ha / ha.norm(dim=-1, keepdim=True)
    return (si @ sa.T - tb) ** 2


def test_affinity_loss_value_and_gradient():
    g = torch.Generator().manual_seed(3)
    hi = torch.randn(7, 10, generator=g, dtype=torch.float64) * 2
    ha = torch.randn(5, 10, generator=g, dtype=torch.float64)
    ti, ta = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    tb = (ti / ti.norm(dim=-1, keepdim=True)) @ (ta / ta.norm(dim=-1, keepdim=True)).T
    for r, red in (("sum", torch.sum), ("mean", torch.mean), ("none", lambda t: t)):  # gradients: image, answer side
        check_logits(lambda a: affinity_loss(a, ha, tb, reduction=r), lambda a: red(affinity_ref(a, ha, tb)), hi)
        check_logits(lambda a: affinity_loss(hi, a, tb, reduction=r), lambda a: red(affinity_ref(hi, a, tb)), ha)
    # the study's normaliser: sum over the image x answer block / its element count
    torch.testing.assert_close(affinity_loss(hi, ha, tb, reduction="mean"), affinity_ref(hi, ha, tb).sum() / 35, **F64)
    # bfloat16 student, float16 cached block: float32 math; the teacher gets no gradient
    tb_half = tb.half().requires_grad_()
    a = hi.bfloat16().requires_grad_()
    got = affinity_loss(a, ha.bfloat16(), tb_half)
    got.backward()
    assert got.dtype == torch.float32 and tb_half.grad is None and a.grad is not None
    torch.testing.assert_close(got.double(), affinity_ref(hi.bfloat16().double(), ha.bfloat16().double(),
                                                          tb.half().double()).sum(), **F32)
    assert affinity_loss(hi[:0], ha, tb[:0], reduction="mean").item() == 0.0
    with pytest.raises(ValueError):
        affinity_loss(hi, ha, tb.T)
