"""The ``llavadi`` command (typer). Thin: parse, resolve the config, call the pipeline.

Every stage command (``ingest``, ``regenerate``, ``cache-teacher``, ``train-student``, ``eval``)
takes the same common options, declared once in :data:`COMMON` and added to each command by
:func:`stage_command`: the run directory, ``key=value`` overrides (``ingest.shard_size=500``),
``--config FILE``, ``--executor ray|local``, ``--ray-address``, ``--force`` and ``--dry-run``
(print the resolved config and stop). Where a common option cannot apply to a command, it is
still accepted and that command's ``--help`` says what it does there (:data:`NOTES`).
The README's option listing is generated from this module (``make docs``).
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import typer

from .pipeline.config import ConfigError, LlavadiConfig, RunConfig, dump_yaml
from .pipeline.locks import LockedError
from .pipeline.runner import StageError, StageFailed, run_stage
from .pipeline.session import resolve
from .pipeline import remote, status as status_mod

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Offline, staged knowledge distillation for LLaVA-style multimodal LLMs.")

EXECUTORS = typing.get_args(typing.get_type_hints(RunConfig)["executor"])  # ("ray", "local")


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


def _key_help(key: str) -> str:
    """``"regenerate.engine: vllm (default) or hf"`` from the config's ``Literal`` and default."""
    *path, name = key.split(".")
    cls = LlavadiConfig
    for part in path:
        cls = typing.get_type_hints(cls)[part]
    default = getattr(cls(), name)
    return f"{key}: " + " or ".join(c + " (default)" * (c == default)
                                    for c in typing.get_args(typing.get_type_hints(cls)[name]))


def _executor(value: Optional[str]) -> Optional[str]:
    if value is not None and value not in EXECUTORS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(EXECUTORS)}")
    return value


# ------------------------------------------------------------------ the common options, once
# (parameter name, annotation, factory(help) -> typer parameter, help). Order = order in --help.
COMMON: tuple = (
    ("run", Path, lambda h: typer.Argument(..., help=h, callback=_run_dir, metavar="RUN"),
     "run directory (created if missing; a path or file:// URL)"),
    ("overrides", Optional[List[str]], lambda h: typer.Argument(None, help=h, metavar="[KEY=VALUE]..."),
     "config overrides key=value, e.g. ingest.shard_size=500 (applied last)"),
    ("config", Optional[str], lambda h: typer.Option(None, "--config", "-c", help=h, metavar="FILE"),
     "YAML config, one section per stage (merged over RUN/config.yaml)"),
    ("executor", Optional[str], lambda h: typer.Option(None, "--executor", help=h, metavar="NAME", callback=_executor),
     _key_help("run.executor") + "; ray = Ray actors, local = in-process, one shard after another"),
    ("ray_address", Optional[str], lambda h: typer.Option(None, "--ray-address", help=h, metavar="ADDR"),
     "run.ray_address: join this Ray cluster (host:port, or auto: the one running here; default: $RAY_ADDRESS if set, else start an embedded one; local: embedded)"),
    ("force", bool, lambda h: typer.Option(False, "--force", help=h),
     "delete this stage's outputs and redo it"),
    ("dry_run", bool, lambda h: typer.Option(False, "--dry-run", help=h),
     "print the resolved config and exit (no work, nothing written)"),
)
COMMON_NAMES = tuple(c[0] for c in COMMON)

# The help of a common option on a command where its general meaning cannot apply (replaces
# the general help there; the README's option listing shows these too).
_IN_PROCESS = "{opt} of the stages launched after this one: {cmd} itself runs in this process{where}, never on Ray"
NOTES: dict[str, dict[str, str]] = {
    "train-student": {
        "executor": _IN_PROCESS.format(opt="run.executor", cmd="train-student", where=" (or its torchrun ranks)")
                    + "; validated and stored in RUN/config.yaml",
        "ray_address": _IN_PROCESS.format(opt="run.ray_address", cmd="train-student", where=" (or its torchrun ranks)")
                       + "; stored in RUN/config.yaml",
        "force": "delete train_student/ (checkpoints, metrics) and train again from the initial student",
    },
    "eval": {
        "executor": "eval runs in this process, never on Ray: validated, otherwise no effect",
        "ray_address": "eval runs in this process, never on Ray: no effect",
        "force": "no effect: eval keeps no resumable state, it always recomputes and overwrites "
                 "eval/NAME.json (and NAME.rejects.jsonl)",
    },
}
STAGE_COMMANDS: list[str] = []  # in registration order (= pipeline order)


@dataclass
class Common:
    """The common options of one stage-command invocation."""

    run: Path
    overrides: Optional[List[str]]
    config: Optional[str]
    executor: Optional[str]
    ray_address: Optional[str]
    force: bool
    dry_run: bool

    def run_flags(self) -> list[str]:
        """``--executor``/``--ray-address`` as ``run.*`` settings (below ``key=value`` overrides)."""
        flags = []
        if self.executor:
            flags.append(f"run.executor={self.executor}")
        if self.ray_address:
            flags.append("run.ray_address=" + json.dumps(self.ray_address))
        return flags

    def resolve(self, flags: list[str]):
        """The resolved config (stored ← --config ← run flags ← command flags ← overrides), or None
        after printing it for ``--dry-run``; a bad config exits 2."""
        try:
            cfg = resolve(self.run, self.config, self.run_flags() + flags, self.overrides)
        except ConfigError as e:
            _fail(str(e), 2)
        if self.dry_run:
            typer.echo(dump_yaml(cfg), nl=False)
            return None
        return cfg


def stage_command(name: str) -> Callable:
    """Register ``fn(common: Common, **own_options)`` as the stage command ``name``: its
    signature for typer is RUN, [KEY=VALUE]..., its own options, then the common options."""

    def deco(fn: Callable) -> Callable:
        own = list(inspect.signature(fn, eval_str=True).parameters.values())[1:]
        hints = typing.get_type_hints(fn)
        notes = NOTES.get(name, {})
        common = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=tp,
                                    default=make(notes.get(n, text)))
                  for n, tp, make, text in COMMON]
        params = common[:2] + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name])
                                for p in own] + common[2:]

        @functools.wraps(fn)
        def command(**kw):
            return fn(Common(**{n: kw.pop(n) for n in COMMON_NAMES}), **kw)

        del command.__wrapped__  # typer must see the signature below, not fn's
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        STAGE_COMMANDS.append(name)
        return app.command(name)(command)

    return deco


def _fail(msg: str, code: int) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _teacher_flags(teacher: Optional[str], engine_key: str, engine: Optional[str]) -> list[str]:
    flags = []
    if teacher:
        flags.append("teacher.model=" + json.dumps(os.path.abspath(teacher)))
    if engine:
        flags.append(f"{engine_key}={engine}")
    return flags


def _progress() -> bool:
    return sys.stderr.isatty() or bool(os.environ.get("LLAVADI_PROGRESS"))


def _stage_command(stage, common: Common, flags: list[str]) -> None:
    """Resolve the config and launch a shard stage through the pipeline runner."""
    cfg = common.resolve(flags)
    if cfg is None:
        return
    try:
        rep = run_stage(stage, common.run, cfg, force=common.force, progress=_progress())
    except (StageError, LockedError) as e:
        _fail(str(e), 2)
    except StageFailed as e:
        _fail(str(e), 1)
    rej = sum(rep.counts.get("rejected", {}).values())
    typer.echo(f"{stage.name}: {rep.shards_total} shards ({rep.shards_run} run, {rep.shards_skipped} already done); "
               f"samples in {rep.counts.get('in', 0)}, out {rep.counts.get('out', 0)}, rejected {rej}")


@stage_command("ingest")
def ingest(common: Common,
           input: Optional[List[str]] = typer.Option(None, "--input", "-i", metavar="FILE", help="LLaVA .json list, .jsonl or .parquet (repeatable)"),
           image_root: Optional[str] = typer.Option(None, "--image-root", metavar="DIR", help="folder that image paths are relative to (not needed for a Parquet whose rows hold the images)"),
           shard_size: Optional[int] = typer.Option(None, "--shard-size", metavar="N", help="records per shard")) -> None:
    """Validate LLaVA-format records and write Parquet sample shards to RUN/data/."""
    from .stages.ingest import STAGE

    flags = []
    if input:
        flags.append("ingest.inputs=" + json.dumps([p if remote.scheme(p) else os.path.abspath(p) for p in input]))
    if image_root:
        if remote.is_remote(image_root):
            _fail(f"--image-root {image_root}: must be a local directory or file:// URL (every stage reads the "
                  f"images; mount a bucket with a FUSE driver such as s3fs/gcsfuse)", 2)
        flags.append("ingest.image_root=" + json.dumps(os.path.abspath(remote.local_path(image_root))))
    if shard_size is not None:
        flags.append(f"ingest.shard_size={shard_size}")
    _stage_command(STAGE, common, flags)


@stage_command("regenerate")
def regenerate(common: Common,
               teacher: Optional[str] = typer.Option(None, "--teacher", metavar="DIR", help="teacher model directory (teacher.model)"),
               engine: Optional[str] = typer.Option(None, "--engine", metavar="NAME", help=_key_help("regenerate.engine"))) -> None:
    """Re-answer every assistant turn of RUN/data/ with the teacher (vLLM) into RUN/regenerate/."""
    from .stages.regenerate import STAGE

    _stage_command(STAGE, common, _teacher_flags(teacher, "regenerate.engine", engine))


@stage_command("cache-teacher")
def cache_teacher(common: Common,
                  teacher: Optional[str] = typer.Option(None, "--teacher", metavar="DIR", help="teacher model directory (teacher.model)"),
                  engine: Optional[str] = typer.Option(None, "--engine", metavar="NAME", help=_key_help("cache_teacher.engine")),
                  verify: Optional[int] = typer.Option(None, "--verify", metavar="N", help="recompute N random cached samples and report max errors")) -> None:
    """Teacher-forced pass: the fields cache_teacher.* declares (rows by position, hidden layers, top-k or sampled
    logits, affinity) into RUN/cache_teacher/."""
    from .stages.cache_teacher import STAGE

    flags = _teacher_flags(teacher, "cache_teacher.engine", engine)
    if common.dry_run:  # the resolved config, then the cache's size estimate as YAML comments
        from .pipeline.estimate import dry_run_report
        from .stages.cache_probe import run_probe

        common.resolve(flags)  # prints the resolved config (exit 2 when it is invalid)
        cfg = resolve(common.run, common.config, common.run_flags() + flags, common.overrides)
        typer.echo(dry_run_report(common.run, cfg, probe=lambda: run_probe(common.run, cfg)))
        return
    if verify is not None:
        from .stages.cache_verify import verify_cache

        cfg = common.resolve(flags)
        if cfg is None:
            return
        try:
            report = verify_cache(common.run, cfg, verify)
        except StageError as e:
            _fail(str(e), 2)
        typer.echo(json.dumps(report, indent=1))
        return
    _stage_command(STAGE, common, flags)


@stage_command("train-student")
def train_student(common: Common,
                  student: Optional[str] = typer.Option(None, "--student", metavar="DIR", help="initial student model directory (train_student.student)")) -> None:
    """Train the student from the teacher cache (CE + KD + feature loss); resumes exactly.
    Multi-process: `torchrun --nproc-per-node N -m llavadi.cli train-student RUN`."""
    flags = []
    if student:
        flags.append("train_student.student=" + json.dumps(os.path.abspath(student)))
    cfg = common.resolve(flags)
    if cfg is None:
        return
    run = common.run
    from .pipeline.rundir import CorruptShardError
    from .schemas.teacher_cache import CacheCorruptError
    from .stages.train_student.loop import train

    try:
        res = train(run, cfg, force=common.force, progress=_progress())
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


@stage_command("eval")
def eval_cmd(common: Common,
             model: Optional[str] = typer.Option(None, "--model", metavar="DIR", help="model directory to evaluate (teacher or student)"),
             data: Optional[str] = typer.Option(None, "--data", metavar="FILE", help="held-out LLaVA .json/.jsonl with reference answers (eval.data)"),
             image_root: Optional[str] = typer.Option(None, "--image-root", metavar="DIR", help="image folder of --data (eval.image_root; default: RUN's ingest.image_root)"),
             cache: Optional[str] = typer.Option(None, "--cache", metavar="DIR", help="held-out teacher cache dir for KL and perplexity (eval.cache)"),
             cache_image_root: Optional[str] = typer.Option(None, "--cache-image-root", metavar="DIR", help="image folder of --cache's samples (eval.cache_image_root; default: the cache run's ingest.image_root)"),
             name: Optional[str] = typer.Option(None, "--name", metavar="NAME", help="result name (eval/<name>.json)"),
             engine: Optional[str] = typer.Option(None, "--engine", metavar="NAME", help=_key_help("eval.engine"))) -> None:
    """Accuracy on held-out questions and KL-to-teacher / perplexity on a held-out cache."""
    from .stages.eval import EvalError, evaluate, preflight, summary

    flags = []
    for key, val in (("eval.data", data), ("eval.image_root", image_root), ("eval.cache", cache),
                     ("eval.cache_image_root", cache_image_root)):
        if val:
            flags.append(f"{key}=" + json.dumps(os.path.abspath(val)))
    if engine:
        flags.append(f"eval.engine={engine}")
    cfg = common.resolve(flags)
    if cfg is None:
        return
    run = common.run
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
def sweep(run: Path = typer.Argument(..., help="run directory holding the teacher cache every arm trains from",
                                     callback=_run_dir, metavar="RUN"),
          arms: Path = typer.Option(..., "--arms", metavar="FILE",
                                    help="YAML: `arms:` name → train_student overrides (and an optional `base:`)"),
          data: Optional[str] = typer.Option(None, "--data", metavar="FILE",
                                             help="held-out questions each arm is scored on (accuracy; eval.data)"),
          cache: Optional[str] = typer.Option(None, "--cache", metavar="DIR",
                                              help="held-out teacher cache each arm is scored on (KL, perplexity)"),
          seeds: int = typer.Option(1, "--seeds", metavar="N", help="seeds per arm (train_student.seed + 0..N-1)"),
          executor: Optional[str] = typer.Option(None, "--executor", metavar="NAME", callback=_executor,
                                                 help="ray: arms as Ray tasks (one GPU each where there are GPUs); "
                                                      "local: one after another (default: run.executor)"),
          ray_address: Optional[str] = typer.Option(None, "--ray-address", metavar="ADDR",
                                                    help="join this Ray cluster (as run.ray_address)")) -> None:
    """Train many students from RUN's one cache into RUN/sweep/<arm>/seed<k>/, score each, compare them."""
    from .stages.sweep import run_sweep
    from .stages.sweep_report import summarise, table

    try:
        cfg = resolve(run)
        out = run_sweep(run, arms, seeds=seeds, data=data, cache=cache, executor=executor or cfg.run.executor,
                        ray_address=ray_address or cfg.run.ray_address, progress=_progress())
    except ConfigError as e:
        _fail(str(e), 2)
    except (StageError, LockedError) as e:
        _fail(str(e), 2)
    typer.echo(table(summarise(out["results"], list(out["arms"]))))
    typer.echo(f"sweep: {len(out['results'])} students → {run / 'sweep' / 'results.json'}, report.md, report.png")


@app.command()
def status(run: Path = typer.Argument(..., help="run directory", callback=_run_dir, metavar="RUN"),
           as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Per stage: shards done/total, samples in/out/rejected (by reason)."""
    if not run.exists():
        _fail(f"{run} does not exist", 2)
    st = status_mod.collect(run)
    typer.echo(json.dumps(st, indent=1) if as_json else status_mod.render(st))


@app.command()
def demo(run_dir: Path = typer.Option(Path("demo"), "--run-dir", metavar="DIR", help="where the demo run lives"),
         quick: bool = typer.Option(False, "--quick", help="smaller sizes (≤ 5 min)"),
         rebuild_teacher: bool = typer.Option(False, "--rebuild-teacher",
                                              help="build the demo teacher in RUN_DIR/teacher (about 20 min on 2 cores) "
                                                   "instead of using the shipped one"),
         study: bool = typer.Option(False, "--study", help="the LLAVADI study's ablation grid "
                                                          "(configs/sweeps/llavadi_study.yaml) through `llavadi sweep` "
                                                          "instead of the five arms (about 45 min on 2 cores)"),
         profile: Optional[str] = typer.Option(None, "--profile", hidden=True, help="default | quick | smoke"),
         executor: Optional[str] = typer.Option(None, "--executor", metavar="NAME", callback=_executor,
                                                help=_key_help("run.executor") + ", for every stage")) -> None:
    """The whole pipeline on a shipped tiny teacher, a tiny student and synthetic visual-QA data
    (offline), with the study's ablation arms; prints a table and writes RUN_DIR/report.md,
    report.png and results.json."""
    from .stages.demo.run import run_demo
    from .stages.demo.study import run_study

    try:
        if study:
            run_study(run_dir, executor=executor or "ray", profile=profile, rebuild_teacher=rebuild_teacher)
        else:
            run_demo(run_dir, quick=quick, executor=executor or "ray", profile=profile, rebuild_teacher=rebuild_teacher)
    except (StageError, LockedError, ConfigError) as e:
        _fail(str(e), 2)
    except StageFailed as e:
        _fail(str(e), 1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
