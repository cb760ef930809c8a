"""Helpers of the reliability suite: launch a ``llavadi`` command, SIGKILL it at a chosen moment,
relaunch until it completes."""
from __future__ import annotations

import json
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


def kill_at(args: list, reached: Callable[[subprocess.Popen], bool], delay: float, timeout: float = 600,
            env: dict | None = None, cap: Callable[[], bool] | None = None) -> int:
    """Launch; once ``reached(proc)`` holds, wait ``delay`` s more and SIGKILL the process group —
    at once, whatever the delay, when ``cap()`` holds first. Returns the exit status (``-SIGKILL``
    when the kill landed, 0 when it finished first)."""
    proc = launch(args, env)
    t0 = time.time()
    fire_at = None
    while proc.poll() is None and time.time() - t0 < timeout:
        now = time.time()
        if fire_at is None and reached(proc):
            fire_at = now + delay
        if (fire_at is not None and now >= fire_at) or (cap is not None and cap()):
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


def holds_lock(lock: Path) -> Callable[[subprocess.Popen], bool]:
    """True once the launched process holds the stage lock: its config is resolved, its
    preflight passed, and the stage is starting work (model loads, plan, shards)."""
    def check(proc: subprocess.Popen) -> bool:
        try:
            return json.loads(lock.read_text()).get("pid") == proc.pid
        except (FileNotFoundError, ValueError):
            return False
    return check


def after_new_work(lock: Path, progress: Callable[[], int]) -> Callable[[subprocess.Popen], bool]:
    """True once the launched process holds the lock and has since kept one more unit of work."""
    locked = holds_lock(lock)
    start: list[int] = []

    def check(proc: subprocess.Popen) -> bool:
        if not start:
            if not locked(proc):
                return False
            start.append(progress())
        return progress() > start[0]
    return check


@dataclass
class Campaign:
    """``kills`` SIGKILLs at random moments (seeded), alternating two kinds of moment:

    - even kills: a delay uniform in ``[0, window_s)`` after the launch takes the stage lock —
      anywhere in start-up, model load, planning or the first shard / step;
    - odd kills: a delay uniform in ``[0, unit_s)`` after the launch has kept one new unit of
      work (a shard's done marker, a checkpoint) — inside the next unit: mid-shard, mid-step, at a
      commit or a checkpoint write. These guarantee the campaign reaches into the stage's work.

    Whatever its delay, a launch is killed as soon as it has kept one new unit (even kills) or two
    (odd kills): a launch that starts faster than the reference run must not run through a fast
    stage, so the ten kills land before the stage can finish. Then the caller runs the command to
    the end."""

    args: list
    lock: Path
    progress: Callable[[], int]
    window_s: float
    unit_s: float
    seed: int
    kills: int = 10
    env: dict = field(default_factory=dict)
    log: list = field(default_factory=list)

    def run(self) -> list:
        rng = random.Random(self.seed)
        for j in range(self.kills):
            mid = j % 2 == 1
            delay = rng.uniform(0.0, self.unit_s if mid else self.window_s)
            reached = after_new_work(self.lock, self.progress) if mid else holds_lock(self.lock)
            before = self.progress()
            rc = kill_at(self.args, reached, delay, env=self.env, cap=self._units_kept(before, 2 if mid else 1))
            self.log.append({"kind": "after-work" if mid else "after-lock", "delay_s": round(delay, 3), "rc": rc,
                             "progress": [before, self.progress()]})
            if rc == 0:
                break
        return self.log

    def _units_kept(self, before: int, n: int) -> Callable[[], bool]:
        """True once progress has advanced ``n`` times since ``before`` (a unit may add more than
        1 to it: a checkpoint every 2 steps)."""
        seen = [before]

        def check() -> bool:
            p = self.progress()
            if p != seen[-1]:
                seen.append(p)
            return len(seen) - 1 >= n
        return check

    @property
    def killed(self) -> int:
        return sum(e["rc"] == -signal.SIGKILL for e in self.log)

    @property
    def killed_mid_work(self) -> int:
        """Kills of launches that had kept some new unit of work (a shard, a checkpoint) first."""
        return sum(e["rc"] == -signal.SIGKILL and e["progress"][1] > e["progress"][0] for e in self.log)


def count_files(d: Path, pattern: str) -> Callable[[], int]:
    return lambda: len(list(d.glob(pattern))) if d.exists() else 0


def timeline(args: list, lock: Path, progress: Callable[[], int], timeout: float = 900,
             env: dict | None = None) -> dict:
    """Run ``args`` uninterrupted; seconds from taking the stage lock to the first unit of work
    (``first_s``: model load / planning + one shard or step) and to the end (``work_s``)."""
    proc = launch(args, env)
    t0 = time.time()
    t_lock = t_first = None
    start = progress()
    while proc.poll() is None:
        now = time.time()
        if now - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"llavadi {args[0]} did not finish in {timeout} s")
        if t_lock is None and holds_lock(lock)(proc):
            t_lock = now
        if t_lock is not None and t_first is None and progress() > start:
            t_first = now
        time.sleep(0.005)
    err = proc.stderr.read()
    proc.stderr.close()
    if proc.returncode != 0:
        raise AssertionError(f"llavadi {args[0]} exited {proc.returncode}:\n{err[-3000:]}")
    end = time.time()
    t_lock = t_lock or t0
    t_first = t_first or end
    return {"first_s": t_first - t_lock, "work_s": end - t_lock, "units": progress() - start}


def unit_seconds(t: dict) -> float:
    """One unit of work's time in the uninterrupted run (after the first)."""
    return (t["work_s"] - t["first_s"]) / max(1, t["units"] - 1)


def kill_window(t: dict) -> float:
    """Kill delays after the lock: up to the reference run's time to its first unit of work and
    half a unit more (start-up, model load, planning, the first shard or step). Longer windows
    let a launch whose start-up happens to be quick run through most of a fast stage."""
    return t["first_s"] + 0.5 * unit_seconds(t)
