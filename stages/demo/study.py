"""``llavadi demo --study``: the LLAVADI study's ablation grid (``configs/sweeps/llavadi_study.yaml``) on the demo
task, through ``llavadi sweep`` (issue #21). Shares the default demo's teacher, data, student and held-out cache
(``setup`` in ``stages/demo/run.py``); its own run ``runs/study`` caches the labelled conversations with everything the grid reads —
every row kind, the teacher's hidden layers -1 and 2, top-32 and the image × answer affinity — and trains one
student per arm (one seed: the default demo measures seed spread), each scored on the test split.

Out: ``study_results.json``, ``runs/study/sweep/report.md`` / ``report.png``, and the README's
``demo-study`` block (``python -m llavadi.stages.demo.study DEMO_DIR README.md``; ``make demo-study``)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .run import PROFILES, setup, teacher_row, train_arms
from .steps import say, stage

PRESET = Path(__file__).resolve().parents[2] / "configs" / "sweeps" / "llavadi_study.yaml"
STUDY_CACHE = ["cache_teacher.source=data", "cache_teacher.top_k=32", "cache_teacher.positions=all",
               "cache_teacher.hidden_layers=[-1,2]", "cache_teacher.affinity=true"]
# the grid's peak learning rate, as the README's table was measured (the default demo's arms moved to 1e-3 after it:
# run.DemoProfile.student_lr); the preset's base or an arm may set its own
STUDY_LR = 2e-3
BEGIN = "<!-- demo-study:start (llavadi demo --study writes this block from demo/study_results.json) -->"
END = "<!-- demo-study:end -->"


def run_study(root: Path | str, *, executor: str = "ray", profile: str | None = None,
              rebuild_teacher: bool = False) -> dict:
    from ...pipeline.executors import init_ray
    from ..cache_teacher import STAGE as CACHE
    from ..ingest import STAGE as INGEST
    from ..sweep import load_arms
    from ..sweep_report import summarise, table

    prof = PROFILES[profile or "default"]
    root = Path(root).resolve()
    t0 = time.time()
    if executor == "ray":
        from ...pipeline.config import RunConfig

        init_ray(RunConfig())
    su = setup(root, prof, executor, rebuild_teacher)
    run = su.runs / "study"
    t = time.time()
    stage(INGEST, run, su.base + [f"ingest.inputs={json.dumps([str(su.data / 'labelled.json')])}"])
    stage(CACHE, run, [f"teacher.model={json.dumps(str(su.teacher))}"] + STUDY_CACHE)
    su.timings["study_cache"] = time.time() - t
    base, arms = load_arms(PRESET)
    t = time.time()
    results = train_arms(run, {a: {"lr": STUDY_LR, **base, **ov} for a, ov in arms.items()}, prof, su, every=10 ** 9,
                         seeds=prof.seeds[:1])
    su.timings["students"] = time.time() - t
    out = {"profile": profile or "default", "date": time.strftime("%Y-%m-%d"), "preset": str(PRESET),
           "teacher": teacher_row(su), "results": results, "arms": list(arms),
           "timings_s": {k: round(v, 1) for k, v in su.timings.items()}, "total_seconds": round(time.time() - t0, 1)}
    (root / "study_results.json").write_text(json.dumps(out, indent=1) + "\n")
    print(table(summarise(results, list(arms))))
    say(f"study: {len(arms)} arms in {out['total_seconds'] / 60:.1f} min → {root / 'study_results.json'}")
    return out


def readme_block(out: dict) -> str:
    from ..sweep_report import summarise, table

    t = out["teacher"]
    rows = summarise(out["results"], out["arms"])
    lines = [f"**Latest `llavadi demo --study`**: {out['date']}, **{out['total_seconds'] / 60:.1f} min** on 2 CPU "
             f"cores; the arms of `configs/sweeps/llavadi_study.yaml`, one seed each, on the demo's "
             f"{t['questions']} test questions (teacher {100 * t['accuracy']:.1f} %).", "", table(rows)]
    return "\n".join(lines)


def update_readme(readme: Path, root: Path) -> None:
    """Rewrite the README's ``demo-study`` block from ``root/study_results.json`` (``ValueError`` without markers)."""
    out = json.loads((Path(root) / "study_results.json").read_text())
    text = Path(readme).read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme} has no demo-study markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    Path(readme).write_text(head + BEGIN + "\n" + readme_block(out) + "\n" + END + tail)


if __name__ == "__main__":  # python -m llavadi.stages.demo.study DEMO_DIR README.md
    import sys

    update_readme(Path(sys.argv[2]), Path(sys.argv[1]))
