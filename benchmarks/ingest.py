"""Benchmark ``llavadi ingest``: records/s and peak RSS at several dataset sizes.

The claim under test: ingest streams its input (``ijson``, one shard of records at a time), so
the driver's peak RSS stays flat as the dataset grows 10x. What is measured, per size:

- input: a LLaVA JSON list written *streaming* (this script never holds the records): ids are
  unique, image rows point round-robin at a pool of 50 real PNGs from the synthetic demo
  generator, every ``TEXT_EVERY``-th row is text-only;
- ``llavadi ingest RUN --input F --image-root D --executor local --shard-size 1000`` run as a
  subprocess; wall time covers the whole command (interpreter start, imports, planning,
  validation with image decode + sha256, Parquet writes);
- peak RSS of that subprocess: ``ru_maxrss`` from ``os.wait4`` (exact, kernel-tracked high-water
  mark of the process; the local executor runs everything in that one process). A psutil poll
  every 0.05 s of the process *tree* (sum of RSS) is reported beside it as a cross-check.

Plus one ``--executor ray`` run at the smallest size (records/s only is the headline; with
Ray's many processes RSS is not a meaningful single figure, the polled tree sum is given for
information). Prints ONE JSON object on stdout's last line (``--out FILE`` also writes it).

Usage: ``.venv/bin/python benchmarks/ingest.py [--sizes 10000,100000] [--out FILE] [--no-ray]``
"""
from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
from _common import emit, machine_info  # noqa: E402

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POOL_IMAGES = 50
TEXT_EVERY = 10  # every 10th record is text-only (LLaVA-665k has ~6% text-only rows)
SHARD_SIZE = 1000
POLL_S = 0.05


# --------------------------------------------------------------------------- machine

# --------------------------------------------------------------------------- input

def make_pool(root: Path) -> tuple[list[dict], list[dict]]:
    """50 real PNGs (+ their questions) from the demo generator: (image templates, text templates)."""
    from llavadi.stages.demo.synthetic_vqa import generate

    js = generate(root, POOL_IMAGES, seed=0, split="pool")
    recs = json.loads(js.read_text())
    with_img = [r for r in recs if r.get("image")]
    text = [r for r in recs if not r.get("image")]
    if not text:  # the generator's text-only fraction is random; keep one regardless
        text = [{"conversations": [{"from": "human", "value": "What is one plus two?"},
                                   {"from": "gpt", "value": "three"}]}]
    return with_img, text


def write_input(path: Path, n: int, with_img: list[dict], text: list[dict]) -> dict:
    """Stream a LLaVA JSON list of ``n`` records to ``path`` (one record in memory at a time)."""
    n_text = 0
    with open(path, "w", encoding="utf-8", buffering=1 << 20) as f:
        f.write("[\n")
        ii = it = 0
        for i in range(n):
            if i % TEXT_EVERY == TEXT_EVERY - 1:
                t = text[it % len(text)]
                it += 1
                n_text += 1
                rec = {"id": f"bench-{i:08d}", "conversations": t["conversations"]}
            else:
                t = with_img[ii % len(with_img)]
                ii += 1
                rec = {"id": f"bench-{i:08d}", "image": t["image"], "conversations": t["conversations"]}
            if i:
                f.write(",\n")
            f.write(json.dumps(rec, ensure_ascii=False))
        f.write("\n]\n")
    return {"records": n, "text_only": n_text, "bytes": path.stat().st_size}


# --------------------------------------------------------------------------- run + measure

def llavadi_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "llavadi"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("llavadi")
    return [found] if found else [sys.executable, "-m", "llavadi.cli"]


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(cmd: list[str], log_dir: Path, env: dict) -> dict:
    """Run ``cmd``; return wall seconds, exact peak RSS (wait4 ru_maxrss) and polled tree peak."""
    import psutil

    out_f = open(log_dir / "stdout.txt", "wb")
    err_f = open(log_dir / "stderr.txt", "wb")
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, env=env)
    ps = psutil.Process(child.pid)
    tree_peak = 0
    try:
        while True:
            pid, status, ru = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            tree_peak = max(tree_peak, _tree_rss(ps))
            time.sleep(POLL_S)
    finally:
        out_f.close()
        err_f.close()
    wall = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)
    stdout = (log_dir / "stdout.txt").read_text(errors="replace")
    stderr = (log_dir / "stderr.txt").read_text(errors="replace")
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {child.returncode}:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    return {"wall_s": wall, "peak_rss_mb": ru.ru_maxrss / 1024,  # Linux: kilobytes
            "tree_rss_polled_mb": tree_peak / 2**20, "stdout": stdout}


SUMMARY = re.compile(r"samples in (\d+), out (\d+), rejected (\d+)")


def ingest_once(work: Path, name: str, inp: Path, image_root: Path, executor: str, n: int) -> dict:
    run_dir = work / f"run-{name}"
    logs = work / f"logs-{name}"
    logs.mkdir()
    env = dict(os.environ)
    env.pop("LLAVADI_PROGRESS", None)  # no progress bar: stderr is a file anyway
    cmd = llavadi_cmd() + ["ingest", str(run_dir), "--input", str(inp), "--image-root", str(image_root),
                           "--executor", executor, "--shard-size", str(SHARD_SIZE)]
    r = run_measured(cmd, logs, env)
    m = SUMMARY.search(r.pop("stdout"))
    if not m:
        raise RuntimeError(f"could not read ingest's summary line in {logs / 'stdout.txt'}")
    n_in, n_out, n_rej = map(int, m.groups())
    if (n_in, n_out, n_rej) != (n, n, 0):
        raise RuntimeError(f"ingest of {n} records gave in={n_in} out={n_out} rejected={n_rej}; "
                           f"see {run_dir}/data/rejects/")
    shutil.rmtree(run_dir, ignore_errors=True)  # keep disk use bounded between sizes
    out = {"records": n, "executor": executor, "wall_s": round(r["wall_s"], 2),
           "records_per_s": round(n / r["wall_s"], 1), "peak_rss_mb": round(r["peak_rss_mb"], 1),
           "tree_rss_polled_mb": round(r["tree_rss_polled_mb"], 1)}
    if executor != "local":  # ru_maxrss is one process's high-water mark: meaningless across Ray's processes
        del out["peak_rss_mb"]
    return out


def _label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 and n >= 1000 else str(n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000", help="comma-separated record counts (default 10000,100000)")
    ap.add_argument("--out", default=None, help="also write the JSON result to this file")
    ap.add_argument("--no-ray", action="store_true", help="skip the ray-executor run")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed afterwards)")
    args = ap.parse_args(argv)
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if not sizes or min(sizes) < 1:
        ap.error("--sizes needs positive integers")

    t_start = time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="llavadi-bench-ingest-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        pool = work / "pool"
        with_img, text = make_pool(pool)
        runs = []
        for n in sizes:
            inp = work / f"input-{n}.json"
            info = write_input(inp, n, with_img, text)
            print(f"[bench ingest] {n} records ({info['text_only']} text-only, {info['bytes'] / 2**20:.1f} MiB); "
                  f"running local executor ...", file=sys.stderr, flush=True)
            r = ingest_once(work, f"local-{n}", inp, pool, "local", n)
            r["input_mib"] = round(info["bytes"] / 2**20, 2)
            runs.append(r)
            print(f"[bench ingest]   {r['records_per_s']} rec/s, peak RSS {r['peak_rss_mb']} MB", file=sys.stderr, flush=True)
            if not (n == sizes[0] and not args.no_ray):
                inp.unlink()
        ray_run = None
        if not args.no_ray:
            n = sizes[0]
            print(f"[bench ingest] {n} records, ray executor ...", file=sys.stderr, flush=True)
            ray_run = ingest_once(work, f"ray-{n}", work / f"input-{n}.json", pool, "ray", n)
            print(f"[bench ingest]   {ray_run['records_per_s']} rec/s", file=sys.stderr, flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    result: dict = {"benchmark": "ingest", "shard_size": SHARD_SIZE, "text_only_every": TEXT_EVERY,
                    "image_pool": POOL_IMAGES}
    for r in runs:
        result[f"records_per_s_{_label(r['records'])}"] = r["records_per_s"]
    for r in runs:
        result[f"peak_rss_mb_{_label(r['records'])}"] = r["peak_rss_mb"]
    lo, hi = runs[0], runs[-1]
    if len(runs) > 1:
        result[f"rss_ratio_{_label(hi['records'])}_over_{_label(lo['records'])}"] = round(hi["peak_rss_mb"] / lo["peak_rss_mb"], 3)
        # throughput net of the fixed start-up cost (interpreter, imports, run-dir setup)
        dt = hi["wall_s"] - lo["wall_s"]
        if dt > 0:
            result[f"marginal_records_per_s_{_label(lo['records'])}_to_{_label(hi['records'])}"] = round(
                (hi["records"] - lo["records"]) / dt, 1)
    if ray_run:
        result[f"ray_records_per_s_{_label(ray_run['records'])}"] = ray_run["records_per_s"]
    result["runs"] = runs + ([ray_run] if ray_run else [])
    result["machine"] = machine_info()
    result["bench_wall_s"] = round(time.perf_counter() - t_start, 1)

    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
