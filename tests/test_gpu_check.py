"""``benchmarks/gpu_check.sh`` (issue #15 item 5) cannot run here (no GPU); these keep it from rotting:
it parses and plans, ``--smoke`` runs every step on CPU with tiny models and writes every figure
(the same Python steps and benchmark functions the GPU run uses, at tiny sizes), and a step cut off
by its timeout leaves the figures measured before it, a note naming the cut, and no process behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def gpu_check(*args, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    own = ("OUT", "PYTHON", "BUDGET_S", "WHEELS", "GPU_CHECK_WORK", "GPU_CHECK_CAPS")  # the script's settings
    e = {**{k: v for k, v in os.environ.items() if k not in own}, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=e, timeout=timeout)


def test_script_parses_and_prints_its_plan():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    p = gpu_check("--dry-run")
    assert p.returncode == 0, p.stderr
    assert "mode=gpu budget=470s" in p.stdout  # ≤ 8 minutes, install included
    for step in ("install", "env", "setup", "regen", "cache", "train", "engines"):
        assert f"  {step}:" in p.stdout
    assert gpu_check("--bogus").returncode == 2
    one = gpu_check("--dry-run", env={"GPU_CHECK_STEPS": "env setup engines"})  # one figure's steps only
    assert one.returncode == 0 and "  engines:" in one.stdout and "  train:" not in one.stdout
    assert gpu_check("--dry-run", env={"GPU_CHECK_STEPS": "setup bogus"}).returncode == 2


def _leftovers(marker: str) -> list[str]:
    import psutil

    out = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or []):
                out.append(" ".join(proc.info["cmdline"]))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


@pytest.mark.slow
@pytest.mark.vllm
def test_smoke_runs_every_step_and_writes_every_figure(tmp_path):
    from llavadi.pipeline.config import TrainStudentConfig

    out = tmp_path / "out"
    p = gpu_check("--smoke", env={"OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "w")})
    d = json.loads((out / "gpu_check.json").read_text())
    assert p.returncode == 0, (d.get("notes"), p.stderr[-3000:])
    assert json.loads(p.stdout.strip().splitlines()[-1]) == d  # the JSON is also stdout's last line
    has_fsdp = "parallel" in TrainStudentConfig.__dataclass_fields__
    assert d["mode"] == "smoke" and d["env"]["gpus"] == 0 and d["env"]["torch"]
    assert set(d["step_seconds"]) == {"env", "setup", "regen", "cache", "train", "engines"}
    assert d["setup"]["teacher"]["params_m"] > d["setup"]["student"]["params_m"] > 0
    c = d["cache_teacher"]
    # positions=answer (the default): one row per answer token
    assert c["ratio"] > 0 and c["bare_forward_s"] > 0
    assert c["cached_rows"] == c["cached_answer_tokens"] == c["answer_tokens"] > 0
    e = d["cache_teacher_engines"]  # the stage with engine=vllm vs engine=hf, on the same shards
    assert e["engine_vllm_speedup_over_hf"] > 0 and e["new_hf_stage_s"] > 0 and e["new_vllm_stage_s"] > 0
    assert e["new_vllm"]["forcer"] == "VLLMTeacherForcer" and e["new_hf"]["forcer"] == "HFTeacherForcer"
    assert e["new_vllm"]["rows"] == e["new_hf"]["rows"] == c["answer_tokens"]
    r = d["regenerate"]
    assert r["ratio_vllm_over_hf_best"] > 0 and r["total_generated_tokens"] == 8 * 4 and r["dtype"] == "float32"
    t = d["train_student"]
    assert t["ddp_ce_only_loss_terms"] == ["ce"]  # each arm computed what its name says
    assert t["ddp_full_kd_topk_loss_terms"] == ["ce", "feat", "kd"]
    assert t["ddp_steps_per_s"] > 0 and t["full_kd_topk_over_ce_only"] > 0
    if has_fsdp:
        assert t["fsdp_full_kd_topk_loss_terms"] == ["ce", "feat", "kd"] and t["fsdp_steps_per_s"] > 0
        assert not d.get("notes")
    else:
        assert "fsdp_steps_per_s" not in t and d["notes"] == [
            "FSDP not measured: this checkout's train-student config has no 'parallel' field yet (issue #15 item 1)"]
    assert not _leftovers(str(tmp_path / "w"))


@pytest.mark.slow
def test_a_step_cut_off_by_its_timeout_leaves_the_figures_before_it(tmp_path):
    out = tmp_path / "out"
    p = gpu_check("--smoke", env={"OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "w"),
                                  "GPU_CHECK_CAPS": "regen=4 cache=3 engines=3"})
    d = json.loads((out / "gpu_check.json").read_text())
    assert p.returncode == 0, p.stderr[-3000:]
    assert d["setup"]["teacher"]["params_m"] > 0 and d["env"]["torch"]  # measured before the cut: kept
    assert "regenerate" not in d and "train_student" not in d
    assert "regen: cut off by its 4 s timeout (figures measured before it are kept; see regen.log)" in d["notes"]
    assert any(n.startswith("cache: cut off by its 3 s timeout") for n in d["notes"])
    assert "train: not run (it trains from the cache the cache step writes)" in d["notes"]
    assert any(n.startswith("engines: cut off by its 3 s timeout") for n in d["notes"])  # its workers too
    assert (out / "regen.log").exists() and (out / "setup.log").exists()
    assert not _leftovers(str(tmp_path / "w"))  # timeout killed the step's whole process group
