"""Executors: run shard tasks of a stage and report results as they finish.

- ``LocalExecutor``: in-process, one shard after another (debugging, fast tests). Same bytes
  as Ray: both call ``stage.execute_shard``.
- ``RayExecutor``: ``run.num_workers`` Ray actors, each calling ``stage.setup`` once (a model
  loads once per actor) and then taking shards. An actor that dies (OOM kill, pre-emption,
  node loss) is replaced and its shard retried up to ``run.max_retries`` times (only the shard
  that was running is charged a retry; shards queued behind it go again freely); an exception
  inside a shard is a result, not a death, and is not retried here (the next launch retries).
  Shards go only to actors that are placed and set up, so a replacement waiting for resources
  after a node loss holds no work. Tasks are pulled from the stage's plan lazily, at most 2 per
  actor in flight, so the driver's memory stays flat however many shards there are.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from collections import deque
from typing import Any, Iterable, Iterator, Optional

from .config import RunConfig
from .stage import ShardResult, ShardTask, Stage, StageContext, StageError, execute_shard

log = logging.getLogger("llavadi")


class LocalExecutor:
    def __init__(self, run_cfg: RunConfig):
        self.run_cfg = run_cfg

    def run(self, stage: Stage, ctx: StageContext, tasks: Iterable[ShardTask]) -> Iterator[ShardResult]:
        worker = None
        for task in tasks:
            if worker is None:
                worker = _Worker(stage, ctx)
            yield worker.run(task)


def _ray_env_vars() -> dict[str, str]:
    """Variables workers must see: our fault-injection knobs and vLLM/torch settings."""
    keep = ("LLAVADI_", "VLLM_", "OMP_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")
    return {k: v for k, v in os.environ.items() if k.startswith(keep)}


def ray_target(run_cfg: RunConfig) -> tuple[Optional[str], str]:
    """(the cluster address to join — None: start an embedded cluster —, where it comes from).

    Every way a Ray user names a cluster (issue #22): ``--ray-address`` / ``run.ray_address``
    (a ``host:port``, or ``auto`` = the cluster running on this machine), else
    ``RAY_ADDRESS`` (what ``ray job submit`` sets for its entrypoint), else an embedded cluster.
    ``local`` forces the embedded one even when ``RAY_ADDRESS`` is set."""
    addr = (run_cfg.ray_address or "").strip()
    if addr == "local":
        return None, "run.ray_address=local"
    if addr:
        return addr, "--ray-address / run.ray_address"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and env != "local":
        return env, "the RAY_ADDRESS environment variable"
    return None, "no address given"


def init_ray(run_cfg: RunConfig) -> bool:
    """Attach this driver to Ray; returns True when this call connected it (the caller then
    disconnects), False when the driver was already attached (a program that called ``ray.init``
    itself: its cluster and connection are left alone).

    Joining a cluster passes no resources (Ray refuses ``num_cpus`` when connecting: the cluster's
    nodes declare theirs); the embedded cluster is started with ``address="local"`` and
    ``run.num_cpus``, so a cluster left running on this machine is never joined by accident.
    ``StageError`` when the named cluster cannot be reached."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    addr, source = ray_target(run_cfg)
    if addr is None:
        ray.init(address="local", num_cpus=run_cfg.num_cpus, **kwargs)
        return True
    kwargs.pop("include_dashboard")  # a cluster's own setting
    try:
        ray.init(address=addr, **kwargs)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
        raise StageError(
            f"cannot join the Ray cluster {addr!r} (from {source}): {type(e).__name__}: {str(e).strip()[:500]}\n"
            f"Start it (`ray start --head` on its head node), correct the address, or give none to run an "
            f"embedded cluster (unset RAY_ADDRESS, or pass --ray-address local).") from None
    return True


class _Worker:
    """Body of the Ray actor (wrapped with ``ray.remote`` lazily so importing this module
    does not import Ray)."""

    def __init__(self, stage: Stage, ctx: StageContext):
        self.stage, self.ctx = stage, ctx
        self.setup_error = None
        try:
            self.state = stage.setup(ctx)
        except Exception as e:  # noqa: BLE001 - reported per shard, not retried (it would fail again)
            import traceback

            self.setup_error = f"worker setup failed: {type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"

    def run(self, task: ShardTask) -> ShardResult:
        if self.setup_error:
            return ShardResult(task.index, False, error=self.setup_error)
        return execute_shard(self.stage, self.ctx, self.state, task)


def worker_resources(stage: Stage, ctx: StageContext) -> dict:
    """Actors and their Ray resources: the stage's own (model stages: ``teacher.num_actors``,
    GPUs per actor) or the run defaults."""
    fn = getattr(stage, "resources", None)
    if fn is not None:
        return fn(ctx.cfg)
    r = ctx.cfg.run
    return {"num_workers": r.num_workers, "num_cpus": r.cpus_per_worker, "num_gpus": 0}


class RayExecutor:
    def __init__(self, run_cfg: RunConfig):
        self.run_cfg = run_cfg

    def run(self, stage: Stage, ctx: StageContext, tasks: Iterable[ShardTask]) -> Iterator[ShardResult]:
        import ray
        from ray.exceptions import RayActorError, WorkerCrashedError, ObjectLostError, NodeDiedError

        started = init_ray(self.run_cfg)
        res = worker_resources(stage, ctx)
        try:
            # env vars travel with the actors, so workers see them however the driver attached
            # (an embedded cluster, a joined one, or a ray.init the caller made)
            actor_cls = ray.remote(num_cpus=res["num_cpus"], num_gpus=res["num_gpus"], max_restarts=0,
                                   runtime_env={"env_vars": _ray_env_vars()})(_Worker)
            it = iter(tasks)
            pending: deque[ShardTask] = deque()  # retries go first
            attempts: dict[int, int] = {}
            in_flight: dict[Any, tuple[Any, ShardTask, int]] = {}  # ref -> (actor, task, submission no.)
            submitted = itertools.count()
            starting: dict[Any, Any] = {}  # __ray_ready__ ref -> actor not placed / set up yet
            actors: list[Any] = []
            ready: set[Any] = set()
            load: dict[Any, int] = {}
            exhausted = False
            waited_since = None
            start_deaths = 0

            def new_actor():
                a = actor_cls.remote(stage, ctx)
                actors.append(a)
                load[a] = 0
                starting[a.__ray_ready__.remote()] = a

            def drop(actor):
                if actor in actors:
                    actors.remove(actor)
                    load.pop(actor, None)
                    ready.discard(actor)
                    try:
                        ray.kill(actor)
                    except Exception:  # noqa: BLE001
                        pass

            def next_task():
                nonlocal exhausted
                if pending:
                    return pending.popleft()
                if exhausted:
                    return None
                try:
                    return next(it)
                except StopIteration:
                    exhausted = True
                    return None

            def fill():
                # Shards go only to actors that are placed and set up: after a node is lost, a
                # replacement may wait for resources that never come back, and shards queued on
                # it would wait with it while the surviving actors sit idle.
                while True:
                    if len(actors) < res["num_workers"] and (pending or not exhausted):
                        new_actor()
                    free = [a for a in actors if a in ready and load[a] < 2]
                    if not free:
                        return
                    task = next_task()
                    if task is None:
                        return
                    a = min(free, key=lambda x: load[x])
                    ref = a.run.remote(task)
                    load[a] += 1
                    in_flight[ref] = (a, task, next(submitted))

            def work_left():
                return bool(in_flight) or bool(pending) or not exhausted

            fill()
            while in_flight or (starting and work_left()):
                done, _ = ray.wait(list(in_flight) + list(starting), num_returns=1, timeout=60)
                if not done:
                    if not in_flight:
                        waited_since = waited_since or time.time()
                        log.warning("waiting %.0f s for cluster resources to start %d worker(s) (%s each)",
                                    time.time() - waited_since, len(starting), res)
                    continue
                waited_since = None
                ref = done[0]
                if ref in starting:
                    actor = starting.pop(ref)
                    try:
                        ray.get(ref)
                        ready.add(actor)
                    except (RayActorError, WorkerCrashedError, ObjectLostError, NodeDiedError) as e:
                        drop(actor)
                        start_deaths += 1
                        if start_deaths > (self.run_cfg.max_retries + 1) * res["num_workers"]:
                            raise RuntimeError(f"{start_deaths} workers died while starting (last: {e}); check "
                                               f"the workers' logs (out of memory? a node lost?) and rerun") from e
                        log.warning("a worker died while starting (%s); starting another", type(e).__name__)
                    fill()
                    continue
                actor, task, seq = in_flight.pop(ref)
                load[actor] = max(0, load.get(actor, 1) - 1)
                try:
                    yield ray.get(ref)
                except (RayActorError, WorkerCrashedError, ObjectLostError, NodeDiedError) as e:
                    # The process died: every shard sent to it comes back. Ray runs an actor's tasks
                    # in order, so the oldest unfinished one was running and takes the blame (a retry
                    # counts against it); the others were only queued behind it and go again freely.
                    lost = [(seq, task)]
                    for r in [r for r, (a, _, _) in in_flight.items() if a is actor]:
                        _, t, s = in_flight.pop(r)
                        lost.append((s, t))
                    lost = [t for _, t in sorted(lost, key=lambda x: x[0])]
                    drop(actor)
                    blamed = next((t for t in lost if not ctx.stage.is_done(t.index, ctx.fingerprint)), None)
                    for t in reversed(lost):
                        if t is blamed:
                            continue
                        pending.appendleft(t)
                    if blamed is not None:
                        n = attempts.get(blamed.index, 0) + 1
                        attempts[blamed.index] = n
                        if n <= self.run_cfg.max_retries:
                            log.warning("shard %05d: worker died (%s); retry %d/%d", blamed.index,
                                        type(e).__name__, n, self.run_cfg.max_retries)
                            pending.append(blamed)
                        else:
                            yield ShardResult(blamed.index, False, error=f"worker died {n} times: {e}")
                fill()
            for a in actors:
                ray.kill(a)
        finally:
            if started:
                ray.shutdown()


def make_executor(run_cfg: RunConfig):
    return RayExecutor(run_cfg) if run_cfg.executor == "ray" else LocalExecutor(run_cfg)
