"""``llavadi train-student`` end to end on the tiny models: exact resume after SIGKILL, DDP
(torchrun, gloo) equals one process at the same global batch, the saved student loads in
transformers and vLLM, vocabulary and token-mismatch checks."""
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

TRAIN = ["train_student.batch_size=4", "train_student.micro_batch_size=2", "train_student.lr=1e-3",
         "train_student.warmup_ratio=0.1", "train_student.shuffle_buffer=8", "train_student.save_every_steps=2",
         "train_student.keep_checkpoints=10", "train_student.log_sample_ids=true"]


@pytest.fixture(scope="module")
def cached(cached_run):
    return cached_run[:2]


def fresh(cached, tmp_path, name="run"):
    run = tmp_path / name
    shutil.copytree(cached[0], run)
    return run


def metrics(run):
    rows = [json.loads(l) for l in (run / "train_student" / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "loss", "ce", "kd", "feat", "lr", "tokens")} for r in rows]


def final_weights(run):
    from safetensors.torch import load_file

    ckpts = sorted((run / "train_student" / "checkpoints").glob("step_*"))
    return load_file(ckpts[-1] / "model.safetensors"), torch.load(ckpts[-1] / "training_state.pt", weights_only=False)


@pytest.fixture(scope="module")
def reference(cached, tmp_path_factory):
    run = fresh(cached, tmp_path_factory.mktemp("ref"))
    p = cli("train-student", run, "--student", cached[1], *TRAIN)
    assert "6 steps" in p.stdout and "samples used 24, rejected 0" in p.stdout
    return run


def test_losses_are_logged_and_all_terms_present(reference):
    m = metrics(reference)
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5, 6]
    for r in m:
        assert r["ce"] > 0 and r["kd"] >= 0 and r["feat"] > 0
        assert abs(r["loss"] - (r["ce"] + r["kd"] + r["feat"])) < 1e-9
    assert m[0]["lr"] > m[-1]["lr"] == 0.0  # warmup then cosine to zero
    assert (reference / "train_student" / "tensorboard").exists()


def test_sigkill_after_step_n_then_resume_is_exact(cached, reference, tmp_path):
    run = fresh(cached, tmp_path)
    args = [sys.executable, "-m", "llavadi.cli", "train-student", str(run), "--student", str(cached[1]), *TRAIN]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    mfile = run / "train_student" / "metrics.jsonl"
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 300:
        if mfile.exists() and len(mfile.read_text().splitlines()) >= 3:  # after step 3, checkpoint at 2
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL
    p = cli("train-student", run, *TRAIN)
    assert "6 steps" in p.stdout
    assert metrics(run) == metrics(reference)
    (wa, sa), (wb, sb) = final_weights(run), final_weights(reference)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.equal(sa["projector"][k], sb["projector"][k]) for k in sa["projector"])
    ids = [json.loads(l) for l in (run / "train_student" / "sample_ids.rank0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ids] == [1, 2, 3, 4, 5, 6]


def test_torchrun_two_ranks_match_one_process(cached, reference, tmp_path):
    run = fresh(cached, tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "llavadi.cli", "train-student", str(run), "--student", str(cached[1]), *TRAIN,
           "train_student.micro_batch_size=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    a, b = metrics(run), metrics(reference)
    assert [r["step"] for r in a] == [r["step"] for r in b] and [r["tokens"] for r in a] == [r["tokens"] for r in b]
    for x, y in zip(a, b):
        for k in ("loss", "ce", "kd", "feat"):
            assert x[k] == pytest.approx(y[k], rel=2e-4, abs=1e-6), (x["step"], k)
    # ranks saw disjoint halves of every global batch; together exactly the one-process batches
    r0 = [json.loads(l) for l in (run / "train_student" / "sample_ids.rank0.jsonl").read_text().splitlines()]
    r1 = [json.loads(l) for l in (run / "train_student" / "sample_ids.rank1.jsonl").read_text().splitlines()]
    one = [json.loads(l) for l in (reference / "train_student" / "sample_ids.rank0.jsonl").read_text().splitlines()]
    seen = []
    for x, y, z in zip(r0, r1, one):
        assert not set(x["ids"]) & set(y["ids"])
        assert x["ids"] + y["ids"] == z["ids"]
        seen += x["ids"] + y["ids"]
    assert len(seen) == len(set(seen)) == 24


@pytest.mark.vllm
def test_saved_student_loads_in_transformers_and_vllm(reference, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    ckpt = sorted((reference / "train_student" / "checkpoints").glob("step_*"))[-1]
    proc = AutoProcessor.from_pretrained(ckpt)
    model = LlavaForConditionalGeneration.from_pretrained(ckpt).eval()
    prompt = proc.tokenizer.apply_chat_template([{"role": "user", "content": "What is one plus two?"}],
                                                tokenize=False, add_generation_prompt=True)
    inp = proc(text=[prompt], return_tensors="pt")
    with torch.no_grad():
        hf = model.generate(**inp, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, inp["input_ids"].shape[1]:].tolist()
    pf = tmp_path / "p.json"
    pf.write_text(json.dumps([{"prompt": prompt}]))
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_greedy_script.py")), str(ckpt), str(pf), "6"],
                       capture_output=True, text=True, timeout=600)
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    assert json.loads(line[0][7:]) == [hf]


def test_vocabulary_mismatch_is_refused_before_training(cached, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(cached[1], other)
    tj = json.loads((other / "tokenizer.json").read_text())
    tj["added_tokens"].append({**tj["added_tokens"][-1], "id": 32002, "content": "<extra>"})
    (other / "tokenizer.json").write_text(json.dumps(tj))
    run = fresh(cached, tmp_path)
    p = cli("train-student", run, "--student", other, *TRAIN, check=False)
    assert p.returncode == 2 and "vocabulary" in p.stderr and "differs from the teacher" in p.stderr
    assert not (run / "train_student" / "checkpoints").exists()


def test_token_mismatch_samples_are_rejected_and_counted(cached, tmp_path):
    """A student whose chat template upper-cases answers containing 'o' tokenises those answers
    differently from the teacher cache: they are rejected with a reason; the rest train."""
    odd = tmp_path / "odd"
    shutil.copytree(cached[1], odd)
    tpl = (odd / "chat_template.jinja").read_text()
    assert "m['content'] + eos_token" in tpl
    tpl = tpl.replace("m['content'] + eos_token", "(m['content'] | upper if 'o' in m['content'] else m['content']) + eos_token")
    (odd / "chat_template.jinja").write_text(tpl)
    tc = json.loads((odd / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (odd / "tokenizer_config.json").write_text(json.dumps(tc))
    run = fresh(cached, tmp_path)
    p = cli("train-student", run, "--student", odd, *TRAIN, "train_student.max_steps=1")
    rej = [json.loads(l) for l in (run / "train_student" / "rejects.jsonl").read_text().splitlines()]
    assert rej and {r["reason"] for r in rej} == {"token_mismatch"}
    assert f"rejected {len(rej)}" in p.stdout and f"samples used {24 - len(rej)}" in p.stdout
    scan = json.loads((run / "train_student" / "scan.json").read_text())
    assert scan["rejected"] == {"token_mismatch": len(rej)}
