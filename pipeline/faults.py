"""Fault injection for tests of the crash/retry paths (never active unless the env var is set).

``LLAVADI_FAULTS`` holds comma-separated ``STAGE:SHARD:KIND[:POINT]`` items; ``SHARD`` may be ``*``
(every shard). Points: ``start`` (default, before the shard's work), ``before-done`` (its data
file is in place, its ``_done`` marker not yet), ``commit`` (inside every atomic file commit of
that shard, before the rename). Kinds:

- ``exit``: the worker process dies (``os._exit(137)``, as a killed/pre-empted worker would);
- ``raise``: the shard raises;
- ``enospc``: ``OSError(ENOSPC)``, as a full disk does;
- ``sleepS``: sleep ``S`` seconds (e.g. ``sleep0.5``) — slows shards so a test can act mid-stage;
- ``hang``: write this process's pid to ``$LLAVADI_FAULT_ONCE_DIR/STAGE-SHARD.pid`` and sleep
  (up to 10 min) — for a test that kills the worker from outside.

With ``LLAVADI_FAULT_ONCE_DIR=DIR`` each fault fires once (a marker file in DIR records it), so a
retry of the same shard succeeds.
"""
from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Optional

ENV = "LLAVADI_FAULTS"
ONCE_ENV = "LLAVADI_FAULT_ONCE_DIR"

_current: Optional[tuple[str, int]] = None  # (stage, shard) being executed in this process


class InjectedFault(RuntimeError):
    pass


def set_current(stage: Optional[str], shard: Optional[int]) -> None:
    """The shard this process is executing (for faults at points inside shared helpers)."""
    global _current
    _current = None if stage is None else (stage, int(shard))


def maybe_inject_current(point: str) -> None:
    if _current is not None and os.environ.get(ENV):
        maybe_inject(_current[0], _current[1], point)


def maybe_inject(stage: str, shard: int, point: str = "start") -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) < 3:
            continue
        st, sh, kind = parts[0], parts[1], parts[2]
        at = parts[3] if len(parts) > 3 else "start"
        if st != stage or sh not in (str(shard), "*") or at != point:
            continue
        once = os.environ.get(ONCE_ENV)
        if once:
            marker = Path(once) / f"{stage}-{shard}-{kind}-{at}"
            if marker.exists():
                continue
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("fired\n")
        if kind == "exit":
            os._exit(137)
        if kind == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected: stage {stage} shard {shard})")
        if kind.startswith("sleep"):
            time.sleep(float(kind[len("sleep"):] or 1))
            continue
        if kind == "hang":
            pid_file = Path(once or ".") / f"{stage}-{shard}.pid"
            pid_file.write_text(str(os.getpid()))
            time.sleep(600)
            continue
        raise InjectedFault(f"injected fault in stage {stage} shard {shard} at {point}")
