"""``llavadi demo``: the whole pipeline on a shipped tiny teacher, a tiny student and a synthetic
visual-QA task, with the study's ablations in miniature. Fully offline; reruns reuse finished stages.

Layout under ``--run-dir`` (default ``demo/``)::

    models/student_{random,vision,init}/   tiny LLaVA student (teacher's tokenizer, LLaVA's system text):
                           random → stage 0 vision pre-training → stage 1 caption alignment = init
    teacher/               only with --rebuild-teacher: the builder's output (teacher_builder.py)
    synthetic/{labelled,unlabelled,validation,test,captions}.json + images/   (data seed 0)
    runs/student_stage1/   ingest captions → cache-teacher targets → train-student (KD off)
    runs/heldout/          ingest test → cache-teacher: KL / perplexity reference
    runs/original/         ingest labelled → cache-teacher (source=data)
    runs/regenerated/      ingest labelled+unlabelled → regenerate (vLLM) → cache-teacher
    runs/{original,regenerated}/sweep/<arm>/seed<k>/   the arms, trained by `llavadi sweep` from each run's cache
    runs/on-policy-s<k>/   the on-policy arm: seed k's LLAVADI student continued by `llavadi on-policy` rounds
    report.md, report.png, results.json

Arms (LLAVADI study, Table 2/3 in miniature): ``ce`` (CE only), ``ce+kd`` (+ logit KD),
``ce+feat`` (+ feature loss), ``llavadi`` (CE + KD + feature), ``llavadi+regen`` (LLAVADI on
teacher-regenerated data: the teacher also answers images the student never saw labelled), ``llavadi+on-policy``
(each seed's LLAVADI student continued by on-policy rounds on the labelled prompts: ``on_policy_arm.py``).
The test split is only ever scored; learning curves use the validation split.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ...pipeline.runner import StageError
from .on_policy_arm import train_on_policy_arm
from .steps import evaluate_cached, say, stage


@dataclass(frozen=True)
class DemoProfile:
    labelled: int  # conversations with reference answers the student may train on
    unlabelled: int  # images (with questions) only the teacher answers (regenerated arm)
    validation: int  # conversations for learning curves / any tuning
    test: int  # conversations scored once per model (never tuned on)
    student_steps: int
    student_batch: int
    seeds: tuple = (0, 1, 2)
    # the arms' peak learning rate: at 2e-3 the regenerated-data arm (3300 conversations) lost its colour answers
    # (to chance, 0.13-0.16) in 3 of 3 seeds from this student, at 1.5e-3 in 1 of 2, at 1e-3 in none
    student_lr: float = 1e-3
    stage1_lr: float = 2e-3  # student stage 1 (caption alignment)
    on_policy_rounds: int = 2  # the on-policy arm's rounds (on_policy_arm.py) …
    on_policy_lr: float = 2e-4  # … at this constant learning rate (a fifth of the arms' peak) …
    on_policy_fraction: float = 1.0  # … with this share of the labelled prompts re-answered (GKD's lambda)
    curve_points: int = 6  # validation evaluations per learning curve
    vision_steps: int = 150  # the student's vision pre-training (vision_pretrain.py), as the teacher's
    stage1_captions: int = 3000  # student stage 1: caption conversations (synthetic_vqa.caption) …
    stage1_steps: int = 500  # … and its steps × student_batch (LLaVA's stage-1 alignment, before any arm)
    build: str = "full"  # teacher_builder size used by --rebuild-teacher
    # what answers the test questions: vLLM, one batched pass per split; transformers (one question at a time)
    # where starting an engine per student costs more than the questions (the test suite's smoke size)
    eval_engine: str = "vllm"


PROFILES = {
    # make demo: ≤ 20 min on 2 cores
    "default": DemoProfile(labelled=300, unlabelled=3000, validation=300, test=1600, student_steps=800,
                           student_batch=32, curve_points=4),
    # llavadi demo --quick: ≤ 5 min, one seed
    "quick": DemoProfile(labelled=300, unlabelled=1500, validation=150, test=600, student_steps=300,
                         student_batch=32, seeds=(0,), curve_points=3, stage1_captions=1500, stage1_steps=300),
    # the test suite's end-to-end run
    "smoke": DemoProfile(labelled=24, unlabelled=16, validation=8, test=12, student_steps=4, student_batch=8,
                         seeds=(0,), curve_points=2, build="smoke", vision_steps=2, stage1_captions=16, stage1_steps=2,
                         # half the prompts keep the teacher's answers: the barely trained smoke student samples padded
                         # head rows (token_out_of_vocab rejects) for most of its own
                         on_policy_rounds=1, on_policy_fraction=0.5),
}
ARMS = {
    "ce": dict(ce_weight=1.0, kd_weight=0.0, feature_weight=0.0),
    "ce+kd": dict(ce_weight=1.0, kd_weight=1.0, feature_weight=0.0),
    "ce+feat": dict(ce_weight=1.0, kd_weight=0.0, feature_weight=1.0),
    "llavadi": dict(ce_weight=1.0, kd_weight=1.0, feature_weight=1.0),
    "llavadi+regen": dict(ce_weight=1.0, kd_weight=1.0, feature_weight=1.0),
}
CURVE_ARMS = ("ce", "llavadi")


def demo_teacher(root: Path, prof: DemoProfile, rebuild: bool, executor: str) -> Path:
    """The shipped teacher (``assets/demo_teacher``), or with ``rebuild`` the builder's output in
    ``root/teacher``. Raises ``StageError`` naming the fix when the shipped one is missing."""
    from .teacher_builder import ASSET_DIR, CARD, build_teacher

    if rebuild:
        out = root / "teacher"
        if not (out / CARD).exists():
            say(f"building the demo teacher ({prof.build} size) in {root / 'teacher_build'}")
            build_teacher(root / "teacher_build", out, size=prof.build, executor=executor)
        return out
    if not (ASSET_DIR / "model.safetensors").exists():
        raise StageError(f"the shipped demo teacher is missing ({ASSET_DIR}/model.safetensors): restore it with "
                         "`git checkout -- assets/demo_teacher` or build one with `llavadi demo --rebuild-teacher`")
    return ASSET_DIR


@dataclass
class Setup:
    """What every demo run shares: the teacher, the synthetic data, the stage settings (``base``), the student
    every arm starts from, the held-out run (test split cache), the teacher's test score, the eval settings."""

    teacher: Path
    data: Path
    base: list
    student_init: Path
    runs: Path
    held: Path
    teacher_eval: dict
    test_ev: list
    val_ev: list
    timings: dict


def setup(root: Path, prof: DemoProfile, executor: str, rebuild_teacher: bool) -> Setup:
    """1. teacher, student, data; the held-out teacher cache; the teacher's own score on the test split
    (finished stages are reused)."""
    from ..cache_teacher import STAGE as CACHE
    from ..ingest import STAGE as INGEST
    from . import synthetic_vqa

    timings: dict[str, float] = {}
    t = time.time()
    teacher = demo_teacher(root, prof, rebuild_teacher, executor)
    timings["teacher_build"] = time.time() - t
    t = time.time()
    data = root / "synthetic"
    splits = {"labelled": (prof.labelled, True), "unlabelled": (prof.unlabelled, False),
              "validation": (prof.validation, True), "test": (prof.test, True)}
    for split, (n, answers) in splits.items():
        if not (data / f"{split}.json").exists():
            say(f"generating {n} {split} conversations")
            synthetic_vqa.generate(data, n, seed=0, split=split, with_answers=answers)
    base = [f"run.executor={executor}", f"ingest.image_root={json.dumps(str(data))}", "ingest.shard_size=1000",
            "teacher.max_model_len=512", "cache_teacher.batch_size=32"]
    timings["data"] = time.time() - t
    t = time.time()
    student_init = root / "models" / "student_init"
    if not (student_init / "config.json").exists():
        build_student(root, teacher, prof, base)
    timings["student_init"] = time.time() - t
    t = time.time()
    runs = root / "runs"
    held = runs / "heldout"
    stage(INGEST, held, base + [f"ingest.inputs={json.dumps([str(data / 'test.json')])}"])
    stage(CACHE, held, [f"teacher.model={json.dumps(str(teacher))}", "cache_teacher.source=data", "cache_teacher.top_k=32"])
    timings["teacher_passes"] = time.time() - t
    # vLLM answers a whole split in one batched pass (transformers' engine generates one question at a time)
    test_ev = [f"eval.engine={prof.eval_engine}", f"eval.data={json.dumps(str(data / 'test.json'))}",
               f"eval.cache={json.dumps(str(held / 'cache_teacher'))}", f"eval.image_root={json.dumps(str(data))}",
               "eval.max_new_tokens=6"]
    val_ev = [f"eval.engine={prof.eval_engine}", f"eval.data={json.dumps(str(data / 'validation.json'))}",
              f"eval.image_root={json.dumps(str(data))}", "eval.max_new_tokens=6"]
    t = time.time()
    t_eval = evaluate_cached(held, teacher, "teacher", test_ev)
    timings["eval"] = time.time() - t
    return Setup(teacher, data, base, student_init, runs, held, t_eval, test_ev, val_ev, timings)


def teacher_row(su: Setup) -> dict:
    t = su.teacher_eval
    return {"path": str(su.teacher), "accuracy": t["answers"]["accuracy"], "questions": t["answers"]["scored"],
            "kl_to_teacher": t["teacher_cache"]["kl_to_teacher"], "perplexity": t["teacher_cache"]["perplexity"]}


def run_demo(root: Path | str, *, quick: bool = False, executor: str = "ray", profile: str | None = None,
             rebuild_teacher: bool = False) -> dict:
    from ...pipeline.executors import init_ray
    from ..cache_teacher import STAGE as CACHE
    from ..ingest import STAGE as INGEST
    from ..regenerate import STAGE as REGEN
    from .report import write_report

    name = profile or ("quick" if quick else "default")
    prof = PROFILES[name]
    root = Path(root).resolve()
    t_start = time.time()
    if executor == "ray":
        from ...pipeline.config import RunConfig

        init_ray(RunConfig())  # one embedded cluster for every stage of the demo
    su = setup(root, prof, executor, rebuild_teacher)
    timings, teacher, data, base, val_ev = su.timings, su.teacher, su.data, su.base, su.val_ev

    # 2. teacher passes: the original labelled cache, the regenerated labelled+unlabelled one --------------
    t = time.time()
    teacher_cfg = [f"teacher.model={json.dumps(str(teacher))}"]
    orig, regen = su.runs / "original", su.runs / "regenerated"
    stage(INGEST, orig, base + [f"ingest.inputs={json.dumps([str(data / 'labelled.json')])}"])
    stage(CACHE, orig, teacher_cfg + ["cache_teacher.source=data", "cache_teacher.top_k=32"])
    stage(INGEST, regen, base + [f"ingest.inputs={json.dumps([str(data / 'labelled.json'), str(data / 'unlabelled.json')])}"])
    stage(REGEN, regen, teacher_cfg + ["regenerate.sampling.temperature=0", "regenerate.sampling.max_new_tokens=8",
                                       "regenerate.sampling.min_new_tokens=1", "regenerate.block_size=1024"])
    stage(CACHE, regen, teacher_cfg + ["cache_teacher.source=regenerate", "cache_teacher.top_k=32"])
    timings["teacher_passes"] += time.time() - t

    # 4. students, one per arm and seed, through `llavadi sweep` (one sweep per cache: the original labelled
    #    data, the teacher-regenerated data); learning curves from the checkpoints of two arms ----------------
    t = time.time()
    every = max(1, prof.student_steps // prof.curve_points)
    results = []
    for cache_run, arms in ((orig, [a for a in ARMS if not a.endswith("regen")]),
                            (regen, [a for a in ARMS if a.endswith("regen")])):
        results += train_arms(cache_run, {a: ARMS[a] for a in arms}, prof, su, every)
    timings["students_train"] = sum(r.get("train_seconds", 0.0) for r in results)
    timings["eval"] += time.time() - t - timings["students_train"]
    t = time.time()
    on_policy = train_on_policy_arm(orig, prof, su, executor)  # 5. arm 6: the LLAVADI students continue on-policy
    results += on_policy
    timings["on_policy"] = sum(r.get("train_seconds", 0.0) for r in on_policy)
    timings["eval"] += time.time() - t - timings["on_policy"]
    t = time.time()
    curves = {arm: learning_curve(orig / "sweep" / arm / f"seed{prof.seeds[0]}", arm, val_ev) for arm in CURVE_ARMS}
    timings["curves"] = time.time() - t
    out = {"profile": name, "sizes": asdict(prof), "date": time.strftime("%Y-%m-%d"),
           "teacher": teacher_row(su),
           "results": results, "curves": curves, "timings_s": {k: round(v, 1) for k, v in timings.items()},
           "total_seconds": round(time.time() - t_start, 1)}
    (root / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    table = write_report(root, out)
    print(table)
    return out


def build_student(root: Path, teacher: Path, prof: DemoProfile, base: list[str]) -> Path:
    """``root/models/student_init``: the student every arm starts from, made as the study's students
    are before distillation — a pre-trained vision encoder (stage 0, ``vision_pretrain.py``) and
    LLaVA's stage-1 alignment on captions (``prof.stage1_captions`` "Describe the image."
    conversations with their true captions, ``prof.stage1_steps`` × ``student_batch``, tower frozen): without it a
    student trained 800 steps on 3300 teacher-answered conversations still named the object at a
    given position only 14 % of the time (teacher 100 %) — it never learned to read the image, so no
    arm could differ. Published atomically; a rerun reuses it."""
    from transformers import AutoTokenizer

    from ...models.prompts import LLAVA_V1_SYSTEM
    from . import synthetic_vqa, tiny_models
    from ...pipeline import atomic
    from .steps import copy_model, scratch_dir, sft
    from .vision_pretrain import pretrain_vision_dir

    models, data = root / "models", root / "synthetic"
    random_init, vision, out = models / "student_random", models / "student_vision", models / "student_init"
    if not (random_init / "config.json").exists():
        say(f"building the student ({tiny_models.DEMO_STUDENT}) with the teacher's tokenizer")
        tiny_models.build_tiny_llava(random_init, tiny_models.DEMO_STUDENT, system=LLAVA_V1_SYSTEM,
                                     tokenizer=AutoTokenizer.from_pretrained(str(teacher)))
    if not (vision / "config.json").exists():
        say(f"student stage 0: pre-training the vision tower ({prof.vision_steps} steps)")
        pretrain_vision_dir(random_init, vision, prof.vision_steps, seed=0)
    if not (data / "captions.json").exists():
        say(f"generating {prof.stage1_captions} caption conversations (student stage 1)")
        synthetic_vqa.generate(data, prof.stage1_captions, seed=0, split="captions", caption_frac=1.0)
    say(f"student stage 1: caption alignment ({prof.stage1_steps} steps)")
    ckpt = sft(root / "runs" / "student_stage1", data / "captions.json", base, vision, steps=prof.stage1_steps,
               batch=prof.student_batch, lr=prof.stage1_lr, freeze_vision=True)
    tmp = scratch_dir(out)
    copy_model(ckpt, vision, tmp)
    atomic.replace_dir(tmp, out)
    return out


def train_arms(run: Path, arms: dict, prof: DemoProfile, su: Setup, every: int, seeds: tuple = ()) -> list[dict]:
    """``arms`` (name → ``train_student`` overrides) trained from ``run``'s cache by ``llavadi sweep``
    (``stages.sweep.run_sweep``) with the profile's recipe, each seed scored on the test split (vLLM answers, the
    held-out cache's KL): the sweep's results rows. The learning-curve arms keep a checkpoint every ``every``
    steps."""
    import yaml

    from ..sweep import run_sweep

    seeds = seeds or prof.seeds
    keep = prof.curve_points + 1
    base = {"student": str(su.student_init), "lr": prof.student_lr, "batch_size": prof.student_batch,
            "micro_batch_size": prof.student_batch, "max_steps": prof.student_steps, "epochs": 100000,
            "freeze_vision": True, "shuffle_buffer": 1000, "log_every_steps": 10, "save_every_steps": 100000,
            "keep_checkpoints": 1}
    spec = {"base": base, "eval": {"engine": prof.eval_engine, "image_root": str(su.data), "max_new_tokens": 6},
            "arms": {a: {**ov, **({"save_every_steps": every, "keep_checkpoints": keep} if a in CURVE_ARMS else {})}
                     for a, ov in arms.items()}}
    path = run / "demo_arms.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    say(f"training arms {', '.join(arms)} × {len(seeds)} seed(s) with `llavadi sweep {run} --arms {path.name}`")
    try:
        out = run_sweep(run, path, seeds=len(seeds), data=str(su.data / "test.json"),
                        cache=str(su.held / "cache_teacher"), executor="local", progress=True)
    except StageError as e:  # e.g. the teacher answered too few samples to fill a batch
        say(f"arms {', '.join(arms)} skipped: {e}")
        return [{"arm": a, "seed": s, "skipped": str(e)} for a in arms for s in seeds]
    return out["results"]


def learning_curve(arm_dir: Path, arm: str, val_ev: list[str]) -> list[dict]:
    """Validation accuracy of every checkpoint the arm's seed kept: ``[{"step", "accuracy"}]``."""
    pts = []
    for ckpt in sorted((arm_dir / "checkpoints").glob("step_*")):
        step = int(ckpt.name.split("_")[1])
        ev = evaluate_cached(arm_dir, ckpt, f"val-{arm}-step{step}", val_ev)
        pts.append({"step": step, "accuracy": ev["answers"]["accuracy"]})
    return pts
