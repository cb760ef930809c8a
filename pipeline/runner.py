"""Run one stage of one run directory: the resumable shard runner (design §3).

Order of business, so that nothing starts before every stage-level problem is known:
1. preflight (paths, upstream completion) — errors name the command that fixes them;
2. fingerprint = sha256(stage material + upstream fingerprint); a different fingerprint from
   the one recorded in ``_stage.json`` is refused naming the changed keys (``--force`` wipes
   the stage and redoes it);
3. take the stage lock (a second launch is refused; a dead holder's lock is taken over);
4. remove temporaries of writers that died, then hand not-done shards to the executor;
5. record the planned shard count; exit non-zero listing failed shards (the next launch
   retries exactly those: they have no ``_done`` marker).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from tqdm import tqdm

from . import atomic
from .config import LlavadiConfig, changed_keys, dump_yaml, fingerprint
from .executors import make_executor
from .locks import StageLock
from .rundir import StageDir, command_for
from .stage import ShardResult, ShardTask, Stage, StageContext, StageError  # noqa: F401 - StageError: re-exported


class StageFailed(RuntimeError):
    def __init__(self, stage: str, failed: list[ShardResult]):
        self.failed = failed
        lines = [f"shard {r.index:05d}: {(r.error or '').splitlines()[0] if r.error else 'failed'}" for r in failed]
        super().__init__(
            f"stage {stage!r}: {len(failed)} shard(s) failed:\n  " + "\n  ".join(lines)
            + "\nThe other shards are done. Fix the cause and rerun the same command: only these shards run again.")


@dataclass
class StageReport:
    stage: str
    fingerprint: str
    shards_total: int = 0
    shards_skipped: int = 0
    shards_run: int = 0
    counts: dict = field(default_factory=lambda: {"in": 0, "out": 0, "rejected": {}})


def stage_upstream(stage: Stage, cfg: LlavadiConfig) -> Optional[str]:
    """The run-dir subdirectory a stage reads (config-dependent for cache-teacher's source)."""
    fn = getattr(stage, "upstream_for", None)
    return fn(cfg) if fn else stage.upstream


def stage_ext(stage: Stage, cfg: LlavadiConfig) -> str:
    fn = getattr(stage, "ext_for", None)
    return fn(cfg) if fn else stage.ext


def upstream_fingerprint(stage: Stage, run_dir: Path, cfg: LlavadiConfig) -> Optional[str]:
    upstream = stage_upstream(stage, cfg)
    if upstream is None:
        return None
    up = StageDir(run_dir, upstream)
    m = up.read_manifest()
    cmd = command_for(upstream)
    if m is None:
        raise StageError(f"{stage.name} reads {up.path}, which does not exist yet: "
                         f"run `llavadi {cmd} {run_dir}` first")
    if not m.get("complete"):
        raise StageError(f"{stage.name} needs every shard of {upstream}/ done "
                         f"({len(up.done_indices())}/{m.get('shards_total', '?')} are): "
                         f"rerun `llavadi {cmd} {run_dir}` until it finishes")
    return m["fingerprint"]


def _add_counts(total: dict, c: dict) -> None:
    for k, v in c.items():
        if isinstance(v, dict):
            sub = total.setdefault(k, {})
            for kk, vv in v.items():
                sub[kk] = sub.get(kk, 0) + vv
        elif isinstance(v, (int, float)):
            total[k] = total.get(k, 0) + v


def write_run_config(run_dir: Path, cfg: LlavadiConfig) -> None:
    atomic.write_bytes(run_dir / "config.yaml", dump_yaml(cfg).encode())


def run_stage(stage: Stage, run_dir: Path | str, cfg: LlavadiConfig, *, force: bool = False,
              progress: bool = True) -> StageReport:
    run_dir = Path(run_dir)
    problems = list(stage.preflight(cfg, run_dir))
    try:
        up_fp = upstream_fingerprint(stage, run_dir, cfg)
    except StageError as e:
        problems.append(str(e))
    if problems:  # every stage-level problem at once, before any work or model load
        raise StageError(f"{stage.name}: cannot start:\n  " + "\n  ".join(problems))
    material = stage.material(cfg, run_dir)
    fp = fingerprint(material, up_fp)
    sd = StageDir(run_dir, stage.dir_name, stage_ext(stage, cfg))
    upstream = stage_upstream(stage, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)

    with StageLock(sd.lock_file, stage.name):
        manifest = sd.read_manifest()
        if manifest is not None and manifest.get("fingerprint") != fp and not force:
            keys = changed_keys(manifest.get("material", {}), material)
            if manifest.get("upstream_fingerprint") != up_fp:
                keys.append(f"(upstream stage {upstream}/ was redone)")
            raise StageError(
                f"{stage.name}: the config differs from the one {sd.path} was made with; changed: "
                f"{', '.join(keys) or '(unknown)'}. Revert the change, use a new run directory, or pass "
                f"--force to delete this stage's outputs and redo it.")
        if force:
            sd.wipe()
            manifest = None
        sd.mkdirs()
        atomic.remove_stale_tmp(sd.path)
        manifest = {"stage": stage.name, "fingerprint": fp, "upstream_fingerprint": up_fp, "material": material,
                    "shards_total": (manifest or {}).get("shards_total"), "complete": False}
        sd.write_manifest(manifest)
        write_run_config(run_dir, cfg)

        ctx = StageContext(run_dir=run_dir, stage=sd, cfg=cfg, fingerprint=fp,
                           upstream=StageDir(run_dir, upstream) if upstream else None)
        report = StageReport(stage.name, fp)
        failed: list[ShardResult] = []
        bar = tqdm(desc=f"{stage.name}", unit="shard", disable=not progress, file=sys.stderr, dynamic_ncols=True)

        def tasks() -> Iterator[ShardTask]:
            for item in stage.plan(ctx, lambda i: sd.is_done(i, fp)):
                report.shards_total += 1
                if isinstance(item, ShardTask):
                    yield item
                else:  # a done shard: skipped, its counts still belong to the report
                    report.shards_skipped += 1
                    d = sd.read_done(item)
                    if d:
                        _add_counts(report.counts, d["counts"])
                    bar.update(1)
            bar.total = report.shards_total
            bar.refresh()

        for res in make_executor(cfg.run).run(stage, ctx, tasks()):
            report.shards_run += 1
            bar.update(1)
            if res.ok:
                _add_counts(report.counts, res.counts or {})
                bar.set_postfix(out=report.counts.get("out", 0), rejected=sum(report.counts.get("rejected", {}).values()))
            else:
                failed.append(res)
                bar.write(f"[{stage.name}] shard {res.index:05d} FAILED: {res.error}")
        bar.close()

        manifest["shards_total"] = report.shards_total
        complete = not failed and len(sd.done_indices()) >= report.shards_total
        if complete and hasattr(stage, "finalize"):
            stage.finalize(ctx)  # stage-wide outputs (e.g. the cache's index.json); idempotent
        manifest["complete"] = complete
        sd.write_manifest(manifest)
        if failed:
            raise StageFailed(stage.name, sorted(failed, key=lambda r: r.index))
        return report
