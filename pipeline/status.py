"""``llavadi status RUN``: per stage, shards total/done and samples in/out/rejected (by reason),
read only from ``_stage.json`` and the ``_done`` markers (cheap on any size of run); regenerate
adds its generation figures from ``stats/``. On-policy rounds follow, one row per part
(``on_policy/round_<r>/generate``, ``…/cache_teacher``, ``…/train_student``: steps)."""
from __future__ import annotations

import json
from pathlib import Path

from .estimate import render_lines, status_estimate
from .rundir import STAGE_ORDER, StageDir


def collect(run_dir: Path | str) -> dict:
    run_dir = Path(run_dir)
    stages = {}
    for name in STAGE_ORDER + _round_parts(run_dir):
        sd = StageDir(run_dir, name)
        if not sd.path.exists():
            continue
        kind = name.rsplit("/", 1)[-1]  # an on-policy round's part is shown as the stage it is
        if kind in SPECIAL:
            stages[name] = SPECIAL[kind](sd)
            continue
        manifest = sd.read_manifest() or {}
        fp = manifest.get("fingerprint")
        markers = {i: sd.read_done(i) for i in sd.done_indices()}
        done_idx = [i for i, d in markers.items() if d and d.get("fingerprint") == fp]
        done = [markers[i] for i in done_idx]
        counts = {"in": 0, "out": 0, "rejected": 0}
        reasons: dict[str, int] = {}
        for d in done:
            c = d.get("counts", {})
            counts["in"] += c.get("in", 0)
            counts["out"] += c.get("out", 0)
            for r, n in (c.get("rejected") or {}).items():
                reasons[r] = reasons.get(r, 0) + n
        counts["rejected"] = sum(reasons.values())
        lock = None
        if sd.lock_file.exists():
            try:
                lock = json.loads(sd.lock_file.read_text())
            except (OSError, json.JSONDecodeError):
                lock = {"state": "unreadable"}
        stages[name] = {
            **({"generation": _generation(sd, done_idx)} if kind in ("regenerate", "generate") else {}),
            "fingerprint": fp,
            "shards_total": manifest.get("shards_total"),
            "shards_done": len(done),
            "complete": bool(manifest.get("complete")),
            "samples": counts,
            "rejected_by_reason": dict(sorted(reasons.items())),
            "running": lock,
        }
    out = {"run_dir": str(run_dir), "stages": stages}
    est = status_estimate(run_dir, bool(stages.get("cache_teacher", {}).get("complete")))
    if est is not None:  # cache-teacher not finished: its expected size and the free space (issue #15)
        out["cache_teacher_estimate"] = est
    return out


def _round_parts(run_dir: Path) -> list[str]:
    """``on_policy/round_<r>/{generate,cache_teacher,train_student}`` of every round started, by round (issue #24)."""
    rounds = sorted(int(p.name[6:]) for p in (run_dir / "on_policy").glob("round_*") if p.name[6:].isdigit())
    return [f"on_policy/round_{r}/{part}" for r in rounds for part in ("generate", "cache_teacher", "train_student")]


def _generation(sd: StageDir, shards: list[int]) -> dict:
    """regenerate/: tokens generated, seconds generating, tokens/s and prompt tokens served from the
    prefix cache, summed over the done shards' ``stats/`` files (a missing one counts as nothing)."""
    tot = {"generated_tokens": 0, "generate_seconds": 0.0, "prompt_tokens_cached": 0}
    for i in shards:
        try:
            st = json.loads(sd.stats_file(i).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for k in tot:
            tot[k] += st.get(k) or 0
    tot["generate_seconds"] = round(tot["generate_seconds"], 3)
    secs = tot["generate_seconds"]
    tot["generated_tokens_per_s"] = round(tot["generated_tokens"] / secs, 1) if secs > 0 else None
    return tot


def _lock(sd: StageDir):
    if not sd.lock_file.exists():
        return None
    try:
        return json.loads(sd.lock_file.read_text())
    except (OSError, json.JSONDecodeError):
        return {"state": "unreadable"}


def _training(sd: StageDir) -> dict:
    """train_student/: steps done of planned (newest checkpoint), samples used/rejected (scan)."""
    m = sd.read_manifest() or {}
    scan = {}
    if (sd.path / "scan.json").exists():
        scan = json.loads((sd.path / "scan.json").read_text())
    step = total = None
    ckpts = sorted(p for p in (sd.path / "checkpoints").glob("step_*") if (p / "trainer_state.json").exists()) \
        if (sd.path / "checkpoints").exists() else []
    if ckpts:
        ts = json.loads((ckpts[-1] / "trainer_state.json").read_text())
        step, total = ts.get("global_step"), ts.get("total_steps")
    rej = scan.get("rejected", {})
    valid = scan.get("valid", 0)
    return {"kind": "training", "fingerprint": m.get("fingerprint"), "shards_total": None, "shards_done": 0,
            "complete": bool(m.get("complete")), "steps_done": step, "steps_total": total,
            "final_checkpoint": m.get("final_checkpoint"),
            "samples": {"in": valid + sum(rej.values()), "out": valid, "rejected": sum(rej.values())},
            "rejected_by_reason": dict(sorted(rej.items())), "running": _lock(sd)}


def _evals(sd: StageDir) -> dict:
    names = sorted(p.stem for p in sd.path.glob("*.json"))
    return {"kind": "eval", "fingerprint": None, "shards_total": None, "shards_done": 0, "complete": bool(names),
            "models": names, "samples": {"in": 0, "out": 0, "rejected": 0}, "rejected_by_reason": {}, "running": None}


SPECIAL = {"train_student": _training, "eval": _evals}


def render(status: dict) -> str:
    rows = [("stage", "progress", "in", "out", "rejected", "state")]
    for name, s in status["stages"].items():
        total = s["shards_total"] if s["shards_total"] is not None else "?"
        state = "running" if s["running"] else ("complete" if s["complete"] else "incomplete")
        progress = f"{s['shards_done']}/{total}"
        if s.get("kind") == "training":
            progress = f"step {s['steps_done'] or 0}/{s['steps_total'] or '?'}"
        elif s.get("kind") == "eval":
            progress, state = f"{len(s['models'])} model(s)", ", ".join(s["models"])
        rows.append((name, progress, str(s["samples"]["in"]), str(s["samples"]["out"]),
                     str(s["samples"]["rejected"]), state))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"run: {status['run_dir']}"]
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 or i == 5 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    for name, s in status["stages"].items():
        g = s.get("generation")
        if g and g["generated_tokens"]:
            lines.append(f"{name}: {g['generated_tokens']} tokens generated, {g['generated_tokens_per_s']} tok/s, "
                         f"{g['prompt_tokens_cached']} prompt tokens from the prefix cache")
        if s["rejected_by_reason"]:
            lines.append(f"{name} rejects: " + ", ".join(f"{k}={v}" for k, v in s["rejected_by_reason"].items()))
    if not status["stages"]:
        lines.append("(no stage has run yet)")
    if status.get("cache_teacher_estimate"):
        lines += render_lines(status["cache_teacher_estimate"])
    return "\n".join(lines)
