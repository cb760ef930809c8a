"""``train_student.lora`` (issue #15 item 3): what trains, exact resume, merged = adapter output, the merged
student loads in transformers and vLLM, and the family defaults adapt the language model only.

Expected values come from outside llavadi's LoRA code: the initial student's own weights, the merge formula
W + (alpha / r)·B·A (Hu et al. 2021 §4.1) applied by hand to the saved adapter file, PEFT's own loader
(``PeftModel.from_pretrained``), and module names listed straight from the tiny models."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import cli

LORA = ["train_student.lora.enabled=true", "train_student.lora.rank=4", "train_student.lora.alpha=8",
        "train_student.lora.dropout=0.1"]  # dropout > 0: resume must restore the RNG its masks come from
TRAIN = ["train_student.batch_size=4", "train_student.micro_batch_size=2", "train_student.lr=1e-3",
         "train_student.warmup_ratio=0.1", "train_student.shuffle_buffer=8", "train_student.save_every_steps=2",
         "train_student.keep_checkpoints=10", *LORA]
LM_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def cached(cached_run):
    return cached_run[:2]


def fresh(cached, tmp_path, name="run"):
    run = tmp_path / name
    shutil.copytree(cached[0], run)
    return run


def ckpts(run):
    return sorted((run / "train_student" / "checkpoints").glob("step_*"))


def metrics(run):
    rows = [json.loads(l) for l in (run / "train_student" / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "loss", "ce", "kd", "feat", "lr", "tokens")} for r in rows]


@pytest.fixture(scope="module")
def reference(cached, tmp_path_factory):
    run = fresh(cached, tmp_path_factory.mktemp("lora_ref"))
    p = cli("train-student", run, "--student", cached[1], *TRAIN)
    assert "6 steps" in p.stdout
    return run


def load_model(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def peft_student(student_dir, ckpt):
    """The trained student as PEFT loads it: base student + the checkpoint's adapter (PEFT's own loader) +
    the parameters trained in full."""
    from peft import PeftModel
    from safetensors.torch import load_file

    pm = PeftModel.from_pretrained(load_model(student_dir), ckpt / "adapter").eval()
    params = dict(pm.base_model.model.named_parameters())
    with torch.no_grad():
        for n, v in load_file(ckpt / "adapter" / "trained_base_params.safetensors").items():
            params[n].copy_(v)
    return pm


def test_checkpoint_layout(reference):
    steps = ckpts(reference)
    assert [p.name for p in steps] == ["step_000002", "step_000004", "step_000006"]
    for p in steps:
        assert {"adapter_config.json", "adapter_model.safetensors", "trained_base_params.safetensors"} <= \
               {f.name for f in (p / "adapter").iterdir()}
        assert (p / "training_state.pt").exists() and (p / "trainer_state.json").exists()
        assert (p / "model.safetensors").exists() == (p == steps[-1])  # only the final step holds a full (merged) model
    cfg = json.loads((steps[-1] / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["lora_dropout"] == 0.1
    # vLLM loads every top-level *.safetensors of a model directory: nothing but the model's own
    assert sorted(f.name for f in steps[-1].glob("*.safetensors")) == ["model.safetensors"]
    m = metrics(reference)
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5, 6] and all(r["ce"] > 0 and r["feat"] > 0 for r in m)


def test_only_adapters_and_projector_change(cached, reference):
    """Every parameter of the merged final student equals the initial student's bit for bit, except the
    multimodal projector (trained in full) and the adapted LM layers, whose merged weight equals
    W0 + (alpha/r)·B·A computed here from the adapter file (so W0 itself never moved)."""
    from safetensors.torch import load_file

    init = dict(load_model(cached[1]).named_parameters())
    final = ckpts(reference)[-1]
    merged = dict(load_model(final).named_parameters())
    ad = load_file(final / "adapter" / "adapter_model.safetensors")
    acfg = json.loads((final / "adapter" / "adapter_config.json").read_text())
    scale = acfg["lora_alpha"] / acfg["r"]
    full = load_file(final / "adapter" / "trained_base_params.safetensors")
    assert set(full) == {n for n in init if n.startswith("model.multi_modal_projector.")}
    assert merged.keys() == init.keys()
    adapted, moved = 0, 0
    for n, w0 in init.items():
        w = merged[n].detach()
        mod = n[: -len(".weight")]
        a_key = f"base_model.model.{mod}.lora_A.weight"
        if n in full:
            assert torch.equal(w, full[n])
            moved += not torch.equal(w, w0)
        elif a_key in ad:
            assert mod.startswith("model.language_model.layers.") and mod.rsplit(".", 1)[1] in LM_LEAVES
            B, A = ad[f"base_model.model.{mod}.lora_B.weight"].double(), ad[a_key].double()
            assert B.abs().max() > 0  # the adapter trained (B starts at zero)
            expect = w0.double() + scale * (B @ A)
            # float32 rounding of one addition (|W| < 1): ~6e-8; an update of W0 itself (lr 1e-3) would be ~1e-3
            assert (w.double() - expect).abs().max() < 1e-6, n
            adapted += 1
        else:
            assert torch.equal(w, w0), n  # vision tower, embeddings, norms, LM head: untouched
    assert adapted == 2 * 7 and moved == len(full)  # 2 layers × 7 projections; every projector tensor trained


def test_requires_grad_follows_freeze_flags(cached):
    """In-process: after ``wrap`` exactly the LoRA parameters and the non-frozen non-LM groups need grad
    (freeze_vision=false: the vision tower too; freeze_projector=true: no projector)."""
    from llavadi.models import family_of
    from llavadi.pipeline.config import load_config
    from llavadi.stages.train_student import lora
    from llavadi.stages.train_student.setup import frozen_parameters

    fam = family_of(cached[1])
    for extra, full_prefixes in ((["train_student.freeze_projector=true", "train_student.freeze_vision=false"],
                                  ("model.vision_tower.",)),
                                 ([], ("model.multi_modal_projector.",))):
        c = load_config({}, [*LORA, *extra]).train_student
        m = load_model(cached[1])
        frozen = frozen_parameters(m, fam, c)
        for n, p in m.named_parameters():
            p.requires_grad_(n not in frozen)
        lora.wrap(m, fam, c, frozen)
        grad = {n for n, p in m.named_parameters() if p.requires_grad}
        expect = {n for n, _ in m.named_parameters() if ".lora_A.default." in n or ".lora_B.default." in n}
        expect |= {n for n, _ in m.named_parameters() if n.startswith(full_prefixes)}
        assert grad == expect and len(expect) > 28


def test_sigkill_then_resume_is_exact(cached, reference, tmp_path):
    from safetensors.torch import load_file

    run = fresh(cached, tmp_path)
    args = [sys.executable, "-m", "llavadi.cli", "train-student", str(run), "--student", str(cached[1]), *TRAIN]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    mfile = run / "train_student" / "metrics.jsonl"
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 300:
        if mfile.exists() and len(mfile.read_text().splitlines()) >= 3:  # after step 3: resumes from step 2's adapter
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL
    assert not (ckpts(run)[-1] / "model.safetensors").exists()  # killed before the end: no merged model yet
    p = cli("train-student", run, *TRAIN)
    assert "6 steps" in p.stdout
    assert metrics(run) == metrics(reference)  # losses of every step, bit for bit
    a, b = ckpts(run)[-1], ckpts(reference)[-1]
    for f in ("adapter/adapter_model.safetensors", "adapter/trained_base_params.safetensors", "model.safetensors"):
        x, y = load_file(a / f), load_file(b / f)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f
    sa, sb = (torch.load(d / "training_state.pt", weights_only=False) for d in (a, b))
    assert all(torch.equal(sa["projector"][k], sb["projector"][k]) for k in sa["projector"])


def test_merged_output_equals_adapter_output(cached, reference):
    """Logits of the merged saved student = logits of base + adapter (PEFT's loader) + trained projector on the
    same image prompt, within 1e-5 (float32: merging reorders one sum per weight); and both differ from the
    untrained student's (the test can tell them apart)."""
    from PIL import Image
    from transformers import AutoProcessor

    final = ckpts(reference)[-1]
    proc = AutoProcessor.from_pretrained(final)
    prompt = proc.tokenizer.apply_chat_template([{"role": "user", "content": "<image>\nWhat is in the picture?"}],
                                                tokenize=False, add_generation_prompt=True)
    img = Image.new("RGB", (40, 28), (200, 30, 90))
    inp = proc(text=[prompt], images=[img], return_tensors="pt")
    with torch.no_grad():
        merged = load_model(final)(**inp).logits
        adapter = peft_student(cached[1], final)(**inp).logits
        base = load_model(cached[1])(**inp).logits
    assert merged.shape == adapter.shape and merged.shape[1] == inp["input_ids"].shape[1]
    assert (merged - adapter).abs().max() < 1e-5
    assert (merged - base).abs().max() > 1e-3


@pytest.mark.vllm
def test_merged_student_loads_in_vllm(reference, tmp_path):
    from transformers import AutoProcessor

    final = ckpts(reference)[-1]
    proc = AutoProcessor.from_pretrained(final)
    model = load_model(final)
    prompt = proc.tokenizer.apply_chat_template([{"role": "user", "content": "What is one plus two?"}],
                                                tokenize=False, add_generation_prompt=True)
    inp = proc(text=[prompt], return_tensors="pt")
    with torch.no_grad():
        hf = model.generate(**inp, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, inp["input_ids"].shape[1]:].tolist()
    pf = tmp_path / "p.json"
    pf.write_text(json.dumps([{"prompt": prompt}]))
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_greedy_script.py")), str(final), str(pf), "6"],
                       capture_output=True, text=True, timeout=600)
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    assert json.loads(line[0][7:]) == [hf]


# (family case, the LM's layer prefix, the vision tower's prefix, the projector's prefix) — read off the tiny models
FAMILY_CASES = [
    ("llava15", "model.language_model.layers.", "model.vision_tower.", "model.multi_modal_projector."),
    ("qwen2_5_vl", "model.language_model.layers.", "model.visual.", "model.visual.merger."),
    ("idefics3", "model.text_model.layers.", "model.vision_model.", "model.connector."),
    ("mistral3", "model.language_model.layers.", "model.vision_tower.", "model.multi_modal_projector."),
]


@pytest.mark.parametrize("case,lm_prefix,vision_prefix,proj_prefix", FAMILY_CASES, ids=[c[0] for c in FAMILY_CASES])
def test_family_default_targets_the_language_model_only(case, lm_prefix, vision_prefix, proj_prefix, tmp_path):
    """The family default adapts every attention/MLP projection of the LM and nothing of the vision tower, even
    where the tower has layers of the same names (Pixtral's q_proj … down_proj, Qwen2.5-VL's gate/up/down_proj,
    SigLIP's q/k/v_proj); the projector trains in full, the tower stays frozen (freeze_vision default)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from families import all_cases

    from llavadi.models import family_of
    from llavadi.pipeline.config import load_config
    from llavadi.stages.train_student import lora
    from llavadi.stages.train_student.setup import frozen_parameters

    path = all_cases()[case](tmp_path / case, "student")
    fam = family_of(path)
    m = load_model(path)
    linear = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
    expect = sorted(n for n in linear if n.startswith(lm_prefix) and n.rsplit(".", 1)[1] in LM_LEAVES)
    assert len(expect) == 7 * m.config.get_text_config().num_hidden_layers
    same_named_in_vision = [n for n in linear if n.startswith(vision_prefix) and n.rsplit(".", 1)[1] in LM_LEAVES]
    c = load_config({}, LORA).train_student
    frozen = frozen_parameters(m, fam, c)
    for n, p in m.named_parameters():
        p.requires_grad_(n not in frozen)
    lora.wrap(m, fam, c, frozen)
    wrapped = sorted(n for n, mod in m.named_modules() if hasattr(mod, "lora_A") and hasattr(mod, "base_layer"))
    assert wrapped == expect
    assert not any(n.startswith(vision_prefix) for n in wrapped)
    if case in ("mistral3", "qwen2_5_vl", "idefics3"):
        assert same_named_in_vision  # the restriction mattered: a plain name list would have adapted these
    grad = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {n for n in grad if ".lora_" not in n} == {n for n, _ in m.named_parameters() if n.startswith(proj_prefix)}


def test_config_and_target_problems(cached):
    from llavadi.models import family_of
    from llavadi.pipeline.config import ConfigError, load_config
    from llavadi.stages.train_student import lora
    from llavadi.stages.train_student.setup import material

    with pytest.raises(ConfigError) as e:
        load_config({}, ["train_student.lora.rank=0", "train_student.lora.alpha=0", "train_student.lora.dropout=1",
                         "train_student.lora.target_modules=[layers.0.q_proj]"])
    msg = str(e.value)
    assert all(k in msg for k in ("lora.rank", "lora.alpha", "lora.dropout", "lora.target_modules"))
    from transformers import AutoConfig, AutoModelForImageTextToText

    c = load_config({}, [*LORA, "train_student.lora.target_modules=[q_proj, qproj]"]).train_student
    with torch.device("meta"):  # as the preflight checks it: no weights loaded
        m = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(cached[1]))
    p = lora.problems(m, family_of(cached[1]), c)
    assert len(p) == 1 and "['qproj']" in p[0] and "q_proj" in p[0] and "down_proj" in p[0]
    # LoRA off leaves the stage material as it was before the lora keys existed (old runs keep their fingerprint)
    assert "lora" not in material(load_config({}, []))["train_student"]
    assert material(load_config({}, LORA))["train_student"]["lora"]["rank"] == 4


# --------------------------------------------------------------------------- issue #22 class 6: lm_head / embed_tokens


class _Holder(torch.nn.Module):
    def __init__(self, v=50, hs=8, bias=True):
        super().__init__()
        self.lm_head = torch.nn.Linear(hs, v, bias=bias, dtype=torch.float64)


def _wrapped_head(r, dropout, seed=0, bias=True, **kw):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    holder = _Holder(bias=bias)
    get_peft_model(holder, LoraConfig(r=r, lora_alpha=3.0, lora_dropout=dropout, target_modules=["lm_head"], **kw))
    head = holder.lm_head
    with torch.no_grad():  # B starts at 0 (PEFT): give it a value so the adapter's share is visible
        head.lora_B["default"].weight.normal_()
    return head.double()


@pytest.mark.parametrize("r,dropout,bias", [(2, 0.0, True), (4, 0.0, False), (4, 0.3, True)])
def test_head_operands_are_the_wrapped_heads_own_forward(r, dropout, bias):
    """The fused head loss on ``head.operands`` = CE + top-k KD on the logits of the LoRA head's own forward
    (PEFT's), in value and in the gradients of h, lora_A and lora_B (float64); the same dropout mask is drawn."""
    import torch.nn.functional as F

    from llavadi.stages.train_student import head as head_mod
    from llavadi.stages.train_student.losses import fused_head_loss, topk_kd_loss

    head = _wrapped_head(r, dropout, bias=bias).train()
    g = torch.Generator().manual_seed(1)
    n, v = 7, 50
    h = torch.randn(n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    tg = torch.randint(0, v, (n,), generator=g)
    lp, ids = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 3, -1).topk(5, -1)
    a, b = head.lora_A["default"].weight, head.lora_B["default"].weight
    torch.manual_seed(5)
    x, w, bb = head_mod.operands(head, h)
    assert x.shape == (n, 8 + r) and w.shape == (v, 8 + r)
    tot, _, _ = fused_head_loss(x, w, bb, targets=tg, topk_ids=ids, topk_logprobs=lp, block_rows=3)
    got = torch.autograd.grad(tot, (h, a, b))
    torch.manual_seed(5)
    z = head(h)  # PEFT's forward: W h + b + s·B A dropout(h)
    ref = F.cross_entropy(z, tg, reduction="sum") + topk_kd_loss(z, ids, lp, reduction="sum")
    want = torch.autograd.grad(ref, (h, a, b))
    assert float(tot.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    assert all(torch.allclose(p, q, rtol=1e-10, atol=1e-12) for p, q in zip(got, want))
    assert got[2].abs().max() > 1e-3  # lora_B gets a gradient (it got exactly none when the loss read head.weight)
    head.enable_adapters(False)  # PEFT BaseTunerLayer: the base layer alone
    x, w, bb = head_mod.operands(head, h)
    assert x is h and w is head.base_layer.weight


def test_head_problems_refuse_what_the_fused_loss_cannot_read():
    from llavadi.stages.train_student import head as head_mod

    assert head_mod.problems(torch.nn.Linear(4, 6)) == []
    assert head_mod.problems(_wrapped_head(2, 0.0)) == []
    dora = _wrapped_head(2, 0.0, use_dora=True)
    assert len(head_mod.problems(dora)) == 1 and "use_dora" in head_mod.problems(dora)[0]
    odd = torch.nn.Sequential(torch.nn.Linear(4, 6))
    assert "Sequential" in head_mod.problems(odd)[0]
    with pytest.raises(head_mod.HeadError, match="use_dora"):
        head_mod.operands(dora, torch.zeros(1, 8, dtype=torch.float64))


def test_a_sharded_head_weight_is_refused_not_read(tmp_path):
    """Under FSDP2 the loss runs inside the root unit's forward, where the head's weight is all-gathered (the
    FSDP = one-process equality of tests/test_train_fsdp.py covers that); a head read outside it holds a
    sharded DTensor, which ``operands`` refuses instead of treating a shard as the head. One gloo rank."""
    script = tmp_path / "dt.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from torch.distributed.device_mesh import init_device_mesh\n"
        "from torch.distributed.tensor import Shard, distribute_tensor\n"
        "from llavadi.stages.train_student import head\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path}/store', rank=0, world_size=1)\n"
        "lin = torch.nn.Linear(4, 6)\n"
        "lin.weight = torch.nn.Parameter(distribute_tensor(lin.weight.data, init_device_mesh('cpu', (1,)), [Shard(0)]))\n"
        "try:\n    head.operands(lin, torch.zeros(2, 4))\nexcept head.HeadError as e:\n    print('REFUSED', e)\n"
        "dist.destroy_process_group()\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert "REFUSED" in r.stdout and "DTensor" in r.stdout, r.stderr[-2000:]


def test_tied_embeddings_with_an_lm_head_or_embedding_target_are_refused(cached):
    from transformers import AutoConfig, AutoModelForImageTextToText

    from llavadi.models import family_of
    from llavadi.pipeline.config import load_config
    from llavadi.stages.train_student import lora

    conf = AutoConfig.from_pretrained(cached[1])
    conf.tie_word_embeddings = conf.text_config.tie_word_embeddings = True
    for targets, refused in (("[q_proj, lm_head]", True), ("[embed_tokens]", True), ("[q_proj]", False)):
        with torch.device("meta"):
            m = AutoModelForImageTextToText.from_config(conf)
        assert m.get_output_embeddings().weight is m.get_input_embeddings().weight
        c = load_config({}, [*LORA, f"train_student.lora.target_modules={targets}"]).train_student
        p = lora.problems(m, family_of(cached[1]), c)
        assert bool(p) == refused and (not p or "tied" in p[0])


def test_lora_on_lm_head_and_embed_tokens_trains_them(cached, tmp_path):
    """``target_modules=[q_proj, lm_head, embed_tokens]``: the head's lora_B moves off zero, the merged head is
    W0 + (alpha/r)·B·A and the merged embedding E0 + (alpha/r)·(B·A)ᵀ, both computed here from the adapter file,
    and neither equals the initial one; the adapter file holds the adapters only (no base embedding/head matrix)."""
    from safetensors.torch import load_file

    run = fresh(cached, tmp_path)
    p = cli("train-student", run, "--student", cached[1], *TRAIN, "train_student.max_steps=3",
            "train_student.lora.target_modules=[q_proj, lm_head, embed_tokens]")
    assert "3 steps" in p.stdout
    final = ckpts(run)[-1]
    ad = load_file(final / "adapter" / "adapter_model.safetensors")
    assert all(".lora_" in k for k in ad), sorted(ad)[:6]  # no base_layer / full embedding weights
    assert (final / "adapter" / "adapter_model.safetensors").stat().st_size < 4 << 20  # embeddings alone: 16 MiB
    scale = 8 / 4
    init = dict(load_model(cached[1]).named_parameters())
    merged = dict(load_model(final).named_parameters())
    B, A = ad["base_model.model.lm_head.lora_B.weight"].double(), ad["base_model.model.lm_head.lora_A.weight"].double()
    assert B.abs().max() > 0
    w0, w = init["lm_head.weight"].detach().double(), merged["lm_head.weight"].detach().double()
    assert (w - (w0 + scale * B @ A)).abs().max() < 1e-6 and (w - w0).abs().max() > 1e-4
    emb = "model.language_model.embed_tokens"
    Be, Ae = ad[f"base_model.model.{emb}.lora_embedding_B"].double(), ad[f"base_model.model.{emb}.lora_embedding_A"].double()
    e0, e = init[f"{emb}.weight"].detach().double(), merged[f"{emb}.weight"].detach().double()
    assert (e - (e0 + scale * (Be @ Ae).T)).abs().max() < 1e-6 and (e - e0).abs().max() > 1e-4
