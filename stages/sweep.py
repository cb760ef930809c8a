"""``llavadi sweep RUN --arms ARMS.yaml``: train and compare many students from RUN's one teacher cache
(issue #21) — the LLAVADI study's ablation grid as a command.

``ARMS.yaml``::

    base: {max_steps: 200, lr: 2.0e-4}        # train_student.* overrides every arm shares (optional)
    eval: {engine: vllm, max_new_tokens: 8}   # eval.* settings every arm is scored with (optional)
    arms:                                     # name → train_student.* overrides (nested or dotted keys)
      ce:        {kd_weight: 0, feature_weight: 0}
      kd-all:    {kd: {positions: all}, feature_weight: 0}
      mse:       {kd.kind: mse, kd.source: exact}

Every arm × seed ``k`` (``--seeds N``: ``train_student.seed = base seed + k``) trains into
``RUN/sweep/<arm>/seed<k>/`` (the train-student directory layout, with its own ``config.yaml``; resumable and
fingerprinted exactly like ``llavadi train-student``: a killed sweep rerun trains only what is unfinished, and
a finished arm is a no-op), then is scored by eval on ``--data`` (held-out questions: accuracy) and/or
``--cache`` (a held-out teacher cache: KL to the teacher, perplexity) into ``RUN/sweep/<arm>/seed<k>/eval/``.
Arms run as Ray tasks (one GPU each where there are GPUs; ``--executor local``: one after another).
``RUN/sweep/results.json`` (every arm × seed: accuracy, KL, perplexity, train seconds, steps),
``report.md`` and ``report.png`` (``sweep_report.py``) follow.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import yaml

from ..pipeline import atomic
from ..pipeline.runner import StageError
from ..pipeline.session import resolve

SWEEP_DIR = "sweep"


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"kd": {"kind": "rkl"}, "lr": 1e-4}`` → ``{"kd.kind": "rkl", "lr": 1e-4}``."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_arms(path: Path | str) -> tuple[dict, dict]:
    """(base overrides, {arm: overrides}) of an arms file, keys relative to ``train_student``. Raises
    ``StageError`` naming the file and what is wrong (no arms, a bad name, an override that is not a mapping)."""
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise StageError(f"sweep: cannot read the arms file {p}: {e}") from None
    arms = doc.get("arms")
    if not isinstance(arms, dict) or not arms:
        raise StageError(f"sweep: {p} has no `arms:` mapping (name → train_student overrides)")
    bad = [a for a in arms if not isinstance(a, str) or not a or "/" in a or a.startswith(".")]
    if bad:
        raise StageError(f"sweep: arm names must be plain directory names, got {bad}")
    for a, ov in arms.items():
        if ov is not None and not isinstance(ov, dict):
            raise StageError(f"sweep: arm {a!r} in {p} must map train_student keys to values, got {ov!r}")
    base = doc.get("base") or {}
    if not isinstance(base, dict) or not isinstance(doc.get("eval") or {}, dict):
        raise StageError(f"sweep: `base:` and `eval:` in {p} must be mappings")
    return flatten(base), {a: flatten(ov or {}) for a, ov in arms.items()}


def eval_overrides(path: Path | str) -> list[str]:
    """The arms file's ``eval:`` section as ``eval.*`` overrides (how every arm is scored)."""
    doc = yaml.safe_load(Path(path).read_text()) or {}
    return [f"eval.{k}={json.dumps(v)}" for k, v in flatten(doc.get("eval") or {}).items()]


def arm_overrides(base: dict, arm: dict, seed: int) -> list[str]:
    vals = {**base, **arm}
    vals["seed"] = int(vals.get("seed", 0)) + seed
    return [f"train_student.{k}={json.dumps(v)}" for k, v in vals.items()]


def arm_config(run_dir: Path, base: dict, arm: dict, seed: int, extra: list[str]):
    """The resolved config of one arm × seed (RUN's config + the sweep's eval overrides + the arm's)."""
    return resolve(run_dir, None, list(extra), arm_overrides(base, arm, seed))


def run_arm(run_dir: str, arm: str, seed: int, overrides: list[str], extra: list[str], progress: bool) -> dict:
    """Train one arm × seed (resumable; a finished one is a no-op) and score it; returns its results row."""
    from .eval import evaluate
    from .train_student.loop import train

    run = Path(run_dir)
    out = run / SWEEP_DIR / arm / f"seed{seed}"
    cfg = resolve(run, None, list(extra), overrides)
    t0 = time.time()
    res = train(run, cfg, out_dir=out, progress=progress)
    train_s = time.time() - t0
    row = {"arm": arm, "seed": seed, "steps": res["steps"], "samples": res["scan"]["valid"],
           "final_checkpoint": res["final_checkpoint"]}
    timing = out / "train_seconds.json"  # a no-op relaunch keeps the first run's time
    if not timing.exists() or not res.get("final_checkpoint"):
        atomic.write_json(timing, {"train_seconds": round(train_s, 1)})
    row["train_seconds"] = json.loads(timing.read_text())["train_seconds"]
    if cfg.eval.data or cfg.eval.cache:
        ev = _evaluate_once(out, cfg, res["final_checkpoint"], evaluate)
        if "answers" in ev:
            row["accuracy"] = ev["answers"].get("accuracy")
            row["exact_match"] = ev["answers"].get("exact_match")
        if "teacher_cache" in ev:
            row["kl_to_teacher"] = ev["teacher_cache"].get("kl_to_teacher")
            row["perplexity"] = ev["teacher_cache"].get("perplexity")
    return row


def _evaluate_once(out: Path, cfg, ckpt: str, evaluate) -> dict:
    """eval of the arm's final checkpoint into ``out/eval/final.json``; reused while it names that checkpoint."""
    path = out / "eval" / "final.json"
    if path.exists():
        res = json.loads(path.read_text())
        if res.get("model") == str(Path(ckpt).resolve()) and "problems" not in res:
            return res
    return evaluate(out, cfg, ckpt, "final")


def run_sweep(run_dir: Path | str, arms_file: Path | str, *, seeds: int = 1, data: Optional[str] = None,
              cache: Optional[str] = None, executor: str = "ray", ray_address: Optional[str] = None,
              progress: bool = True) -> dict:
    """Every arm × seed (module docstring), then ``results.json`` + ``report.md`` + ``report.png``. Raises
    ``StageError`` before any training when an arm's config does not resolve (naming the arm and the key)."""
    from ..pipeline.config import ConfigError
    from .sweep_report import write_report

    run = Path(run_dir)
    if not (run / "cache_teacher" / "index.json").exists():
        raise StageError(f"sweep: {run} has no teacher cache: run `llavadi cache-teacher {run}` first")
    if seeds < 1:
        raise StageError("sweep: --seeds must be >= 1")
    base, arms = load_arms(arms_file)
    extra = eval_overrides(arms_file)
    if data:
        extra.append(f"eval.data={json.dumps(str(Path(data).resolve()))}")
    if cache:
        extra.append(f"eval.cache={json.dumps(str(Path(cache).resolve()))}")
    jobs = []
    for arm, ov in arms.items():
        for k in range(seeds):
            try:  # every arm resolves before any trains: a typo fails the sweep in seconds, not hours
                arm_config(run, base, ov, k, extra)
            except ConfigError as e:
                raise StageError(f"sweep: arm {arm!r}: {e}") from None
            jobs.append((arm, k, arm_overrides(base, ov, k)))
    rows = _run_jobs(run, jobs, extra, executor, ray_address, progress)
    out = {"run": str(run.resolve()), "arms_file": str(Path(arms_file).resolve()), "seeds": seeds,
           "data": data, "cache": cache, "arms": {a: ov for a, ov in arms.items()}, "base": base,
           "date": time.strftime("%Y-%m-%d"), "results": rows}
    sd = run / SWEEP_DIR
    atomic.write_json(sd / "results.json", out)
    write_report(sd, out)
    return out


def _run_jobs(run: Path, jobs: list, extra: list, executor: str, ray_address: Optional[str], progress: bool) -> list:
    if executor == "local":
        return [run_arm(str(run), a, k, ov, extra, progress) for a, k, ov in jobs]
    import ray
    import torch

    from ..pipeline.config import RunConfig
    from ..pipeline.executors import init_ray

    started = init_ray(RunConfig(ray_address=ray_address))
    try:
        task = ray.remote(num_gpus=1 if torch.cuda.is_available() else 0, num_cpus=1, max_retries=2)(run_arm)
        return ray.get([task.remote(str(run), a, k, ov, extra, False) for a, k, ov in jobs])
    finally:
        if started:
            ray.shutdown()
