"""Every supported model family through every stage (issue #12), on tiny checkpoints in the public
hub layout (``tests/families``): ingest → regenerate (HF) → cache-teacher (HF) → train-student → eval
``--data`` and ``--cache``; the cached values against an independent teacher forward; each
``freeze_*`` by which parameters actually change; the saved student reloading bit-identically; and a
cross-family pair (LLaVA-NeXT teacher → llava-1.5 student, one tokenizer).

Family-specific evidence (exact answer strings, processor-level forwards, vLLM) lives in
``tests/test_family_*.py``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from families import all_cases  # noqa: E402  (tests/ is on sys.path: rootdir conftest)

CASES = all_cases()

# square, wide and tall images (anyres / dynamic-resolution families expand them differently); a
# text-only single turn and a text-only 2-turn; <image> at the END of the first human turn (moved
# to the front, LLaVA's rule)
RECORDS = [
    {"id": "sq", "image": "sq.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": "Red."}]},
    {"id": "wide2", "image": "wide.png", "conversations": [
        {"from": "human", "value": "Describe the picture.\n<image>"}, {"from": "gpt", "value": "A green bar."},
        {"from": "human", "value": "Is it wide?"}, {"from": "gpt", "value": "Yes, very wide."}]},
    {"id": "tall", "image": "tall.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A blue column."}]},
    {"id": "text1", "conversations": [
        {"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello there."}]},
    {"id": "text2", "conversations": [
        {"from": "human", "value": "Count to two."}, {"from": "gpt", "value": "One, two."},
        {"from": "human", "value": "And three?"}, {"from": "gpt", "value": "Three."}]},
    {"id": "sq2", "image": "sq.png", "conversations": [
        {"from": "human", "value": "<image>\nHow many squares?"}, {"from": "gpt", "value": "One."}]},
]


def _data(root: Path) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in {"sq.png": (48, 48), "wide.png": (96, 48), "tall.png": (48, 96)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / name)
    path = root / "train.json"
    path.write_text(json.dumps(RECORDS))
    return path


@pytest.fixture(scope="session")
def family_data(tmp_path_factory) -> Path:
    return _data(tmp_path_factory.mktemp("family_data"))


_BUILT: dict = {}


def built(case: str, role: str, tmp_path_factory) -> Path:
    key = (case, role)
    if key not in _BUILT:
        _BUILT[key] = CASES[case](tmp_path_factory.mktemp(f"{case}_{role}"), role=role, seed=1 if role == "student" else 0)
    return _BUILT[key]


def _cfg(run: Path, data: Path, teacher: Path, student: Path, **extra):
    from llavadi.pipeline.config import load_config

    ov = [f"ingest.inputs=[{data}]", f"ingest.image_root={data.parent}", "ingest.shard_size=3", "run.executor=local",
          f"teacher.model={teacher}", "regenerate.engine=hf", "regenerate.sampling.max_new_tokens=4",
          "regenerate.on_failure=keep_original", "cache_teacher.engine=hf", "cache_teacher.top_k=4",
          "cache_teacher.batch_size=4", f"train_student.student={student}", "train_student.batch_size=2",
          "train_student.micro_batch_size=2", "train_student.max_steps=2", "train_student.lr=1e-2",
          "train_student.save_every_steps=2", f"eval.data={data}", f"eval.cache={run / 'cache_teacher'}",
          "eval.max_new_tokens=3"]
    ov += [f"{k}={v}" for k, v in extra.items()]
    return load_config({}, ov)


def run_pipeline(run: Path, cfg) -> dict:
    from llavadi.pipeline.runner import run_stage
    from llavadi.stages import cache_teacher, ingest, regenerate
    from llavadi.stages.eval import evaluate
    from llavadi.stages.train_student.loop import train

    for st in (ingest.STAGE, regenerate.STAGE, cache_teacher.STAGE):
        run_stage(st, run, cfg, progress=False)
    train(run, cfg, progress=False)
    final = sorted((run / "train_student" / "checkpoints").glob("step_*"))[-1]
    return {"final": final, "eval": evaluate(run, cfg, str(final))}


def _counts(run: Path, stage: str) -> dict:
    out = {"in": 0, "out": 0}
    for p in sorted((run / stage / "_done").glob("*.json")):
        c = json.loads(p.read_text())["counts"]
        out["in"] += c["in"]
        out["out"] += c["out"]
    return out


def _raw_inputs(case: str, processor, text: str, image) -> dict:
    """The processor called directly (not through llavadi's family layer): every output it gives."""
    from families import raw_calls

    custom = raw_calls().get(case)
    if custom:
        return custom(processor, text, image)
    # a template that writes the BOS itself (Gemma's "{{ bos_token }}") is tokenised without adding
    # another, as transformers' own apply_chat_template(tokenize=True) does
    bos = processor.tokenizer.bos_token
    kw = {"add_special_tokens": not (bos and text.startswith(bos))}
    if image is not None:
        nested = type(processor).__name__.startswith(("Idefics3", "SmolVLM"))
        kw["images"] = [[image]] if nested else [image]
    return dict(processor(text=[text], return_tensors="pt", **kw))


@pytest.mark.parametrize("case", sorted(CASES))
def test_family_through_every_stage(case, family_data, tmp_path, tmp_path_factory):
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from llavadi.models.adapter import ModelAdapter
    from llavadi.schemas.teacher_cache import CacheReader

    teacher, student = built(case, "teacher", tmp_path_factory), built(case, "student", tmp_path_factory)
    run = tmp_path / "run"
    # every row kind, two hidden layers, the affinity block; the two stores alternate over the families
    store = "webdataset" if sorted(CASES).index(case) % 2 else "zarr"
    cfg = _cfg(run, family_data, teacher, student, **ALL_FIELDS, **{"cache_teacher.store": store})
    res = run_pipeline(run, cfg)

    # nothing lost on the way: all 6 records ingested, regenerated, cached
    assert _counts(run, "data") == {"in": 6, "out": 6}
    assert _counts(run, "regenerate") == {"in": 6, "out": 6}
    assert _counts(run, "cache_teacher") == {"in": 6, "out": 6}
    ev = res["eval"]
    assert ev["answers"]["questions"] == 8 and ev["answers"]["scored"] == 8  # one per assistant turn
    assert ev["teacher_cache"]["cache_samples"] == 6 and np.isfinite(ev["teacher_cache"]["kl_to_teacher"])

    # cached values = an independent teacher forward on the processor's own outputs for the rendered
    # conversation: every position (kind by the model config's image token and the answer ids found in
    # its input_ids), both hidden layers, top-k, logit statistics and the affinity block
    ad = ModelAdapter(teacher, "auto")
    model = AutoModelForImageTextToText.from_pretrained(teacher, dtype=torch.float32).eval()
    rows = {r["id"]: r for r in _regen_rows(run)}
    reader = CacheReader(run / "cache_teacher")
    seen, image_rows = 0, 0
    for entry in reader.shards:
        for s in reader.iter_shard(entry):
            row = rows[s["sample_id"]]
            image = Image.open(family_data.parent / row["image"]).convert("RGB") if row["image"] else None
            conv = ad.conversation(row["conversations"], image is not None)
            raw = _raw_inputs(case, ad.processor, conv.text, image)
            with torch.inference_mode():
                out = model(**raw, output_hidden_states=True)
            image_rows += check_all_rows(s, raw["input_ids"][0].tolist(), out, _find_answer_positions(
                raw["input_ids"][0].tolist(), conv, ad), _image_token_id(teacher), k=4)
            seen += 1
    assert seen == 6 and image_rows > 0
    # image rows stored once per image (sq.png, wide.png, tall.png; "sq" and "sq2" share one) for causal
    # families, per sample for bidirectional ones (PaliGemma, Gemma3): bytes on disk show it
    entries = list((run / "cache_teacher" / "image_rows").rglob("*.tcblob"))
    stored = sum(e["n_rows"] for e in reader.shards)
    if ad.family.causal_image_rows:
        assert len(entries) == 3 and stored == sum(len(s["kind"]) - int((s["kind"] == 0).sum()) for s in reader)
    else:
        assert entries == [] and stored == sum(len(s["kind"]) for s in reader)

    # the saved student reloads with every parameter bit-identical (vision tower included), and the
    # frozen vision tower (the default recipe) did not move while the rest did
    final = res["final"]
    a = AutoModelForImageTextToText.from_pretrained(final, dtype=torch.float32)
    sd_init = dict(AutoModelForImageTextToText.from_pretrained(student, dtype=torch.float32).named_parameters())
    vision = set(ad.family.group_params(a, "vision"))
    b = AutoModelForImageTextToText.from_pretrained(final, dtype=torch.float32)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    for n, p in a.named_parameters():
        if n in vision:
            assert torch.equal(p, sd_init[n]), f"frozen vision parameter {n} changed"
    assert any(not torch.equal(p, sd_init[n]) for n, p in a.named_parameters() if n not in vision)


ALL_FIELDS = {"cache_teacher.positions": "all", "cache_teacher.hidden_layers": "[-1,1]", "cache_teacher.affinity": "true"}


def _image_token_id(model_dir: Path) -> int:
    """The image-feature token as the checkpoint's config.json names it."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return cfg.get("image_token_id", cfg.get("image_token_index"))


def check_all_rows(s: dict, ids: list[int], out, answer_pos: list[int], image_id: int, k: int,
                   layers=(-1, 1), atol: float = 2e-2) -> int:
    """A ``positions=all`` cached sample against the model's own forward ``out`` (``output_hidden_states``)
    on ``ids``: one row per position but the last; kind answer where the next token is an answer token,
    image where ``ids[p]`` is the image token, else prompt; next tokens; hidden states of ``layers``; top-k of
    the model's own log-softmax; logit mean/std; the affinity block as cosines of the final hidden states at
    image × answer-token positions. Returns the image rows seen."""
    L = len(ids)
    ans = set(answer_pos)
    assert s["position"].tolist() == list(range(L - 1))
    assert s["kind"].tolist() == [2 if p in ans else 0 if ids[p] == image_id else 1 for p in range(L - 1)]
    assert s["token_ids"].tolist() == ids[1:]
    for layer in layers:
        name = "hidden" if layer == -1 else f"hidden@{layer}"
        np.testing.assert_allclose(s[name], out.hidden_states[layer][0, :L - 1].float().numpy(), atol=atol, rtol=1e-2)
    logits = out.logits[0, :L - 1].double()
    top = torch.log_softmax(logits, -1).topk(k, -1)
    assert (s["topk_ids"][:, 0] == top.indices[:, 0].numpy()).all()
    np.testing.assert_allclose(s["topk_logprobs"], top.values.numpy(), atol=1e-3)
    np.testing.assert_allclose(s["logit_stats"][:, 0], logits.mean(-1).numpy(), atol=1e-3)
    np.testing.assert_allclose(s["logit_stats"][:, 1], logits.std(-1).numpy(), rtol=1e-3)
    img = [p for p in range(L) if ids[p] == image_id]
    h = out.hidden_states[-1][0].double()
    if img:
        hi = h[img] / h[img].norm(dim=-1, keepdim=True)
        ha = h[[p + 1 for p in answer_pos]] / h[[p + 1 for p in answer_pos]].norm(dim=-1, keepdim=True)
        np.testing.assert_allclose(s["affinity"], (hi @ ha.T).numpy(), atol=5e-3)  # float16 storage
    else:
        assert s["affinity"].size == 0
    return int((s["kind"] == 0).sum())


def _regen_rows(run: Path) -> list[dict]:
    from llavadi.schemas.samples import iter_samples

    out = []
    for p in sorted((run / "regenerate").glob("part-*.parquet")):
        out.extend(iter_samples(p))
    return out


def _find_answer_positions(ids: list[int], conv, ad) -> list[int]:
    """Answer positions located independently: each answer's token ids (from the text-level spans)
    searched left to right in the processor's ``ids``; position = index before the token."""
    pos, start = [], 0
    for a, b in conv.spans:
        ans = conv.ids[a:b]
        for i in range(start, len(ids) - len(ans) + 1):
            if ids[i: i + len(ans)] == ans and i > 0:
                pos += list(range(i - 1, i - 1 + len(ans)))
                start = i + len(ans)
                break
        else:
            raise AssertionError(f"answer {ans} not found in the processor's ids")
    return pos


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_freeze_flag_freezes_exactly_its_group(case, family_data, tmp_path_factory):
    """One optimizer step per ``freeze_*``: the frozen group's parameters stay bit-identical, every
    other group moves (a group matching nothing is an error, not a no-op)."""
    from types import SimpleNamespace

    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from llavadi.models.adapter import ModelAdapter
    from llavadi.stages.train_student.setup import frozen_parameters

    student = built(case, "student", tmp_path_factory)
    ad = ModelAdapter(student, "auto")
    rec = RECORDS[0]
    image = Image.open(family_data.parent / rec["image"]).convert("RGB")
    enc = ad.encode(ad.conversation(rec["conversations"], True), image)
    batch = ad.collate([enc.inputs])
    for group in ("vision", "projector", "lm"):
        model = AutoModelForImageTextToText.from_pretrained(student, dtype=torch.float32)
        model.train()
        flags = {f"freeze_{g}": g == group for g in ("vision", "projector", "lm")}
        frozen = frozen_parameters(model, ad.family, SimpleNamespace(**flags))
        assert frozen, group
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.requires_grad_(n not in frozen)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        logits = model(**batch).logits[0, enc.positions]
        torch.nn.functional.cross_entropy(logits, torch.tensor(enc.answer_ids)).backward()
        opt.step()
        for n, p in model.named_parameters():
            moved = not torch.equal(p, before[n])
            if n in frozen:
                assert not moved, f"{case}: {n} is in the frozen {group} group but changed"
        for g in ("vision", "projector", "lm"):
            if g != group:
                names = ad.family.group_params(model, g)
                assert any(not torch.equal(dict(model.named_parameters())[n], before[n]) for n in names), \
                    f"{case}: no parameter of the unfrozen {g} group moved"


def test_cross_family_llava_next_teacher_to_llava15_student(family_data, tmp_path, tmp_path_factory):
    """The cache is per answer token: a LLaVA-NeXT teacher (anyres) distils into a llava-1.5 student
    sharing its tokenizer (issue #12 item 5)."""
    if not {"llava_next", "llava15"} <= set(CASES):
        pytest.fail("the llava families must be registered")
    teacher = built("llava_next", "teacher", tmp_path_factory)
    student = built("llava15", "student", tmp_path_factory)
    run = tmp_path / "run"
    cfg = _cfg(run, family_data, teacher, student, **{"teacher.prompt_format": "llava_v1",
                                                       "train_student.prompt_format": "llava_v1"})
    res = run_pipeline(run, cfg)
    scan = json.loads((run / "train_student" / "scan.json").read_text())
    assert scan["valid"] == 6 and not scan["rejected"]
    m = [json.loads(line) for line in (run / "train_student" / "metrics.jsonl").read_text().splitlines()]
    assert len(m) == 2 and all(np.isfinite(x["loss"]) for x in m)
    assert res["eval"]["teacher_cache"]["cache_samples"] == 6


@pytest.mark.vllm
@pytest.mark.parametrize("case", sorted(set(CASES) - {"llava15"}))  # llava15: test_regenerate / test_cache_teacher
def test_family_stages_on_vllm_equal_hf(case, family_data, tmp_path, tmp_path_factory):
    """regenerate and cache-teacher served by vLLM (the stage's own engines: token-id prompts; the pooling
    runner's per-token hidden states through the same head code) give the HF engines' greedy answers and
    cached values at every position kind, affinity included; a family vLLM's CPU build cannot serve is
    refused before work, with the reason."""
    import shutil

    from llavadi.models import family_of

    from conftest import cli
    from llavadi.pipeline.runner import run_stage
    from llavadi.schemas.samples import iter_samples
    from llavadi.schemas.teacher_cache import CacheReader
    from llavadi.stages import cache_teacher, ingest, regenerate

    teacher, student = built(case, "teacher", tmp_path_factory), built(case, "student", tmp_path_factory)
    hf_run, vl_run = tmp_path / "hf", tmp_path / "vllm"
    cfg = _cfg(hf_run, family_data, teacher, student, **{"cache_teacher.source": "data",
                                                          "regenerate.sampling.temperature": 0,
                                                          "cache_teacher.positions": "all",
                                                          "cache_teacher.affinity": "true"})
    why = family_of(teacher).vllm_cpu
    if why is not None:
        from llavadi.stages.regenerate import teacher_preflight

        assert why in teacher_preflight(cfg, "vllm")[0] and not teacher_preflight(cfg, "hf")
        return
    run_stage(ingest.STAGE, hf_run, cfg, progress=False)
    shutil.copytree(hf_run, vl_run)
    run_stage(regenerate.STAGE, hf_run, cfg, progress=False)
    run_stage(cache_teacher.STAGE, hf_run, cfg, progress=False)
    cli("regenerate", vl_run, "--engine", "vllm", timeout=600)
    cli("cache-teacher", vl_run, "--engine", "vllm", "cache_teacher.positions=all", "cache_teacher.affinity=true",
        timeout=600)

    def answers(run):
        return {r["id"]: [t["value"] for t in r["conversations"]]
                for p in sorted((run / "regenerate").glob("part-*.parquet")) for r in iter_samples(p)}

    assert answers(vl_run) == answers(hf_run) and len(answers(hf_run)) == 6

    def cache(run):
        rd = CacheReader(run / "cache_teacher")
        return {s["sample_id"]: s for e in rd.shards for s in rd.iter_shard(e)}

    a, b = cache(hf_run), cache(vl_run)
    assert sorted(a) == sorted(b) and len(a) == 6
    kinds = set()
    for sid in a:  # every row of every kind (image, prompt, answer), image and text-only samples
        for key in ("position", "kind", "token_ids"):
            assert (a[sid][key] == b[sid][key]).all(), key
        kinds |= set(a[sid]["kind"].tolist())
        np.testing.assert_allclose(np.asarray(b[sid]["hidden"], np.float32), np.asarray(a[sid]["hidden"], np.float32),
                                   atol=2e-2, rtol=1e-2)
        assert (a[sid]["topk_ids"][:, 0] == b[sid]["topk_ids"][:, 0]).all()
        np.testing.assert_allclose(b[sid]["topk_logprobs"][:, 0], a[sid]["topk_logprobs"][:, 0], atol=2e-3)
        np.testing.assert_allclose(b[sid]["logit_stats"], a[sid]["logit_stats"], atol=2e-3, rtol=1e-3)
        assert a[sid]["affinity"].shape == b[sid]["affinity"].shape
        np.testing.assert_allclose(b[sid]["affinity"], a[sid]["affinity"], atol=5e-3)
    assert kinds == {0, 1, 2}
