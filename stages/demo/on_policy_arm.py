"""The demo's on-policy arm (issue #24): ``llavadi+on-policy`` — each seed's LLAVADI student (arm 4, trained by
the sweep on the labelled conversations' cache) continues for ``DemoProfile.on_policy_rounds`` rounds of
``llavadi on-policy``: it answers the labelled prompts itself (sampled at T 1, as the study's
``align_on_policy``), the teacher scores exactly those tokens, and it trains on them with the LLAVADI loss.

Run dir per seed ``k``: ``runs/on-policy-s<k>/`` — the original run's ``data/`` and ``cache_teacher/`` (symlinks),
``train_student`` → that seed's LLAVADI arm directory (round 1 continues its full state: weights, optimizer,
scheduler, projector, RNG), the arm's own ``config.yaml``; the rounds under ``on_policy/round_<r>/``. Reruns
reuse finished rounds like every other demo stage.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ...pipeline import atomic
from ...pipeline.runner import StageError
from .steps import evaluate_cached, link_run, say

ARM = "llavadi+on-policy"


def on_policy_overrides(prof, teacher: Path, executor: str, seed: int) -> list[str]:
    return [f"teacher.model={json.dumps(str(teacher))}", f"run.executor={executor}",
            f"on_policy.rounds={prof.on_policy_rounds}", "on_policy.prompts_per_round=0", f"on_policy.fraction={prof.on_policy_fraction}",
            "on_policy.temperature=1.0", "on_policy.max_new_tokens=8", f"on_policy.lr={prof.on_policy_lr}",
            f"on_policy.engine={prof.eval_engine}", f"on_policy.seed={seed}",
            # CE against the teacher's argmax at the student's answer tokens: the student's own samples are no labels
            "train_student.ce_target=teacher_argmax"]


def train_on_policy_arm(orig: Path, prof, su, executor: str) -> list[dict]:
    """Per seed: the rounds, then the test-split score of the last round's student (accuracy, KL, perplexity, as the
    sweep scores the other arms); ``train_seconds`` = the rounds' wall time (answers + teacher pass + training),
    on top of the LLAVADI arm's own."""
    from ...pipeline.session import resolve
    from ..on_policy.rounds import run_on_policy

    rows = []
    for k in range(len(prof.seeds)):
        arm_dir = orig / "sweep" / "llavadi" / f"seed{k}"
        if not (arm_dir / "_stage.json").exists():
            rows.append({"arm": ARM, "seed": k, "skipped": f"the LLAVADI arm of seed {k} did not train"})
            continue
        run = su.runs / f"on-policy-s{k}"
        link_run(orig, run)
        (run / "config.yaml").write_text((arm_dir / "config.yaml").read_text())
        if not (run / "train_student").exists():
            os.symlink(arm_dir.resolve(), run / "train_student")
        say(f"on-policy arm, seed {k}: {prof.on_policy_rounds} round(s) from the LLAVADI student of seed {k}")
        t = time.time()
        try:
            infos = run_on_policy(run, resolve(run, None, [], on_policy_overrides(prof, su.teacher, executor, k)))
        except StageError as e:
            say(f"on-policy arm, seed {k} skipped: {e}")
            rows.append({"arm": ARM, "seed": k, "skipped": str(e)})
            continue
        timing = run / "on_policy_seconds.json"  # a rerun of finished rounds keeps the first run's time
        if not timing.exists():
            atomic.write_json(timing, {"seconds": round(time.time() - t, 1)})
        secs = json.loads(timing.read_text())["seconds"]
        ev = evaluate_cached(run, Path(infos[-1]["final_checkpoint"]), f"{ARM}-s{k}", su.test_ev)
        rows.append({"arm": ARM, "seed": k, "accuracy": ev["answers"]["accuracy"],
                     "exact_match": ev["answers"]["exact_match"], "kl_to_teacher": ev["teacher_cache"]["kl_to_teacher"],
                     "perplexity": ev["teacher_cache"]["perplexity"], "train_seconds": secs,
                     "steps": infos[-1]["steps"], "rounds": len(infos)})
    return rows
