"""The sweep's report (``RUN/sweep/report.md``, ``report.png``): per arm the mean and sample standard deviation
over seeds of the test accuracy (each seed's point shown), the KL to the teacher and perplexity on the held-out
cache, the training time; the chart shows accuracy and KL per arm with every seed's point. ``summarise`` is
also the demo's."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional


def _mean(xs: list) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def summarise(results: list[dict], order: Optional[list] = None, labels: Optional[dict] = None) -> list[dict]:
    """Per arm (in ``order``, default first-seen): ``seeds``, ``points`` (accuracy % per seed), ``accuracy`` (mean
    %), ``sd`` (sample sd over seeds, 0 for one), ``kl``, ``perplexity``, ``train_s`` (means; None when not
    measured), ``label``. Rows marked ``skipped`` are left out."""
    arms = order or list(dict.fromkeys(r["arm"] for r in results))
    rows = []
    for arm in arms:
        rs = [r for r in results if r["arm"] == arm and "skipped" not in r]
        if not rs:
            continue
        acc = [100 * r["accuracy"] for r in rs if r.get("accuracy") is not None]
        rows.append({"arm": arm, "label": (labels or {}).get(arm, arm), "seeds": len(rs), "points": acc,
                     "accuracy": statistics.mean(acc) if acc else None,
                     "sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                     "kl": _mean([r.get("kl_to_teacher") for r in rs]),
                     "perplexity": _mean([r.get("perplexity") for r in rs]),
                     "train_s": _mean([r.get("train_seconds") for r in rs])})
    return rows


def _f(x, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def table(rows: list[dict]) -> str:
    lines = ["| arm | accuracy % (mean ± sd) | each seed | KL to teacher | perplexity | train s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        acc = "—" if r["accuracy"] is None else f"{r['accuracy']:.1f} ± {r['sd']:.1f}"
        pts = ", ".join(f"{p:.1f}" for p in r["points"]) or "—"
        lines.append(f"| {r['label']} | {acc} | {pts} | {_f(r['kl'], '.3f')} | {_f(r['perplexity'], '.3f')} | "
                     f"{_f(r['train_s'], '.0f')} |")
    return "\n".join(lines)


def plot(path: Path, rows: list[dict], results: list[dict]) -> None:
    """Accuracy (bars = mean, dots = seeds) and KL to the teacher per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(rows) + 4), 4.2))
    xs = range(len(rows))
    for ax, key, name in ((axes[0], "accuracy", "test accuracy %"), (axes[1], "kl", "KL to teacher")):
        vals = [r[key] if r[key] is not None else 0.0 for r in rows]
        ax.bar(xs, vals, color="#7aa6c2")
        for i, r in enumerate(rows):
            pts = r["points"] if key == "accuracy" else [x["kl_to_teacher"] for x in results
                                                        if x["arm"] == r["arm"] and x.get("kl_to_teacher") is not None]
            ax.scatter([i] * len(pts), pts, color="#1f3b57", s=14, zorder=3)
        ax.set_xticks(list(xs), [r["label"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(sweep_dir: Path, out: dict) -> str:
    """``report.md`` (header, table) and ``report.png`` in ``sweep_dir``; returns the table."""
    from ..pipeline import atomic

    rows = summarise(out["results"], list(out["arms"]))
    text = table(rows)
    head = (f"# Sweep of {out['run']}\n\n{out['date']}: {len(out['arms'])} arm(s) × {out['seeds']} seed(s) from "
            f"`{out['arms_file']}`; scored on {out.get('data') or '—'} (accuracy) and {out.get('cache') or '—'} "
            f"(KL to the teacher, perplexity).\n\n")
    atomic.write_bytes(sweep_dir / "report.md", (head + text + "\n").encode())
    plot(sweep_dir / "report.png", rows, out["results"])
    return text
