"""The demo's report: table (stdout, ``report.md``), the measured ordering and goals, time per
phase, and a chart (``report.png``: accuracy per arm with each seed's point; validation learning
curves)."""
from __future__ import annotations

import statistics
from pathlib import Path

ARM_LABEL = {
    "ce": "(1) CE only",
    "ce+kd": "(2) CE + logit KD",
    "ce+feat": "(3) CE + feature KD",
    "llavadi": "(4) CE + logit + feature (LLAVADI)",
    "llavadi+regen": "(5) LLAVADI on teacher-regenerated data",
    "llavadi+on-policy": "(6) LLAVADI + on-policy rounds (the student's own answers, teacher-scored)",
}
PHASES = {"teacher_build": "teacher (shipped: load; --rebuild-teacher: build)", "data": "data",
          "student_init": "student stages 0–1 (vision pre-training, caption alignment)",
          "teacher_passes": "teacher passes (regenerate + caches)", "students_train": "student training",
          "on_policy": "on-policy rounds (answers, teacher pass, training)",
          "eval": "test-split evaluation", "curves": "learning curves (validation)"}


def summarise(results: list[dict], teacher_acc: float) -> list[dict]:
    """Per arm: mean accuracy % (test split), sample standard deviation over seeds, each seed's
    point, mean KL to the teacher, and % of the teacher–CE gap closed = (arm − CE) / (teacher − CE)."""
    rows = []
    for arm in ARM_LABEL:
        rs = [r for r in results if r["arm"] == arm and "skipped" not in r]
        if not rs:
            continue
        acc = [100 * r["accuracy"] for r in rs]
        rows.append({"arm": arm, "label": ARM_LABEL[arm], "seeds": len(rs), "points": acc,
                     "accuracy": statistics.mean(acc), "sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                     "kl": statistics.mean(r["kl_to_teacher"] for r in rs),
                     "train_s": statistics.mean(r["train_seconds"] for r in rs)})
    ce = next((r["accuracy"] for r in rows if r["arm"] == "ce"), None)
    for r in rows:
        gap = 100 * teacher_acc - ce if ce is not None else 0.0
        r["gap_closed"] = 100 * (r["accuracy"] - ce) / gap if ce is not None and gap > 0 else None
    return rows


def table(out: dict) -> str:
    t = out["teacher"]
    rows = summarise(out["results"], t["accuracy"])
    lines = ["| arm | accuracy % (mean ± sd) | each seed | KL to teacher | teacher–CE gap closed | train s |",
             "|---|---|---|---|---|---|",
             f"| teacher (shipped) | {100 * t['accuracy']:.1f} | — | — | — | — |"]
    for r in rows:
        pts = ", ".join(f"{p:.1f}" for p in r["points"])
        gap = f"{r['gap_closed']:.0f} %" if r["gap_closed"] is not None else "—"
        lines.append(f"| {r['label']} | {r['accuracy']:.1f} ± {r['sd']:.1f} | {pts} | {r['kl']:.3f} | {gap} | "
                     f"{r['train_s']:.0f} |")
    return "\n".join(lines)


def findings(out: dict) -> list[str]:
    """The ordering the measurement shows and each goal of issue #14, met or missed, in numbers."""
    t = 100 * out["teacher"]["accuracy"]
    rows = {r["arm"]: r for r in summarise(out["results"], out["teacher"]["accuracy"])}
    order = sorted(rows.values(), key=lambda r: -r["accuracy"])
    lines = ["Measured ordering (mean test accuracy): " + " > ".join(f"{r['arm']} {r['accuracy']:.1f}" for r in order)
             + f"; teacher {t:.1f}."]
    ce, ld, rg = rows.get("ce"), rows.get("llavadi"), rows.get("llavadi+regen")
    if ce and ld:
        d = ld["accuracy"] - ce["accuracy"]
        sep = min(ld["points"]) > max(ce["points"])
        lines.append(f"- LLAVADI − CE = {d:+.1f} points (goal ≥ +5: {'met' if d >= 5 else 'missed'}); every LLAVADI "
                     f"seed above every CE seed: {'yes' if sep else 'no'}.")
        if ld["gap_closed"] is not None:
            lines.append(f"- LLAVADI closes {ld['gap_closed']:.0f} % of the teacher–CE gap "
                         f"(goal ≥ 70 %: {'met' if ld['gap_closed'] >= 70 else 'missed'}).")
    if ld and rg:
        d = rg["accuracy"] - ld["accuracy"]
        lines.append(f"- regenerated-data LLAVADI − original-data LLAVADI = {d:+.1f} points "
                     f"(goal ≥ 0: {'met' if d >= 0 else 'missed'}).")
    op = rows.get("llavadi+on-policy")
    if ld and op and len(op["points"]) == len(ld["points"]):  # the same seeds: each one's own LLAVADI student
        each = ", ".join(f"{a - b:+.1f}" for a, b in zip(op["points"], ld["points"]))
        lines.append(f"- on-policy rounds − the LLAVADI student they continue = {op['accuracy'] - ld['accuracy']:+.1f} "
                     f"points (per seed: {each}).")
    return lines


def write_report(root: Path, out: dict) -> str:
    root = Path(root)
    md = table(out)
    tm = out["timings_s"]
    phases = ", ".join(f"{label} {tm[k]:.0f} s" for k, label in PHASES.items() if k in tm)
    curves = out.get("curves", {})
    curve_md = [f"- {arm}: " + ", ".join(f"step {p['step']}: {100 * p['accuracy']:.1f}" for p in pts)
                for arm, pts in curves.items()]
    sz = out["sizes"]
    body = [f"# llavadi demo ({out['profile']}, {out.get('date', '')})", "", md, "", *findings(out), "",
            f"Test split: {out['teacher']['questions']} questions ({sz['test']} conversations, never tuned on); "
            f"student labels: {sz['labelled']} conversations; teacher-answered extra images: {sz['unlabelled']}; "
            f"{sz['student_steps']} student steps × batch {sz['student_batch']}, seeds {list(sz['seeds'])}.", "",
            "Accuracy: VQA-normalised greedy answer match. KL: KL(teacher‖student) per answer token on the "
            "teacher's top-k + tail over the test split's teacher cache. Gap closed: (arm − CE) / (teacher − CE).", "",
            "Learning curves (validation split accuracy %, seed 0):", *curve_md, "",
            f"Total wall time: {out['total_seconds'] / 60:.1f} min ({phases}).", "", "![accuracy](report.png)", ""]
    (root / "report.md").write_text("\n".join(body))
    plot(root / "report.png", out)
    return md


def plot(path: Path, out: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarise(out["results"], out["teacher"]["accuracy"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [3, 2]})
    t = 100 * out["teacher"]["accuracy"]
    names = ["teacher"] + [r["arm"] for r in rows]
    vals = [t] + [r["accuracy"] for r in rows]
    ax.bar(names, vals, color=["#555"] + ["#4a7ebb"] * len(rows), alpha=0.85)
    for i, r in enumerate(rows, start=1):  # each seed's point
        ax.scatter([i + (j - (len(r["points"]) - 1) / 2) * 0.12 for j in range(len(r["points"]))], r["points"],
                   color="black", s=12, zorder=3)
    for i, v in enumerate(vals):
        ax.text(i, v + 1.5, f"{v:.1f}", ha="center", fontsize=8)
    ax.set_ylabel("test accuracy %")
    ax.set_ylim(0, 105)
    ax.set_title(f"arms ({out['teacher']['questions']} test questions; dots = seeds)", fontsize=10)
    plt.setp(ax.get_xticklabels(), rotation=15, ha="right")
    for arm, pts in out.get("curves", {}).items():
        ax2.plot([p["step"] for p in pts], [100 * p["accuracy"] for p in pts], marker="o", label=arm)
    ax2.axhline(t, color="#555", ls="--", lw=1, label="teacher (test)")
    ax2.set_xlabel("student step")
    ax2.set_ylabel("validation accuracy %")
    ax2.set_ylim(0, 105)
    ax2.set_title("learning curves (seed 0)", fontsize=10)
    ax2.legend(fontsize=8)
    fig.suptitle(f"llavadi demo ({out['profile']}, {out.get('date', '')}, {out['total_seconds'] / 60:.1f} min)")
    fig.subplots_adjust(bottom=0.2, top=0.86, wspace=0.25)
    fig.savefig(path, dpi=100)
    plt.close(fig)


README_BEGIN = "<!-- demo-report:start (make demo writes this block from demo/results.json) -->"
README_END = "<!-- demo-report:end -->"


def readme_block(out: dict, chart: str = "docs/demo_report.png") -> str:
    """The README's demo block: date, profile, duration, the table, the findings, the chart."""
    sz = out["sizes"]
    return "\n".join([
        f"**Latest run**: `llavadi demo --run-dir demo` ({out['profile']} profile), {out.get('date', '')}, "
        f"**{out['total_seconds'] / 60:.1f} min** on 2 CPU cores; {out['teacher']['questions']} test questions; "
        f"student labels: {sz['labelled']} conversations, {sz['student_steps']} steps × {sz['student_batch']}, "
        f"seeds {list(sz['seeds'])}.", "", table(out), "", *findings(out), "", f"![demo report]({chart})"])


def update_readme(readme: Path, root: Path) -> None:
    """Rewrite the block between the demo-report markers of ``readme`` from ``root/results.json``
    and copy ``root/report.png`` to ``docs/demo_report.png`` next to it. Raises ``ValueError``
    when the markers are missing."""
    import json
    import shutil

    readme, root = Path(readme), Path(root)
    out = json.loads((root / "results.json").read_text())
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme} has no demo-report markers")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + README_BEGIN + "\n" + readme_block(out) + "\n" + README_END + tail)
    (readme.parent / "docs").mkdir(exist_ok=True)
    shutil.copy2(root / "report.png", readme.parent / "docs" / "demo_report.png")


if __name__ == "__main__":  # python -m llavadi.stages.demo.report DEMO_DIR README.md (make demo)
    import sys

    update_readme(Path(sys.argv[2]), Path(sys.argv[1]))
