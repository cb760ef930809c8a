"""The declared loss terms as the trainer evaluates them (issue #21): one micro-batch of a real cache (every
position kind, two hidden layers, the affinity block) through ``objective.Objective`` equals a loss assembled by
hand in float64 from the model's own forward and the cached teacher fields — value and gradient — for each term
and both reductions; refusals before training for a term the cache cannot feed or a student that cannot align."""
from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import cli

TRAIN = ["train_student.batch_size=4", "train_student.micro_batch_size=4", "train_student.max_steps=1",
         "train_student.lr=1e-3", "train_student.freeze_vision=true"]


@pytest.fixture(scope="module")
def full_cache(cached_run, tmp_path_factory, tiny_teacher):
    """cached_run's data re-cached with every row kind, hidden layers -1 and 1, top-8 and the affinity block."""
    run0, student, root = cached_run
    run = tmp_path_factory.mktemp("terms") / "run"
    shutil.copytree(run0, run)
    cli("cache-teacher", run, "--teacher", tiny_teacher, "--executor", "local", "--force", "cache_teacher.source=data",
        "cache_teacher.top_k=8", "cache_teacher.positions=all", "cache_teacher.hidden_layers=[-1,1]",
        "cache_teacher.affinity=true", timeout=900)
    return run, student, root


def _setup(run, student, root, overrides: list[str]):
    """(terms, a collated micro-batch with its norms, the items, the objective) for ``overrides``."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from llavadi.pipeline.config import load_config
    from llavadi.schemas.teacher_cache import CacheReader
    from llavadi.stages.train_student import late
    from llavadi.stages.train_student.batch import CollatePlan
    from llavadi.stages.train_student.data import StepDataset, stream_samples, student_tokens
    from llavadi.stages.train_student.objective import Objective
    from llavadi.stages.train_student.terms import build_terms, row_sets

    cfg = load_config({}, [f"train_student.student={student}"] + overrides)
    c = cfg.train_student
    reader = CacheReader(run / "cache_teacher")
    terms = build_terms(c, reader.meta)
    st = student_tokens(str(student))
    stream = list(stream_samples(run, st, image_root=str(root)))
    items = [it for it in stream if it["row"]["image"]][:3] + [it for it in stream if not it["row"]["image"]][:1]
    plan = CollatePlan(tuple(row_sets(terms).items()), affinity=any(t.name == "aff" for t in terms))
    ds = StepDataset(run, st, str(root), batch_size=1, micro_batch_size=1, rank=0, world=1, seed=0, epoch=0,
                     shuffle_buffer=1, plan=plan)
    mb = ds.collate(items)
    assert mb["sample_ids"] == [it["id"] for it in items] and not mb["rejects"]
    mb["norms"] = late.gate([mb], terms, 1, "cpu").norms
    torch.manual_seed(0)
    student_model = AutoModelForImageTextToText.from_pretrained(student, dtype=torch.float32)
    head_t = load_file(run / "cache_teacher" / "teacher_head.safetensors")
    obj = Objective(student_model, terms, {layer: reader.spec.hidden_size for layer in reader.spec.hidden_layers},
                    head_t, lambda: torch.autocast("cpu", enabled=False), c.reduction)
    return cfg, terms, mb, items, obj, head_t


def _zscore(z):
    return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-7)


def _row_losses(t, z_s, cache, rows, head_t, h_s, proj):
    """Per-row float64 losses of term ``t`` at cache rows ``rows`` (student logits ``z_s``, hidden ``h_s``)."""
    p = t.params
    if t.name == "ce":
        tgt = cache["token_ids"][rows] if p["target"] == "label" else cache["topk_ids"][rows][:, 0]
        return -torch.log_softmax(z_s, -1)[torch.arange(len(rows)), torch.as_tensor(tgt, dtype=torch.long)]
    if t.name.startswith("feat"):
        th = torch.as_tensor(cache[f"hidden@{p['teacher_layer']}" if p["teacher_layer"] != -1 else "hidden"][rows],
                             dtype=torch.float64)
        y = proj(h_s)
        return (y - th).pow(2).mean(-1) if p["kind"] == "mse" else 1 - torch.nn.functional.cosine_similarity(y, th, -1)
    # KD
    T = p["temperature"]
    if p["source"] == "exact":
        z_t = torch.as_tensor(cache["hidden"][rows], dtype=torch.float64) @ head_t["weight"].double().T
        zs, zt = (_zscore(z_s), _zscore(z_t)) if p["standardize"] else (z_s, z_t)
        if p["kind"] == "mse":
            return (zs - zt).pow(2).mean(-1)
        lq, lp = torch.log_softmax(zs / T, -1), torch.log_softmax(zt / T, -1)
    else:  # top-k + one tail bucket, both sides
        ids = torch.as_tensor(cache["topk_ids"][rows], dtype=torch.long)
        lpt = torch.as_tensor(cache["topk_logprobs"][rows], dtype=torch.float64)
        lq_full = torch.log_softmax(z_s / T, -1)
        lq_top = lq_full.gather(1, ids)
        lq = torch.cat([lq_top, torch.log1p(-lq_top.exp().sum(-1, keepdim=True))], -1)
        lp = torch.cat([lpt, torch.log1p(-lpt.exp().sum(-1, keepdim=True))], -1) / T
        lp = torch.log_softmax(lp, -1)
    if p["kind"] == "fkl":
        return (lp.exp() * (lp - lq)).sum(-1) * T * T
    if p["kind"] == "rkl":
        return (lq.exp() * (lq - lp)).sum(-1) * T * T
    if p["kind"] == "tvd":
        return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1) * T * T
    raise AssertionError(p["kind"])


def reference(cfg, terms, mb, items, obj, head_t):
    """The loss assembled by hand, float64: the model's own forward (``output_hidden_states``); each sample's rows
    straight from its cache (student and teacher share the template, so the positions are the cache's); each
    term's per-row losses from the formulas above; the mean over the term's rows of the batch (``token``) or per
    sample then over samples (``sample``); affinity as cosine blocks of the final hidden states."""
    from llavadi.schemas.teacher_cache import POSITIONS

    m = copy.deepcopy(obj).double()
    inputs = {k: (v.double() if v.is_floating_point() else v) for k, v in mb["inputs"].items()}
    out = m.student.model(**inputs, output_hidden_states=True)
    W = m.student.get_output_embeddings().weight
    total = 0.0
    for t in terms:
        per_sample = []
        for b, it in enumerate(items):
            cache = it["cache"]
            if t.name == "aff":
                if not cache["affinity"].size:
                    continue
                ids = mb["inputs"]["input_ids"][b]
                img = (ids == 32000).nonzero().flatten()
                ans = torch.as_tensor(cache["position"][cache["kind"] == 2] + 1)
                h = out.last_hidden_state[b]
                hi = torch.nn.functional.normalize(h[img], dim=-1)
                ha = torch.nn.functional.normalize(h[ans], dim=-1)
                per_sample.append(((hi @ ha.T) - torch.as_tensor(cache["affinity"], dtype=torch.float64)).pow(2).reshape(-1))
                continue
            kinds = POSITIONS["answer"] if t.name == "ce" else t.kinds
            rows = np.nonzero(np.isin(cache["kind"], kinds))[0]
            pos = torch.as_tensor(cache["position"][rows], dtype=torch.long)
            layer = -1 if t.layer is None else t.layer
            h_s = (out.last_hidden_state if layer == -1 else out.hidden_states[layer])[b][pos]
            z_s = h_s @ W.T if t.layer is None else None
            proj = m.projector[t.name.replace("[", "_").replace(",", "_").replace("]", "").replace("-", "m")] \
                if t.name.startswith("feat") else None
            per_sample.append(_row_losses(t, z_s, cache, rows, head_t, h_s, proj))
        if cfg.train_student.reduction == "token":
            v = torch.cat(per_sample).sum() / sum(len(x) for x in per_sample)
        else:
            v = torch.stack([x.mean() for x in per_sample if len(x)]).mean()
        total = total + t.weight * v
    return total, m


CASES = {
    "ce-label": ["train_student.kd_weight=0", "train_student.feature_weight=0"],
    "ce-teacher-argmax": ["train_student.kd_weight=0", "train_student.feature_weight=0",
                          "train_student.ce_target=teacher_argmax"],
    "kd-topk-fkl-answer": ["train_student.ce_weight=0", "train_student.feature_weight=0"],
    "kd-exact-fkl-standardized-all+ce": ["train_student.feature_weight=0", "train_student.kd.source=exact",
                                         "train_student.kd.standardize=true", "train_student.kd.positions=all"],
    "kd-mse-exact": ["train_student.ce_weight=0", "train_student.feature_weight=0", "train_student.kd.kind=mse",
                     "train_student.kd.source=exact"],
    "kd-tvd-text-T2": ["train_student.ce_weight=0", "train_student.feature_weight=0", "train_student.kd.kind=tvd",
                       "train_student.kd.positions=text", "train_student.kd.temperature=2"],
    "kd-rkl-exact-all": ["train_student.ce_weight=0", "train_student.feature_weight=0", "train_student.kd.kind=rkl",
                         "train_student.kd.source=exact", "train_student.kd.positions=all"],
    "feat-two-layers-linear-all": ["train_student.ce_weight=0", "train_student.kd_weight=0",
                                   "train_student.feature.layers=[[-1,-1],[1,1]]", "train_student.feature.projector=linear",
                                   "train_student.feature.positions=all"],
    "feat-cosine-mlp": ["train_student.ce_weight=0", "train_student.kd_weight=0", "train_student.feature.kind=cosine"],
    "affinity": ["train_student.ce_weight=0", "train_student.kd_weight=0", "train_student.feature_weight=0",
                 "train_student.affinity_weight=1"],
    "everything-per-sample": ["train_student.reduction=sample", "train_student.kd.positions=all",
                              "train_student.feature.positions=text", "train_student.affinity_weight=0.5",
                              "train_student.ce_weight=0.7"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_term_value_and_gradient_equal_a_hand_assembled_loss(case, full_cache):
    run, student, root = full_cache
    cfg, terms, mb, items, obj, head_t = _setup(run, student, root, CASES[case])
    loss, values = obj(mb)
    loss.backward()
    ref, m = reference(cfg, terms, mb, items, obj, head_t)
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=2e-5, abs=1e-7)
    assert set(values) == {t.name for t in terms}
    pairs = [(name, p.grad, q.grad) for (name, p), (_, q) in zip(obj.named_parameters(), m.named_parameters())
             if p.grad is not None or q.grad is not None]
    assert pairs
    # float32 (the trainer) against float64: agree to 1e-5 of the largest gradient entry, and 1e-3 relatively
    scale = max(float(gr.abs().max()) for _, _, gr in pairs if gr is not None)
    for name, g, gr in pairs:
        g = torch.zeros_like(gr) if g is None else g
        np.testing.assert_allclose(g.double().numpy(), gr.numpy(), atol=1e-5 * scale, rtol=1e-3, err_msg=name)


def test_a_training_step_with_every_term_runs_and_logs_each(full_cache, tmp_path):
    run0, student, _ = full_cache
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    cli("train-student", run, "--student", student, *TRAIN, *CASES["everything-per-sample"],
        "train_student.feature.layers=[[-1,-1],[1,1]]", "train_student.kd.kind=jsd")
    rec = json.loads((run / "train_student" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"ce", "kd", "feat[-1,-1]", "feat[1,1]", "aff", "loss", "tokens"} <= set(rec)
    assert rec["loss"] == pytest.approx(0.7 * rec["ce"] + rec["kd"] + rec["feat[-1,-1]"] + rec["feat[1,1]"]
                                        + 0.5 * rec["aff"], rel=1e-6)


def test_terms_the_cache_cannot_feed_are_refused_naming_the_key(cached_run, tmp_path):
    """cached_run's cache: answer rows, final hidden only, top-8, no affinity."""
    run0, student, _ = cached_run
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    from llavadi.pipeline.config import load_config
    from llavadi.stages.train_student.compat import preflight

    # the preflight train-student runs before any model loads, in this process (a CLI launch per case costs
    # seconds of imports); one case through the CLI below
    for ov, want in ((["train_student.kd.positions=all"], "cache_teacher.positions=all"),
                     (["train_student.feature.positions=text"], "cache_teacher.positions=text"),
                     (["train_student.kd.source=sampled"], "cache_teacher.logits=sampled"),
                     (["train_student.feature.layers=[[1,2]]"], "hidden_layers=[2] (or any list containing 2)")):
        cfg = load_config(overrides=[f"train_student.student={student}", *TRAIN, *ov])
        problems, _ = preflight(run, cfg)
        assert any(want in x and f"llavadi cache-teacher {run} --force" in x for x in problems), (ov, problems)
    p = cli("train-student", run, "--student", student, *TRAIN, "train_student.affinity_weight=1", check=False)
    assert p.returncode == 2 and "cache_teacher.affinity=true" in p.stderr and "--force" in p.stderr, p.stderr[-800:]
    assert not (run / "train_student" / "checkpoints").exists()


def test_a_student_that_cannot_align_is_refused_and_answer_terms_still_train(full_cache, tmp_path):
    """A student whose image expands into another number of tokens (a 48-px tower: 9 patches, the teacher's 4)
    cannot train image-row or affinity terms; a student rendering other prompt tokens (a Jinja template saying
    HUMAN where the teacher's says USER) cannot train prompt-row terms; both still train at the answer rows."""
    from llavadi.stages.demo.tiny_models import STUDENT, TinySpec, build_tiny_llava

    run0, _, _ = full_cache
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    wide = build_tiny_llava(tmp_path / "wide", TinySpec(image_size=48))
    for ov in (["train_student.kd.positions=all"], ["train_student.affinity_weight=1"]):
        p = cli("train-student", run, "--student", wide, *TRAIN, *ov, check=False)
        assert p.returncode == 2 and "image expands into another number of tokens" in p.stderr, p.stderr[-800:]
    student = build_tiny_llava(tmp_path / "s", STUDENT)
    tpl = tmp_path / "other.jinja"  # the student's own template with another word before each question
    tpl.write_text((student / "chat_template.jinja").read_text().replace("'USER: '", "'HUMAN: '"))
    p = cli("train-student", run, "--student", student, *TRAIN, f"train_student.prompt_format={tpl}",
            "train_student.kd.positions=text", check=False)
    assert p.returncode == 2 and "other prompt tokens" in p.stderr, p.stderr[-800:]
    cli("train-student", run, "--student", student, *TRAIN, f"train_student.prompt_format={tpl}", "--force")
    assert (run / "train_student" / "checkpoints" / "step_000001").exists()


def test_sampled_importance_weights_follow_the_proposal_temperature():
    """Draws from q ∝ p^(1/t) weigh p/q ∝ p^(1 - 1/t), normalised per row (by hand); t = 1: none (1/s each)."""
    from llavadi.stages.train_student.objective import sample_weights

    lp = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    w = sample_weights({"sampled_logprobs": lp}, 2.0)
    want = np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]) ** 0.5
    np.testing.assert_allclose(w.numpy(), want / want.sum(1, keepdims=True), rtol=1e-6)
    assert sample_weights({"sampled_logprobs": lp}, 1.0) is None
