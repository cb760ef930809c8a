"""``llavadi demo``: the whole pipeline on tiny local models and a synthetic visual-QA task,
with the study's ablations in miniature. Fully offline; reruns reuse finished stages.

Layout under ``--run-dir`` (default ``demo/``)::

    models/{teacher_init,student_init}/      tiny LLaVAs built from configs
    synthetic/{teacher_train,labelled,unlabelled,test}.json + images/
    runs/teacher_sft/      ingest → cache (targets only) → train-student with KD off = teacher SFT
    runs/heldout/          ingest test → cache-teacher (trained teacher): KL / perplexity reference
    runs/original/         ingest labelled → cache-teacher (source=data)
    runs/regenerated/      ingest labelled+unlabelled → regenerate (vLLM) → cache-teacher
    runs/arm-<arm>-s<seed>/  train-student per arm (links to the shared data/cache)
    report.md, report.png, results.json

Arms (LLAVADI study, Table 2/3 in miniature): ``ce`` (CE only), ``ce+kd`` (+ logit KD),
``ce+feat`` (+ feature loss), ``llavadi`` (CE + KD + feature), ``llavadi+regen`` (LLAVADI on
teacher-regenerated data, the teacher also answering images the student never saw labelled).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ...pipeline.runner import StageError, run_stage
from ...pipeline.session import resolve


@dataclass(frozen=True)
class DemoProfile:
    teacher_train: int
    labelled: int
    unlabelled: int
    test: int
    teacher_steps: int
    teacher_batch: int
    student_steps: int
    student_batch: int
    seeds: tuple = (0,)
    teacher_lr: float = 3e-3
    student_lr: float = 2e-3
    eval_questions: int = 0  # 0 = all test questions


PROFILES = {
    # make demo: ≤ 20 min on 2 cores (measured 19m01s idle: teacher SFT 491 s, teacher passes 80 s,
    # 10 student runs ~40 s each; 400 student steps took 20m53s)
    "default": DemoProfile(teacher_train=6000, labelled=500, unlabelled=2000, test=400, teacher_steps=900,
                           teacher_batch=64, student_steps=300, student_batch=32, seeds=(0, 1)),
    # llavadi demo --quick: ≤ 5 min
    "quick": DemoProfile(teacher_train=1500, labelled=300, unlabelled=500, test=150, teacher_steps=250,
                         teacher_batch=48, student_steps=120, student_batch=24, seeds=(0,)),
    # the test suite's end-to-end run
    "smoke": DemoProfile(teacher_train=48, labelled=24, unlabelled=16, test=12, teacher_steps=3, teacher_batch=8,
                         student_steps=2, student_batch=8, seeds=(0,)),
}
ARMS = {
    "ce": dict(ce_weight=1.0, kd_weight=0.0, feature_weight=0.0),
    "ce+kd": dict(ce_weight=1.0, kd_weight=1.0, feature_weight=0.0),
    "ce+feat": dict(ce_weight=1.0, kd_weight=0.0, feature_weight=1.0),
    "llavadi": dict(ce_weight=1.0, kd_weight=1.0, feature_weight=1.0),
    "llavadi+regen": dict(ce_weight=1.0, kd_weight=1.0, feature_weight=1.0),
}


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _stage(stage, run: Path, overrides: list[str]) -> None:
    cfg = resolve(run, None, [], overrides)
    rep = run_stage(stage, run, cfg, progress=True)
    _say(f"{stage.name} {run.name}: {rep.shards_total} shards ({rep.shards_run} run, {rep.shards_skipped} reused)")


def _link_run(src: Path, dst: Path, cfg_overrides: list[str]) -> None:
    """A run dir that shares ``src``'s data and cache (symlinks) but trains its own student."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("data", "regenerate", "cache_teacher"):
        if (src / name).exists() and not (dst / name).exists():
            os.symlink((src / name).resolve(), dst / name)
    if not (dst / "config.yaml").exists():
        (dst / "config.yaml").write_text((src / "config.yaml").read_text())


def _train(run: Path, student: Path, overrides: list[str]) -> Path:
    from ..train_student.loop import train

    cfg = resolve(run, None, [f"train_student.student={json.dumps(str(student))}"], overrides)
    res = train(run, cfg, progress=True)
    return Path(res["final_checkpoint"])


def run_demo(root: Path | str, *, quick: bool = False, executor: str = "ray", profile: str | None = None) -> dict:
    from ...pipeline.executors import init_ray
    from ..cache_teacher import STAGE as CACHE
    from ..ingest import STAGE as INGEST
    from ..regenerate import STAGE as REGEN
    from . import synthetic_vqa, tiny_models
    from .report import write_report

    prof = PROFILES[profile or ("quick" if quick else "default")]
    root = Path(root).resolve()
    t_start = time.time()
    timings: dict[str, float] = {}
    if executor == "ray":
        from ...pipeline.config import RunConfig

        init_ray(RunConfig())  # one embedded cluster for every stage of the demo

    # 1. models and data --------------------------------------------------------------------
    models = root / "models"
    for name, spec in (("teacher_init", tiny_models.DEMO_TEACHER), ("student_init", tiny_models.DEMO_STUDENT)):
        if not (models / name / "config.json").exists():
            _say(f"building {name} ({spec})")
            tiny_models.build_tiny_llava(models / name, spec, system=tiny_models.DEMO_SYSTEM)
    data = root / "synthetic"
    splits = {"teacher_train": (prof.teacher_train, True), "labelled": (prof.labelled, True),
              "unlabelled": (prof.unlabelled, False), "test": (prof.test, True)}
    for split, (n, answers) in splits.items():
        if not (data / f"{split}.json").exists():
            _say(f"generating {n} {split} conversations")
            synthetic_vqa.generate(data, n, seed=0, split=split, with_answers=answers)
    base = [f"run.executor={executor}", f"ingest.image_root={json.dumps(str(data))}", "ingest.shard_size=500",
            "teacher.max_model_len=512", "cache_teacher.batch_size=16"]
    runs = root / "runs"

    # 2. teacher SFT: the student stage with KD off ------------------------------------------
    t = time.time()
    sft = runs / "teacher_sft"
    _stage(INGEST, sft, base + [f"ingest.inputs={json.dumps([str(data / 'teacher_train.json')])}"])
    init_t = str(models / "teacher_init")
    # targets only: the cache supplies the answer token ids (top-1, int8) — its values are unused
    _stage(CACHE, sft, [f"teacher.model={json.dumps(init_t)}", "cache_teacher.source=data", "cache_teacher.top_k=1",
                        "cache_teacher.hidden_dtype=int8"])
    teacher = _train(sft, models / "teacher_init", [
        "train_student.kd_weight=0", "train_student.feature_weight=0", f"train_student.lr={prof.teacher_lr}",
        f"train_student.batch_size={prof.teacher_batch}", f"train_student.micro_batch_size={prof.teacher_batch}",
        f"train_student.max_steps={prof.teacher_steps}", "train_student.freeze_vision=false",
        "train_student.save_every_steps=100000", "train_student.epochs=100", "train_student.shuffle_buffer=2000"])
    timings["teacher_sft"] = time.time() - t
    teacher_cfg = [f"teacher.model={json.dumps(str(teacher))}"]

    # 3. teacher caches: held-out, original labelled, regenerated labelled+unlabelled ---------
    t = time.time()
    held = runs / "heldout"
    _stage(INGEST, held, base + [f"ingest.inputs={json.dumps([str(data / 'test.json')])}"])
    _stage(CACHE, held, teacher_cfg + ["cache_teacher.source=data", "cache_teacher.top_k=32"])
    orig = runs / "original"
    _stage(INGEST, orig, base + [f"ingest.inputs={json.dumps([str(data / 'labelled.json')])}"])
    _stage(CACHE, orig, teacher_cfg + ["cache_teacher.source=data", "cache_teacher.top_k=32"])
    regen = runs / "regenerated"
    _stage(INGEST, regen, base + [f"ingest.inputs={json.dumps([str(data / 'labelled.json'), str(data / 'unlabelled.json')])}"])
    _stage(REGEN, regen, teacher_cfg + ["regenerate.sampling.temperature=0", "regenerate.sampling.max_new_tokens=8",
                                        "regenerate.sampling.min_new_tokens=1",
                                        "regenerate.block_size=512"])
    _stage(CACHE, regen, teacher_cfg + ["cache_teacher.source=regenerate", "cache_teacher.top_k=32"])
    timings["teacher_passes"] = time.time() - t

    # 4. students, one per arm and seed --------------------------------------------------------
    results = []
    ev_base = [f"eval.data={json.dumps(str(data / 'test.json'))}", f"eval.cache={json.dumps(str(held / 'cache_teacher'))}",
               f"eval.image_root={json.dumps(str(data))}", "eval.max_new_tokens=6",
               f"eval.max_samples={prof.eval_questions}"]
    t_eval = evaluate_cached(root, sft, teacher, "teacher", ev_base)
    for arm, weights in ARMS.items():
        for seed in prof.seeds:
            run = runs / f"arm-{arm}-s{seed}"
            _link_run(regen if arm.endswith("regen") else orig, run, [])
            t = time.time()
            _say(f"training arm {arm} (seed {seed})")
            try:
                ckpt = _train(run, models / "student_init", [f"train_student.{k}={v}" for k, v in weights.items()] + [
                f"train_student.lr={prof.student_lr}", f"train_student.batch_size={prof.student_batch}",
                f"train_student.micro_batch_size={prof.student_batch}", f"train_student.max_steps={prof.student_steps}",
                "train_student.epochs=1000", f"train_student.seed={seed}", "train_student.freeze_vision=false",
                "train_student.save_every_steps=100000", "train_student.shuffle_buffer=1000"])
            except StageError as e:  # e.g. the teacher answered too few samples to fill a batch
                _say(f"arm {arm} skipped: {e}")
                results.append({"arm": arm, "seed": seed, "skipped": str(e)})
                continue
            train_s = time.time() - t
            ev = evaluate_cached(root, run, ckpt, f"{arm}-s{seed}", ev_base)
            results.append({"arm": arm, "seed": seed, "accuracy": ev["answers"]["accuracy"],
                            "exact_match": ev["answers"]["exact_match"], "kl_to_teacher": ev["teacher_cache"]["kl_to_teacher"],
                            "perplexity": ev["teacher_cache"]["perplexity"], "train_seconds": round(train_s, 1)})
    out = {"profile": profile or ("quick" if quick else "default"), "sizes": prof.__dict__ if hasattr(prof, "__dict__") else {},
           "teacher": {"accuracy": t_eval["answers"]["accuracy"], "kl_to_teacher": t_eval["teacher_cache"]["kl_to_teacher"],
                       "perplexity": t_eval["teacher_cache"]["perplexity"]},
           "results": results, "timings_s": {k: round(v, 1) for k, v in timings.items()},
           "total_seconds": round(time.time() - t_start, 1)}
    (root / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    table = write_report(root, out)
    print(table)
    return out


def evaluate_cached(root: Path, run: Path, model: Path, name: str, overrides: list[str]) -> dict:
    """``llavadi eval`` for one model; a finished result for the same checkpoint is reused."""
    from ..eval import evaluate

    path = run / "eval" / f"{name}.json"
    if path.exists():
        res = json.loads(path.read_text())
        if res.get("model") == str(Path(model).resolve()):
            return res
    cfg = resolve(run, None, [], overrides)
    return evaluate(run, cfg, str(model), name)
