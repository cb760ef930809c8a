"""Run every benchmark script in ``benchmarks/`` and collect the figures.

Each ``benchmarks/*.py`` (except this file, ``__init__.py`` and names starting with ``_``) is
run in its own process with this interpreter, from the repository root; its stdout's last
non-empty line must be one JSON object. The results go to ``benchmarks/results.json`` as
``{"timestamp", "machine", "runtimes_s", <script name>: <its JSON>, ...}`` and a markdown
table of the scalar figures is printed. A script that fails or prints no JSON is recorded as
``{"error": ...}`` and the exit status is 1; the others still run. After a full run (no
``--only``) the README's figures table (between the ``bench-table`` markers) is rewritten from
the results by ``_figures.render``.

Usage: ``.venv/bin/python benchmarks/run_all.py [--only ingest,...] [--out FILE] [--timeout S]``
(``make bench`` runs it with defaults).
"""
from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
from _common import machine_info  # noqa: E402
from _figures import render, update_readme  # noqa: E402

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESERVED = ("timestamp", "machine", "runtimes_s")


def discover() -> list[Path]:
    me = Path(__file__).resolve()
    return sorted(p for p in HERE.glob("*.py")
                  if p.resolve() != me and p.name != "__init__.py" and not p.name.startswith("_"))


def last_json(stdout: str):
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line:
            return json.loads(line)
    raise ValueError("no output on stdout")


def run_one(script: Path, timeout: float) -> tuple[dict, float]:
    t0 = time.perf_counter()
    print(f"== {script.name}", file=sys.stderr, flush=True)
    try:
        # stderr passes through (progress lines); stdout is captured for the JSON line
        p = subprocess.run([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}, time.perf_counter() - t0
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return {"error": f"exit status {p.returncode}", "stdout_tail": p.stdout[-2000:]}, wall
    try:
        res = last_json(p.stdout)
    except ValueError as e:
        return {"error": f"last stdout line is not JSON: {e}", "stdout_tail": p.stdout[-2000:]}, wall
    if not isinstance(res, dict):
        res = {"value": res}
    return res, wall


def flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Scalar figures as (dotted key, value); lists and per-script machine info are left to the JSON."""
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if k == "machine":
                continue
            out.extend(flatten(v, key + "."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out.append((key, v))
    return out


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}".rstrip("0").rstrip(".") if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def table(results: dict) -> str:
    m = results["machine"]
    lines = [f"Benchmarks, {results['timestamp']} — {m.get('nproc')} CPU(s), {m.get('cpu_model')}", "",
             "| benchmark | figure | value |", "|---|---|---|"]
    for name, res in results.items():
        if name in RESERVED:
            continue
        for key, v in flatten(res):
            if key == "stdout_tail":
                continue
            lines.append(f"| {name} | {key} | {fmt(v)} |")
        lines.append(f"| {name} | (script wall s) | {fmt(results['runtimes_s'].get(name))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated script names (without .py) to run")
    ap.add_argument("--out", default=str(HERE / "results.json"), help="results file (default benchmarks/results.json)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per script (default 1800)")
    ap.add_argument("--readme", default=str(REPO / "README.md"),
                    help="README whose figures block is rewritten after a full run ('' to leave it)")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite the README block from the existing results file, run nothing")
    args = ap.parse_args(argv)
    if args.render_only:
        results = json.loads(Path(args.out).read_text())
        print(render(results))
        return 0 if update_readme(Path(args.readme), results) else 1

    scripts = discover()
    if args.only:
        want = {s.strip().removesuffix(".py") for s in args.only.split(",") if s.strip()}
        unknown = want - {p.stem for p in scripts}
        if unknown:
            ap.error(f"no such benchmark(s): {', '.join(sorted(unknown))}; have: {', '.join(p.stem for p in scripts)}")
        scripts = [p for p in scripts if p.stem in want]

    results: dict = {"timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                     "machine": machine_info(), "runtimes_s": {}}
    failed = []
    for s in scripts:
        name = s.stem if s.stem not in RESERVED else f"{s.stem}_bench"
        res, wall = run_one(s, args.timeout)
        res["measured_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        results[name] = res
        results["runtimes_s"][name] = round(wall, 1)
        if "error" in res:
            failed.append(name)
            print(f"!! {s.name}: {res['error']}", file=sys.stderr, flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(f"\nwritten: {out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    if args.readme and not args.only:  # only a full run may replace the README's figures
        if update_readme(Path(args.readme), results):
            print(f"figures table written into {args.readme}", file=sys.stderr)
        else:
            print(f"{args.readme} has no bench-table markers; table not written", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
