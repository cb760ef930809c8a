"""Fault injection for tests of the crash/retry paths (never active unless the env var is set).

``LLAVADI_FAULTS="ingest:3:exit,ingest:5:raise"`` — at the start of shard 3 of stage ``ingest``
the worker process dies (``os._exit``, as a killed/pre-empted worker would); shard 5 raises.
With ``LLAVADI_FAULT_ONCE_DIR=DIR`` each fault fires once (a marker file in DIR records it), so a
retry of the same shard succeeds.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV = "LLAVADI_FAULTS"
ONCE_ENV = "LLAVADI_FAULT_ONCE_DIR"


class InjectedFault(RuntimeError):
    pass


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
        if st != stage or sh != str(shard) or at != point:
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
        raise InjectedFault(f"injected fault in stage {stage} shard {shard} at {point}")
