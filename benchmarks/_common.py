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


# The child's own peak: VmHWM of its address space after execve, which the child writes at exit. Not
# wait4's ru_maxrss: Linux carries the spawning process's RSS high-water mark across fork + execve into
# the child's ru_maxrss (a child of a benchmark process that held GBs reports GBs whatever it does).
PEAK_LAUNCHER = """import atexit, runpy, sys
out = sys.argv.pop(1)
def peak():
    kb = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    open(out, "w").write(kb)
atexit.register(peak)
runpy.run_module("llavadi.cli", run_name="__main__", alter_sys=True)
"""


def run_cli_peak(args: list, log_dir, env: dict) -> dict:
    """``python -m llavadi.cli *args`` in a child process (through :data:`PEAK_LAUNCHER`), run by
    ``benchmarks/ingest.run_measured`` (stdout/stderr into ``log_dir``; raises on a non-zero exit).
    Returns ``wall_s``, ``peak_rss_mb`` = the child's own ``VmHWM`` at exit, ``tree_rss_polled_mb`` = the
    process tree's RSS polled every 0.05 s, and the child's ``stdout``."""
    import sys
    from pathlib import Path

    from ingest import run_measured  # benchmarks/ingest.py

    hwm = Path(log_dir) / "vmhwm_kb"
    r = run_measured([sys.executable, "-c", PEAK_LAUNCHER, str(hwm), *map(str, args)], Path(log_dir), env)
    return {"wall_s": r["wall_s"], "peak_rss_mb": int(hwm.read_text()) / 1024,
            "tree_rss_polled_mb": r["tree_rss_polled_mb"], "stdout": r["stdout"]}


class PipeWorker:
    """Driver-side handle of one persistent benchmark worker: ``python ARGV --fd N`` started with the write end
    of a pipe as fd N; the worker writes one JSON line there when ready and one per ``run ARG`` line it reads on
    stdin, and stops at ``quit``. Its stdout and stderr go to ``log``; ``name`` labels its errors. Used by
    ``regenerate.py`` and ``cache_teacher.py`` to time engines that must not share a process."""

    def __init__(self, name: str, argv: list, log, env: dict):
        import subprocess
        import sys

        self.name, self.log = name, log
        r, w = os.pipe()
        self._logf = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, *map(str, argv), "--fd", str(w)], stdin=subprocess.PIPE,
                                     stdout=self._logf, stderr=subprocess.STDOUT, pass_fds=(w,), env=env, text=True)
        os.close(w)
        self._in = os.fdopen(r, "r")
        try:
            import psutil

            self.ps = psutil.Process(self.proc.pid)
        except ImportError:  # the GPU check's bare interpreter may lack it: no idle-peer figure then
            self.ps = None

    def read(self) -> dict:
        """The worker's next JSON line; ``RuntimeError`` with the log's tail when it exited instead."""
        import json

        line = self._in.readline()
        if not line:
            self.proc.wait()
            tail = self.log.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{self.name} worker exited {self.proc.returncode}:\n{tail}")
        return json.loads(line)

    def cpu_s(self) -> float:
        if self.ps is None:
            return 0.0
        t = self.ps.cpu_times()
        return t.user + t.system

    def run(self, arg: str = "", peers: list = ()) -> dict:
        """One timed run; also the CPU seconds the other (idle) workers used meanwhile (≈ 0: one side computes
        at a time) and the 1-min load average before and after."""
        others = [p for p in peers if p is not self]
        peer_c0 = sum(p.cpu_s() for p in others)
        load0 = os.getloadavg()[0]
        self.proc.stdin.write(f"run {arg}\n")
        self.proc.stdin.flush()
        res = self.read()
        res["loadavg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]  # before, after
        res["idle_peer_cpu_s"] = round(sum(p.cpu_s() for p in others) - peer_c0, 2)
        return res

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
        except Exception:  # noqa: BLE001
            self.proc.kill()
            self.proc.wait()
        finally:
            self._in.close()
            self._logf.close()
