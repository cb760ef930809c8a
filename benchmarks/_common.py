"""Shared by the benchmark scripts (``run_all.py`` skips ``_``-prefixed files)."""
from __future__ import annotations

import os
import platform


def machine_info() -> dict:
    """CPU model, cores this process may use, memory, Python — printed beside every figure."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
                    break
    except OSError:
        pass
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count()
    return {"nproc": nproc, "cpu_model": model or platform.processor() or platform.machine(),
            "mem_total_gb": mem_gb, "python": platform.python_version(), "platform": platform.platform()}


def emit(result: dict, out: str | None) -> int:
    """The benchmark's one JSON line on stdout (``run_all.py`` reads the last line), and the same
    object indented into ``out`` when given. Returns the exit status 0."""
    import json
    from pathlib import Path

    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result), flush=True)
    return 0
