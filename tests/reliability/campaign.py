"""Helpers of the reliability suite: launch a ``llavadi`` command, SIGKILL it at a chosen moment,
relaunch until it completes."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


def launch(args: list, env: dict | None = None) -> subprocess.Popen:
    """``python -m llavadi.cli ARGS`` in its own session (so a kill reaches everything it started)."""
    return subprocess.Popen([sys.executable, "-m", "llavadi.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True, text=True,
                            env={**os.environ, **(env or {})})


def kill_at(args: list, reached: Callable[[], bool], delay: float, timeout: float = 600,
            env: dict | None = None) -> int:
    """Launch; once ``reached()`` holds, wait ``delay`` s more and SIGKILL the process group.
    Returns the exit status (``-SIGKILL`` when the kill landed, 0 when it finished first)."""
    proc = launch(args, env)
    t0 = time.time()
    fire_at = None
    while proc.poll() is None and time.time() - t0 < timeout:
        now = time.time()
        if fire_at is None and reached():
            fire_at = now + delay
        if fire_at is not None and now >= fire_at:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    else:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"llavadi {args[0]}: no kill moment within {timeout} s")
    rc = proc.wait()
    err = proc.stderr.read()
    proc.stderr.close()
    if rc not in (0, -signal.SIGKILL):
        raise AssertionError(f"llavadi {args[0]} exited {rc} (not killed):\n{err[-3000:]}")
    return rc


@dataclass
class Campaign:
    """``kills`` SIGKILLs at random moments (seeded): moment ``j`` is when the stage's progress
    counter first reaches ``targets[j]`` (sorted draws from ``[0, units)``, so every launch
    can make progress) plus a random delay of up to ``unit_s`` (so kills land anywhere inside a
    unit of work: mid-shard, mid-step, during start-up or the commit)."""

    args: list
    progress: Callable[[], int]
    units: int
    unit_s: float
    seed: int
    kills: int = 10
    env: dict = field(default_factory=dict)
    log: list = field(default_factory=list)

    def run(self) -> list:
        rng = random.Random(self.seed)
        targets = sorted(rng.randrange(0, max(1, self.units)) for _ in range(self.kills))
        for target in targets:
            delay = rng.uniform(0.0, self.unit_s)
            rc = kill_at(self.args, lambda: self.progress() >= target, delay, env=self.env)
            self.log.append({"target": target, "delay_s": round(delay, 3), "rc": rc, "progress": self.progress()})
            if rc == 0:
                break
        return self.log

    @property
    def killed(self) -> int:
        return sum(e["rc"] == -signal.SIGKILL for e in self.log)


def count_files(d: Path, pattern: str) -> Callable[[], int]:
    return lambda: len(list(d.glob(pattern))) if d.exists() else 0


def count_lines(f: Path) -> Callable[[], int]:
    def n() -> int:
        try:
            return f.read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0
    return n
