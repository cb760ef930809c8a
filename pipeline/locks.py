"""One launch per stage per run directory.

``StageLock`` creates ``<stage>/_lock.json`` with O_EXCL, holding pid, host, the process start
time and the launch time. A second launch is refused (``LockedError`` names the holder). A lock
whose process is gone — same host, pid not running, or the pid now belongs to a process started
later (pid reuse) — is stale and taken over. A lock from another host is never guessed stale:
the message says how to remove it.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

import psutil


class LockedError(RuntimeError):
    pass


def _proc_start(pid: int) -> Optional[float]:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return None


def _holder_alive(info: dict) -> bool:
    if info.get("host") != socket.gethostname():
        return True  # cannot tell: assume alive
    pid = info.get("pid")
    if not isinstance(pid, int):
        return False
    started = _proc_start(pid)
    if started is None:
        return False
    recorded = info.get("proc_start")
    # pid reuse: a process with this pid that started after the lock was written is not ours
    return recorded is None or abs(started - recorded) < 1.0


class StageLock:
    def __init__(self, lock_file: Path, stage: str):
        self.path = Path(lock_file)
        self.stage = stage
        self.info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "proc_start": _proc_start(os.getpid()),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stage": stage,
        }
        self.took_over: Optional[dict] = None

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.info, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def acquire(self) -> "StageLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._try_create():
                return self
            try:
                holder = json.loads(self.path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}  # half-written by a process killed mid-write: stale
            if holder and _holder_alive(holder):
                raise LockedError(
                    f"stage {self.stage!r} of this run is already running "
                    f"(pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started_at')}). "
                    f"Wait for it to finish. If that process is really gone, delete {self.path}.")
            # stale: move it aside atomically (only one taker wins the rename), then retry create
            aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
            try:
                os.replace(self.path, aside)
                self.took_over = holder
                aside.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
        raise LockedError(f"could not take the lock {self.path}; another launch is racing for it")

    def release(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return
        if holder.get("pid") == self.info["pid"] and holder.get("host") == self.info["host"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "StageLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
