"""The ``llavadi`` command (typer). Thin: parse, resolve the config, call the pipeline.

Every stage command takes the run directory, optional ``--config FILE`` and ``key=value``
overrides (``ingest.shard_size=500``), ``--executor ray|local``, ``--ray-address``, ``--force``
and ``--dry-run`` (print the resolved config and stop).
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .pipeline.config import ConfigError, dump_yaml
from .pipeline.locks import LockedError
from .pipeline.runner import StageError, StageFailed, run_stage
from .pipeline.session import resolve
from .pipeline import remote, status as status_mod

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Offline, staged knowledge distillation for LLaVA-style multimodal LLMs.")

def _run_dir(value: Path) -> Path:
    """A run directory: a local path or a file:// URL (Path() has folded its '//'). Object-store
    URLs are refused: shards are committed by atomic rename, which they lack."""
    text = str(value)
    if text.startswith("file:"):
        return Path("/" + text[len("file:"):].lstrip("/"))
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.\-]*:/", text):
        raise typer.BadParameter(
            f"{text.split(':')[0]}:// run directories are not supported: shards are committed by atomic rename, "
            "which object stores lack. Use a local, NFS or FUSE-mounted path; to train from a cache in a "
            "bucket use train_student.cache_from=URL")
    return value


RunArg = typer.Argument(..., help="run directory (created if missing; a path or file:// URL)", callback=_run_dir)
OverridesArg = typer.Argument(None, help="config overrides key=value, e.g. ingest.shard_size=500")
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (sections per stage)")
ExecutorOpt = typer.Option(None, "--executor", help="ray (default) or local (in-process)")
RayAddrOpt = typer.Option(None, "--ray-address", help="join an existing Ray cluster")
ForceOpt = typer.Option(False, "--force", help="delete this stage's outputs and redo it")
DryRunOpt = typer.Option(False, "--dry-run", help="print the resolved config and exit")


def _fail(msg: str, code: int) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _run_flags(executor: Optional[str], ray_address: Optional[str]) -> list[str]:
    flags = []
    if executor:
        flags.append(f"run.executor={executor}")
    if ray_address:
        flags.append(f"run.ray_address={ray_address}")
    return flags


def _teacher_flags(teacher: Optional[str], engine_key: str, engine: Optional[str]) -> list[str]:
    flags = []
    if teacher:
        flags.append("teacher.model=" + json.dumps(os.path.abspath(teacher)))
    if engine:
        flags.append(f"{engine_key}={engine}")
    return flags


def _progress() -> bool:
    return sys.stderr.isatty() or bool(os.environ.get("LLAVADI_PROGRESS"))


def _resolve_or_print(run: Path, config: Optional[str], flags: list[str], overrides: Optional[list[str]],
                      dry_run: bool):
    """The resolved config, or None after printing it for ``--dry-run``; a bad config exits 2."""
    try:
        cfg = resolve(run, config, flags, overrides)
    except ConfigError as e:
        _fail(str(e), 2)
    if dry_run:
        typer.echo(dump_yaml(cfg), nl=False)
        return None
    return cfg


def _stage_command(stage, run: Path, config: Optional[str], flags: list[str], overrides: Optional[list[str]],
                   force: bool, dry_run: bool) -> None:
    """Resolve the config (stored ← --config ← flags ← overrides) and launch the stage."""
    cfg = _resolve_or_print(run, config, flags, overrides, dry_run)
    if cfg is None:
        return
    try:
        rep = run_stage(stage, run, cfg, force=force, progress=_progress())
    except (StageError, LockedError) as e:
        _fail(str(e), 2)
    except StageFailed as e:
        _fail(str(e), 1)
    rej = sum(rep.counts.get("rejected", {}).values())
    typer.echo(f"{stage.name}: {rep.shards_total} shards ({rep.shards_run} run, {rep.shards_skipped} already done); "
               f"samples in {rep.counts.get('in', 0)}, out {rep.counts.get('out', 0)}, rejected {rej}")


@app.command()
def ingest(run: Path = RunArg, overrides: Optional[List[str]] = OverridesArg,
           input: Optional[List[str]] = typer.Option(None, "--input", "-i", help="LLaVA .json list, .jsonl or .parquet (repeatable)"),
           image_root: Optional[str] = typer.Option(None, "--image-root", help="folder that image paths are relative to"),
           shard_size: Optional[int] = typer.Option(None, "--shard-size", help="records per shard"),
           config: Optional[str] = ConfigOpt, executor: Optional[str] = ExecutorOpt,
           ray_address: Optional[str] = RayAddrOpt, force: bool = ForceOpt, dry_run: bool = DryRunOpt) -> None:
    """Validate LLaVA-format records and write Parquet sample shards to RUN/data/."""
    from .stages.ingest import STAGE

    flags = _run_flags(executor, ray_address)
    if input:
        flags.append("ingest.inputs=" + json.dumps([p if remote.scheme(p) else os.path.abspath(p) for p in input]))
    if image_root:
        if remote.is_remote(image_root):
            _fail(f"--image-root {image_root}: must be a local directory or file:// URL (every stage reads the "
                  f"images; mount a bucket with a FUSE driver such as s3fs/gcsfuse)", 2)
        flags.append("ingest.image_root=" + json.dumps(os.path.abspath(remote.local_path(image_root))))
    if shard_size is not None:
        flags.append(f"ingest.shard_size={shard_size}")
    _stage_command(STAGE, run, config, flags, overrides, force, dry_run)


@app.command()
def regenerate(run: Path = RunArg, overrides: Optional[List[str]] = OverridesArg,
               teacher: Optional[str] = typer.Option(None, "--teacher", help="teacher model directory (teacher.model)"),
               engine: Optional[str] = typer.Option(None, "--engine", help="vllm (default) or hf"),
               config: Optional[str] = ConfigOpt, executor: Optional[str] = ExecutorOpt,
               ray_address: Optional[str] = RayAddrOpt, force: bool = ForceOpt, dry_run: bool = DryRunOpt) -> None:
    """Re-answer every assistant turn of RUN/data/ with the teacher (vLLM) into RUN/regenerate/."""
    from .stages.regenerate import STAGE

    flags = _run_flags(executor, ray_address) + _teacher_flags(teacher, "regenerate.engine", engine)
    _stage_command(STAGE, run, config, flags, overrides, force, dry_run)


@app.command("cache-teacher")
def cache_teacher(run: Path = RunArg, overrides: Optional[List[str]] = OverridesArg,
                  teacher: Optional[str] = typer.Option(None, "--teacher", help="teacher model directory (teacher.model)"),
                  engine: Optional[str] = typer.Option(None, "--engine", help="hf (default) or vllm"),
                  verify: Optional[int] = typer.Option(None, "--verify", help="recompute N random cached samples and report max errors"),
                  config: Optional[str] = ConfigOpt, executor: Optional[str] = ExecutorOpt,
                  ray_address: Optional[str] = RayAddrOpt, force: bool = ForceOpt, dry_run: bool = DryRunOpt) -> None:
    """Teacher-forced pass: answer-token hidden states + top-k logprobs into RUN/cache_teacher/."""
    from .stages.cache_teacher import STAGE

    flags = _run_flags(executor, ray_address) + _teacher_flags(teacher, "cache_teacher.engine", engine)
    if verify is not None:
        from .stages.cache_teacher import verify_cache

        try:
            cfg = resolve(run, config, flags, overrides)
            report = verify_cache(run, cfg, verify)
        except (ConfigError, StageError) as e:
            _fail(str(e), 2)
        typer.echo(json.dumps(report, indent=1))
        return
    _stage_command(STAGE, run, config, flags, overrides, force, dry_run)


@app.command("train-student")
def train_student(run: Path = RunArg, overrides: Optional[List[str]] = OverridesArg,
                  student: Optional[str] = typer.Option(None, "--student", help="initial student model directory"),
                  config: Optional[str] = ConfigOpt, force: bool = ForceOpt, dry_run: bool = DryRunOpt) -> None:
    """Train the student from the teacher cache (CE + KD + feature loss); resumes exactly.
    Multi-process: `torchrun --nproc-per-node N -m llavadi.cli train-student RUN`."""
    flags = []
    if student:
        flags.append("train_student.student=" + json.dumps(os.path.abspath(student)))
    cfg = _resolve_or_print(run, config, flags, overrides, dry_run)
    if cfg is None:
        return
    from .pipeline.rundir import CorruptShardError
    from .schemas.teacher_cache import CacheCorruptError
    from .stages.train_student.loop import train

    try:
        res = train(run, cfg, force=force, progress=_progress())
    except (StageError, LockedError) as e:
        _fail(str(e), 2)
    except CorruptShardError as e:
        _fail(f"train-student stopped on a corrupt input: {e} Training resumes from its last checkpoint.", 1)
    except CacheCorruptError as e:
        _fail(f"train-student stopped on a corrupt teacher cache: {e}\nDelete that shard's marker in "
              f"{Path(run) / 'cache_teacher' / '_done'}/ and rerun `llavadi cache-teacher` on this run (it rebuilds "
              f"only that shard), then this command: training resumes from its last checkpoint.", 1)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"train-student: {res['steps']} steps; final checkpoint {res['final_checkpoint']}; "
                   f"samples used {res['scan']['valid']}, rejected {sum(res['scan']['rejected'].values())}")


@app.command("eval")
def eval_cmd(run: Path = RunArg, overrides: Optional[List[str]] = OverridesArg,
             model: Optional[str] = typer.Option(None, "--model", help="model directory to evaluate (teacher or student)"),
             data: Optional[str] = typer.Option(None, "--data", help="held-out LLaVA .json/.jsonl with reference answers"),
             image_root: Optional[str] = typer.Option(None, "--image-root", help="image folder of --data (eval.image_root; default: RUN's ingest.image_root)"),
             cache: Optional[str] = typer.Option(None, "--cache", help="held-out teacher cache dir (KL, perplexity)"),
             cache_image_root: Optional[str] = typer.Option(None, "--cache-image-root", help="image folder of --cache's samples (eval.cache_image_root; default: the cache run's ingest.image_root)"),
             name: Optional[str] = typer.Option(None, "--name", help="result name (eval/<name>.json)"),
             engine: Optional[str] = typer.Option(None, "--engine", help="hf (default) or vllm"),
             config: Optional[str] = ConfigOpt) -> None:
    """Accuracy on held-out questions and KL-to-teacher / perplexity on a held-out cache."""
    from .stages.eval import EvalError, evaluate, preflight, summary

    flags = []
    for key, val in (("eval.data", data), ("eval.image_root", image_root), ("eval.cache", cache),
                     ("eval.cache_image_root", cache_image_root)):
        if val:
            flags.append(f"{key}=" + json.dumps(os.path.abspath(val)))
    if engine:
        flags.append(f"eval.engine={engine}")
    try:
        cfg = resolve(run, config, flags, overrides)
    except ConfigError as e:
        _fail(str(e), 2)
    problems = preflight(cfg, model)
    if problems:
        _fail("eval: cannot start:\n  " + "\n  ".join(problems), 2)
    try:
        res = evaluate(run, cfg, model, name)
    except EvalError as e:
        _fail(str(e), e.exit_code)
    typer.echo(summary(res, run))
    if res.get("problems"):
        _fail("; ".join(res["problems"]), 1)


@app.command()
def status(run: Path = RunArg, as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Per stage: shards done/total, samples in/out/rejected (by reason)."""
    if not run.exists():
        _fail(f"{run} does not exist", 2)
    st = status_mod.collect(run)
    typer.echo(json.dumps(st, indent=1) if as_json else status_mod.render(st))


@app.command()
def demo(run_dir: Path = typer.Option(Path("demo"), "--run-dir", help="where the demo run lives"),
         quick: bool = typer.Option(False, "--quick", help="smaller sizes (≤ 5 min)"),
         profile: Optional[str] = typer.Option(None, "--profile", hidden=True, help="default | quick | smoke"),
         executor: Optional[str] = ExecutorOpt) -> None:
    """The whole pipeline on tiny local models and synthetic visual-QA data (offline), with the
    study's ablation arms; prints a table and writes RUN_DIR/report.md + report.png."""
    from .stages.demo.run import run_demo

    try:
        run_demo(run_dir, quick=quick, executor=executor or "ray", profile=profile)
    except (StageError, LockedError, ConfigError) as e:
        _fail(str(e), 2)
    except StageFailed as e:
        _fail(str(e), 1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
