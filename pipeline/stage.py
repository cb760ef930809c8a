"""What a stage is, for the runtime: a typed config section plus one function that processes
one shard (design §8). The runner (``pipeline.runner``) owns everything else: fingerprints,
locks, skipping done shards, executors, completion markers, status.
"""
from __future__ import annotations

import errno
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

from . import atomic, faults
from .config import LlavadiConfig
from .rundir import StageDir, write_done


class StageError(RuntimeError):
    """A stage-level problem found before work starts; the message says what to do."""


@dataclass
class StageContext:
    """Everything a worker needs to process a shard; picklable (shipped to Ray actors)."""

    run_dir: Path
    stage: StageDir
    cfg: LlavadiConfig
    fingerprint: str
    upstream: Optional[StageDir] = None


@dataclass
class ShardTask:
    index: int
    payload: Any = None


@dataclass
class ShardOutput:
    """What ``Stage.process`` returns: the data file it committed and the counts.

    ``counts`` = {"in": int, "out": int, "rejected": {reason: int}} (+ stage-specific keys).
    """

    data_file: Optional[Path]
    counts: dict
    stats: dict = field(default_factory=dict)


@dataclass
class ShardResult:
    index: int
    ok: bool
    counts: Optional[dict] = None
    error: Optional[str] = None
    seconds: float = 0.0


class Stage(Protocol):
    name: str  # CLI name, e.g. "ingest"
    dir_name: str  # run-dir subdirectory, e.g. "data"
    ext: str  # data-file extension
    upstream: Optional[str]  # run-dir subdirectory it reads, or None

    def material(self, cfg: LlavadiConfig, run_dir: Path) -> dict:
        """Everything that determines the stage's output bytes (its fingerprint material)."""

    def preflight(self, cfg: LlavadiConfig, run_dir: Path) -> list[str]:
        """Stage-level problems found before any work starts (each names its fix)."""

    def plan(self, ctx: StageContext, is_done: Callable[[int], bool]) -> Iterator[ShardTask | int]:
        """Yield a ``ShardTask`` per shard still to do, or the bare index of a done shard."""

    def setup(self, ctx: StageContext) -> Any:
        """Per-worker state (e.g. a loaded model); called once per worker."""

    def process(self, ctx: StageContext, state: Any, task: ShardTask) -> ShardOutput:
        """Produce shard ``task.index``: commit the data file and rejects (atomic writes)."""

    def cleanup(self, ctx: StageContext, task: ShardTask) -> None:
        """Remove scratch inputs of a shard once it is done."""


def execute_shard(stage: Stage, ctx: StageContext, state: Any, task: ShardTask) -> ShardResult:
    """Run one shard and write its ``_done`` marker last. An exception fails this shard only;
    a dying process is the executor's business (retry)."""
    t0 = time.time()
    # a retried shard may have finished already: its worker died after writing the done marker
    # but before the driver got the result. Execution is at-least-once; the marker makes it once.
    if ctx.stage.is_done(task.index, ctx.fingerprint):
        return ShardResult(task.index, True, counts=ctx.stage.read_done(task.index).get("counts", {}))
    try:
        faults.set_current(stage.name, task.index)
        if ctx.upstream is not None and task.payload == str(ctx.upstream.data_file(task.index)):
            ctx.upstream.verify_shard(task.index)  # the upstream shard read is the one that was written
        faults.maybe_inject(stage.name, task.index, "start")
        out = stage.process(ctx, state, task)
        faults.maybe_inject(stage.name, task.index, "before-done")
        seconds = time.time() - t0
        atomic.write_json(ctx.stage.stats_file(task.index), {
            **out.stats, "seconds": round(seconds, 4), "host": socket.gethostname(), "pid": os.getpid()})
        write_done(ctx.stage, task.index, fingerprint=ctx.fingerprint, counts=out.counts, data_file=out.data_file)
        stage.cleanup(ctx, task)
        return ShardResult(task.index, True, counts=out.counts, seconds=seconds)
    except Exception as e:  # noqa: BLE001 - one bad shard must not stop the others
        tb = traceback.format_exc(limit=6)
        hint = ""
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = f" — disk full under {ctx.stage.path}: free space there, then rerun the same command"
        return ShardResult(task.index, False, error=f"{type(e).__name__}: {e}{hint}\n{tb}", seconds=time.time() - t0)
    finally:
        faults.set_current(None, None)


def plan_from_upstream(ctx: StageContext, is_done: Callable[[int], bool]) -> Iterator[ShardTask | int]:
    """Shard i of a stage reads shard i of its upstream stage: one task per upstream shard."""
    for i in ctx.upstream.done_indices():
        yield i if is_done(i) else ShardTask(i, str(ctx.upstream.data_file(i)))


def teacher_resources(cfg: LlavadiConfig) -> dict:
    """Ray actors of a teacher-holding stage: ``teacher.num_actors`` engines, each with its GPUs."""
    t = cfg.teacher
    return {"num_workers": t.num_actors, "num_cpus": t.cpus_per_actor, "num_gpus": t.gpus_per_actor}


def engine_installed(engine: str, key: str) -> list[str]:
    """Preflight problem when a stage is set to the vLLM engine but vLLM is missing."""
    import importlib.util

    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        return [f"{key}=vllm but vLLM is not installed: run `make setup`, or set {key}=hf"]
    return []
