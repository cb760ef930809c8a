"""Issue #22 class 4: a student whose head has fewer rows than the teacher's (same tokenizer; the teacher's
head padded, llava-1.5-hf: 32064 rows for 32002 tokens). Compatibility is decided on the ids the cache can
hold: top-k ids the student lacks join the tail bucket (the divergence stays exact between the two
distributions coarsened to {each in-range top-k id, everything else}); a student head that cannot hold
every tokenizer id, and the exact path with unequal heads, are refused before training naming both sizes.

Expected values: a float64 NumPy formula written here from the definition (buckets, TAIL_EPS guard, KL),
the top-k loss applied row by row to only the in-range entries (no masking code involved), autograd of
that, and the student's own forward (``model(**inputs).logits``) on real cached rows."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import cli

TRAIN = ["train_student.batch_size=4", "train_student.micro_batch_size=2", "train_student.lr=1e-3",
         "train_student.shuffle_buffer=8"]


def hand_fkl(z: np.ndarray, ids: np.ndarray, lp: np.ndarray, v: int, eps: float = 1e-8) -> np.ndarray:
    """Forward KL at T = 1 between teacher and student coarsened to {in-range top-k ids} + tail, per row."""
    out = []
    for zi, ii, li in zip(z, ids, lp):
        keep = ii < v
        p = np.exp(li[keep])
        q_all = np.exp(zi - zi.max())
        q_all /= q_all.sum()
        q = q_all[ii[keep]]
        pb = np.append(p, max(1.0 - p.sum(), 0.0) + eps) / (1.0 + eps)
        qb = np.append(q, (1.0 - q.sum()) + eps) / (1.0 + eps)
        out.append(float(np.sum(np.where(pb > 0, pb * (np.log(pb) - np.log(qb)), 0.0))))
    return np.array(out)


def problem(seed: int, dtype=torch.float64):
    """Teacher over Vt = 40 rows (8 padding rows with large logits), student over V = 32; top-6. Rows: 0 none out
    of range, 1 the top-1 out of range, 2 all six out of range, the rest random."""
    g = torch.Generator().manual_seed(seed)
    vt, v, k, n, hs = 40, 32, 6, 9, 5
    t = torch.randn(n, vt, generator=g, dtype=torch.float64) * 2
    t[:, v:] += 1.0
    t[0, v:] = -30.0
    t[1, v] = 20.0
    t[2, v:] = 40.0
    lp_full = torch.log_softmax(t, -1)
    lp, ids = lp_full.topk(k, -1)
    h = torch.randn(n, hs, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(v, hs, generator=g, dtype=dtype, requires_grad=True)
    tg = torch.randint(0, v, (n,), generator=g)
    oob = (ids >= v).sum(1).tolist()
    assert oob[0] == 0 and ids[1, 0] >= v and oob[2] == k and 0 < sum(oob[3:]) < (n - 3) * k  # the cases are there
    return h, w, tg, ids, lp.to(dtype), t.std(-1).to(dtype)


def compact_rows(z, ids, lp, std, **kw):
    """The top-k loss row by row on only the entries < V (the per-row k varies): no masked path involved.
    A row with no entry left is all tail on both sides: divergence 0."""
    from llavadi.stages.train_student.losses import topk_kd_loss

    v = z.shape[1]
    out = []
    for i in range(z.shape[0]):
        m = ids[i] < v
        if not bool(m.any()):
            out.append(z[i].sum() * 0.0)
            continue
        out.append(topk_kd_loss(z[i:i + 1], ids[i:i + 1][:, m], lp[i:i + 1][:, m], reduction="sum",
                                teacher_logit_std=std[i:i + 1] if kw.get("standardize") else None, **kw))
    return torch.stack(out)


CASES = [dict(kind="fkl"), dict(kind="fkl", temperature=2.0), dict(kind="rkl"), dict(kind="jsd", beta=0.3),
         dict(kind="jsd", beta=0.5, temperature=1.5), dict(kind="fkl", standardize=True)]


@pytest.mark.parametrize("kw", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_out_of_range_topk_ids_join_the_tail(kw, seed):
    from llavadi.stages.train_student.losses import fused_head_loss, topk_kd_loss

    h, w, tg, ids, lp, std = problem(seed)
    s = std if kw.get("standardize") else None
    got = topk_kd_loss(h @ w.T, ids, lp, reduction="none", teacher_logit_std=s, **kw)
    g_got = torch.autograd.grad(got.sum(), (h, w))
    ref = compact_rows(h @ w.T, ids, lp, std, **kw)
    g_ref = torch.autograd.grad(ref.sum(), (h, w))
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-14) and abs(float(got[2].detach())) < 1e-15
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-13) for a, b in zip(g_got, g_ref))
    if kw == {"kind": "fkl"}:
        hand = hand_fkl((h @ w.T).detach().numpy(), ids.numpy(), lp.numpy(), w.shape[0])
        assert np.allclose(got.detach().numpy(), hand, rtol=1e-9, atol=1e-13)
    # the fused head (CE + KD, blocks of 4 rows: one block has no out-of-range id) = CE + the reference
    tot, ce, kd = fused_head_loss(h, w, targets=tg, topk_ids=ids, topk_logprobs=lp, teacher_logit_std=s,
                                  block_rows=4, **kw)
    ref_tot = torch.nn.functional.cross_entropy(h @ w.T, tg, reduction="sum") + compact_rows(h @ w.T, ids, lp, std, **kw).sum()
    g_f, g_r = torch.autograd.grad(tot, (h, w)), torch.autograd.grad(ref_tot, (h, w))
    assert float(tot.detach()) == pytest.approx(float(ref_tot.detach()), rel=1e-12)
    assert float(kd) == pytest.approx(float(ref.sum().detach()), rel=1e-12)
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(g_f, g_r))


def test_out_of_range_float32_matches_float64():
    from llavadi.stages.train_student.losses import fused_head_loss

    h, w, tg, ids, lp, _ = problem(3)
    tot64, _, _ = fused_head_loss(h, w, targets=tg, topk_ids=ids, topk_logprobs=lp)
    g64 = torch.autograd.grad(tot64, (h, w))
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    tot32, _, _ = fused_head_loss(h32, w32, targets=tg, topk_ids=ids, topk_logprobs=lp.float())
    g32 = torch.autograd.grad(tot32, (h32, w32))
    assert math.isfinite(float(tot32.detach())) and float(tot32.detach()) == pytest.approx(float(tot64.detach()), rel=1e-5)
    assert all(torch.allclose(a.double(), b, rtol=1e-4, atol=1e-5) for a, b in zip(g32, g64))


# --------------------------------------------------------------------------- the tiny models


def resized_student(student, rows: int, dest):
    """The tiny student with its embeddings and LM head cut to ``rows`` (the tokenizer's 32002 ids: not padded)."""
    from transformers import AutoModelForImageTextToText

    shutil.copytree(student, dest)
    m = AutoModelForImageTextToText.from_pretrained(student, dtype=torch.float32)
    m.resize_token_embeddings(rows)
    tc = m.config.get_text_config()
    if tc.pad_token_id is not None and tc.pad_token_id >= rows:  # a head smaller than the tokenizer: no <pad> row
        tc.pad_token_id = None
    for f in dest.glob("*.safetensors"):
        f.unlink()
    m.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def small_head(cached_run, tmp_path_factory):
    return resized_student(cached_run[1], 32002, tmp_path_factory.mktemp("small_head") / "student")


@pytest.fixture(scope="module")
def padded_run(cached_run, tiny_teacher, tmp_path_factory):
    """cached_run re-cached by a copy of the tiny teacher whose padding head rows (32002–32063) repeat the rows
    of the tokens it most often ranks first, so they land in its top-k as a trained padded head's can; the
    tiny teacher's random padding rows never did on these 24 samples."""
    from collections import Counter

    from safetensors.torch import load_file, save_file

    from llavadi.schemas.teacher_cache import CacheReader

    d = tmp_path_factory.mktemp("padded")
    teacher = d / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    reader = CacheReader(cached_run[0] / "cache_teacher")
    top1 = Counter(int(i) for e in reader.shards for s in reader.iter_shard(e) for i in s["topk_ids"][:, 0])
    src = [i for i, _ in top1.most_common(62)]
    f = teacher / "model.safetensors"
    sd = load_file(f)
    key = next(k for k in sd if k.endswith("lm_head.weight"))
    for j, i in enumerate(src):
        sd[key][32002 + j] = sd[key][i]
    save_file(sd, f, metadata={"format": "pt"})
    run = d / "run"
    shutil.copytree(cached_run[0], run)
    cli("cache-teacher", run, "--teacher", teacher, "--executor", "local", "cache_teacher.source=data",
        "cache_teacher.top_k=8", "--force")
    return run


def test_student_with_fewer_head_rows_trains(padded_run, cached_run, small_head, tmp_path):
    """Teacher head 32064 rows (padded), student 32002: the cache holds top-k ids ≥ 32002 (checked), training
    runs (it died at step 1 with 'index 320xx is out of bounds'), and the loss of a real micro-batch equals
    the float64 formula on the student's own forward."""
    from transformers import AutoModelForImageTextToText

    from llavadi.schemas.teacher_cache import CacheReader
    from llavadi.schemas.teacher_cache import POSITIONS
    from llavadi.stages.train_student.batch import CollatePlan
    from llavadi.stages.train_student.data import StepDataset, stream_samples, student_tokens
    from llavadi.stages.train_student.losses import fused_head_loss

    run0, root = padded_run, cached_run[2]
    reader = CacheReader(run0 / "cache_teacher")
    assert reader.meta["vocab_size"] == 32064
    high = sum(int((s["topk_ids"] >= 32002).sum()) for e in reader.shards for s in reader.iter_shard(e))
    assert high > 50, "the padded teacher's cache has no top-k id beyond 32001: the test would prove nothing"

    run = tmp_path / "run"
    shutil.copytree(run0, run)
    p = cli("train-student", run, "--student", small_head, *TRAIN, "train_student.max_steps=3")
    assert "3 steps" in p.stdout and "rejected 0" in p.stdout
    m = [json.loads(x) for x in (run / "train_student" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["kd"]) and r["kd"] > 0 for r in m)

    st = student_tokens(str(small_head))
    items = [it for it in stream_samples(run0, st, image_root=str(root)) if (it["cache"]["topk_ids"] >= 32002).any()][:3]
    plan = CollatePlan(((POSITIONS["answer"], ("kind", "token_ids", "topk_ids", "topk_logprobs")),))
    ds = StepDataset(run0, st, str(root), batch_size=1, micro_batch_size=1, rank=0, world=1, seed=0, epoch=0,
                     shuffle_buffer=1, plan=plan)
    mb = ds.collate(items)
    s = mb["sets"]["2"]
    model = AutoModelForImageTextToText.from_pretrained(small_head, dtype=torch.float64).eval()
    inputs = {k: (v.double() if v.is_floating_point() else v) for k, v in mb["inputs"].items()}
    with torch.no_grad():
        logits = model(**inputs).logits  # the model's own forward over the full vocabulary
        z = logits.reshape(-1, logits.shape[-1])[s["rows"]]
        out = model.model(**inputs).last_hidden_state
        h = out.reshape(-1, out.shape[-1])[s["rows"]]
        _, _, kd = fused_head_loss(h, model.get_output_embeddings().weight, targets=s["token_ids"], ce_weight=0.0,
                                   topk_ids=s["topk_ids"], topk_logprobs=s["topk_logprobs"].double())
    assert z.shape[1] == 32002 and int((s["topk_ids"] >= 32002).sum()) > 0
    hand = hand_fkl(z.numpy(), s["topk_ids"].numpy(), s["topk_logprobs"].double().numpy(), 32002)
    assert float(kd) == pytest.approx(hand.sum(), rel=1e-9)


def test_incompatible_heads_are_refused_before_training_naming_both_sizes(cached_run, small_head, tmp_path):
    from llavadi.pipeline.config import load_config
    from llavadi.stages.train_student.compat import preflight

    run, student, _ = cached_run
    tiny_head = resized_student(student, 32000, tmp_path / "s32000")  # < the tokenizer's 32002 ids
    cfg = lambda s, *x: load_config({}, [f"train_student.student={s}", *x])  # noqa: E731
    p, _ = preflight(run, cfg(tiny_head))
    assert len(p) == 1 and "32000 rows" in p[0] and "32002 ids" in p[0] and "resize_token_embeddings(32002)" in p[0]
    p, _ = preflight(run, cfg(small_head, "train_student.kd.exact=true"))
    assert len(p) == 1 and "[32002, 128]" in p[0] and "[32064, 256]" in p[0] and "kd.exact=false" in p[0]
    assert preflight(run, cfg(small_head))[0] == []  # top-k: accepted (out-of-range ids join the tail)
    assert preflight(run, cfg(student, "train_student.kd.exact=true"))[0] == []  # equal heads: exact is fine
    assert preflight(run, cfg(small_head, "train_student.kd.exact=true", "train_student.kd_weight=0"))[0] == []
    # through the command: exit 2, before any checkpoint
    r = tmp_path / "run"
    shutil.copytree(run, r)
    p = cli("train-student", r, "--student", tiny_head, *TRAIN, check=False)
    assert p.returncode == 2 and "32000 rows" in p.stderr and not (r / "train_student" / "checkpoints").exists()
