"""The demo's table (stdout and ``report.md``) and bar chart (``report.png``)."""
from __future__ import annotations

import statistics
from pathlib import Path

ARM_LABEL = {
    "ce": "(1) CE only",
    "ce+kd": "(2) CE + logit KD",
    "ce+feat": "(3) CE + feature KD",
    "llavadi": "(4) CE + logit + feature (LLAVADI)",
    "llavadi+regen": "(5) LLAVADI on teacher-regenerated data",
}


def summarise(results: list[dict]) -> list[dict]:
    rows = []
    for arm in ARM_LABEL:
        rs = [r for r in results if r["arm"] == arm and "skipped" not in r]
        if not rs:
            continue
        acc = [100 * r["accuracy"] for r in rs]
        rows.append({"arm": arm, "label": ARM_LABEL[arm], "seeds": len(rs), "accuracy": statistics.mean(acc),
                     "spread": (max(acc) - min(acc)) / 2 if len(acc) > 1 else 0.0,
                     "kl": statistics.mean(r["kl_to_teacher"] for r in rs),
                     "train_s": statistics.mean(r["train_seconds"] for r in rs)})
    return rows


def table(out: dict) -> str:
    rows = summarise(out["results"])
    lines = ["| arm | accuracy % (± half-range over seeds) | KL to teacher | train time s |", "|---|---|---|---|"]
    t = out["teacher"]
    lines.append(f"| teacher (SFT) | {100 * t['accuracy']:.1f} | 0 (itself: {t['kl_to_teacher']:.4f}) | — |")
    for r in rows:
        spread = f" ± {r['spread']:.1f}" if r["seeds"] > 1 else ""
        lines.append(f"| {r['label']} | {r['accuracy']:.1f}{spread} (n={r['seeds']}) | {r['kl']:.4f} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def write_report(root: Path, out: dict) -> str:
    root = Path(root)
    md = table(out)
    body = [f"# llavadi demo ({out['profile']})", "", md, "",
            f"Total wall time: {out['total_seconds']:.0f} s; teacher SFT {out['timings_s'].get('teacher_sft', 0):.0f} s, "
            f"teacher passes (regenerate + caches) {out['timings_s'].get('teacher_passes', 0):.0f} s.",
            "", "Accuracy: VQA-normalised answer match on the held-out test questions. KL: KL(teacher‖student) per "
            "answer token on the teacher's top-k + tail, over the held-out teacher cache.", "", "![accuracy](report.png)", ""]
    (root / "report.md").write_text("\n".join(body))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = summarise(out["results"])
        fig, ax = plt.subplots(figsize=(8, 4.2))
        names = ["teacher"] + [r["arm"] for r in rows]
        vals = [100 * out["teacher"]["accuracy"]] + [r["accuracy"] for r in rows]
        errs = [0.0] + [r["spread"] for r in rows]
        ax.bar(names, vals, yerr=errs, capsize=4, color=["#555"] + ["#4a7ebb"] * len(rows))
        ax.set_ylabel("held-out accuracy %")
        ax.set_title("llavadi demo: distillation arms (tiny student)")
        for i, v in enumerate(vals):
            ax.text(i, v + 1, f"{v:.1f}", ha="center", fontsize=8)
        ax.set_ylim(0, max(vals) * 1.15 + 5)
        plt.setp(ax.get_xticklabels(), rotation=15, ha="right")
        fig.subplots_adjust(bottom=0.22, top=0.9)
        fig.savefig(root / "report.png", dpi=110)
        plt.close(fig)
    except ImportError:
        pass
    return md
