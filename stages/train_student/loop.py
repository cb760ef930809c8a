"""``llavadi train-student`` as a recipe (design §6, issue #21): ``train()`` reads top to bottom as its
phases — preflight, build student, build terms, stream, step, checkpoint, finish. Never loads the teacher:
targets come from the cache. Imports ``schemas`` and ``pipeline`` only (no vLLM, no Ray).

The loss is the weighted sum of the declared terms (``terms.py``; evaluated by ``objective.py``):

    ce_weight · CE + kd_weight · KD + feature_weight · Σ FEAT[pair] + affinity_weight · AFFINITY

each normalised over its own rows of the global batch (``train_student.reduction``), so DDP ranks with
different row counts still produce exactly the single-process gradient.

Run dir (``RUN/train_student/``, or a sweep arm's ``RUN/sweep/<arm>/seed<k>/``): ``checkpoints/step_NNNNNN/``
(``checkpoint.py``), ``metrics.jsonl``, ``tensorboard/`` (``metrics.py``), ``rejects.jsonl`` + ``scan.json``
(the scan before training: ``data.scan``), ``late_rejects.rank<R>.jsonl`` (``late.py``), ``_stage.json``,
``_lock.json``. What must agree before any work: ``compat.py``; the phases before the first step:
``setup.py``; one step: ``step.py``. The same command resumes from the newest checkpoint exactly. LoRA:
``lora.py``; FSDP2 and gradient checkpointing: ``parallel.py``; the LM head as the fused loss reads it: ``head.py``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ...pipeline.config import LlavadiConfig, fingerprint
from ...pipeline.locks import StageLock
from ...pipeline.rundir import StageDir
from ...pipeline.runner import StageError
from ...schemas.teacher_cache import CacheReader
from . import compat, parallel
from .batch import CollatePlan
from .checkpoint import latest_checkpoint, pull_cache, save_checkpoint
from .compat import preflight
from .continuation import Continuation, begin, start_step
from .data import BASE, StepDataset, load_adapter, scan as scan_samples, student_tokens
from .memo import MEMO
from .metrics import Metrics
from .setup import Built, build, init_distributed, material, open_stage
from .step import run_step
from .terms import build_terms, row_sets

STAGE_DIR = "train_student"


@contextlib.contextmanager
def _session(run_dir: Path, cfg: LlavadiConfig, out: Path, force: bool, own_config: bool,
             cont: Optional[Continuation] = None):
    """The process group (torchrun's), the preflight (raises ``StageError`` naming every problem), the stage
    lock (rank 0) and the stage directory checked against this config: yields ``(rank, world, sd, fp, done)``
    (``done``: the finished result of an earlier run with this exact config, else None)."""
    rank, world, own_group = init_distributed()
    try:
        if cfg.train_student.cache_from:  # the train-elsewhere flow: the cache and its samples pulled first
            if rank == 0:
                pull_cache(run_dir, cfg.train_student.cache_from)
            if world > 1:
                dist.barrier()
        problems, up_fp = preflight(run_dir, cfg)
        if problems:
            raise StageError("train-student: cannot start:\n  " + "\n  ".join(problems))
        mat = material(cfg)
        if cont is not None:  # an on-policy round: chains its round cache, holds what else it depends on
            mat, up_fp = {**mat, "continuation": cont.material}, cont.upstream_fingerprint
        fp = fingerprint(mat, up_fp)
        sd = StageDir(out.parent, out.name)
        lock = StageLock(sd.lock_file, "train-student") if rank == 0 else None
        if lock:
            lock.acquire()
        try:
            yield rank, world, sd, fp, open_stage(sd, run_dir, cfg, fp, mat, up_fp, rank, world, force, own_config)
        finally:
            if lock:
                lock.release()
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def train(run_dir: Path | str, cfg: LlavadiConfig, *, force: bool = False, progress: bool = True,
          out_dir: Optional[Path] = None, cont: Optional[Continuation] = None) -> dict:
    """Train the student of ``cfg`` on ``run_dir``'s teacher cache into ``out_dir`` (default
    ``RUN/train_student``); returns ``{"final_checkpoint", "steps", "scan"}``. Raises ``StageError`` before any
    work on a problem the preflight finds (each naming its fix), or on a changed config without ``force``.
    ``cont``: continue another run's full state on other caches (an on-policy round: ``continuation.py``)."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / STAGE_DIR
    c = cfg.train_student
    # preflight: student, cache, vocabulary, every term's fields and rows; lock; the directory vs this config
    sources = cont.sources if cont is not None else BASE
    with _session(run_dir, cfg, out, force, own_config=out_dir is not None, cont=cont) as (rank, world, sd, fp, done):
        if done:
            return done
        device = "cuda" if torch.cuda.is_available() else "cpu"
        st, adapter = student_tokens(c.student, c.prompt_format), load_adapter(c.student, c.prompt_format)
        # stream: one scan fixes the valid samples and so the schedule
        root, root_from = compat.image_root(cfg)
        scan, skip = scan_samples(run_dir, st, sd.path, fp, root, compat.ROOT_HINT, world, sources)
        steps_per_epoch = scan["valid"] // c.batch_size
        if steps_per_epoch < 1:
            raise StageError(f"train-student: {scan['valid']} usable samples < batch_size={c.batch_size} (rejected: "
                             f"{scan['rejected'] or 'none'}; see {sd.path / 'rejects.jsonl'}; images read from {root} "
                             f"({root_from})): lower train_student.batch_size or cache more data")
        total_steps = start_step(cont) + (c.max_steps or steps_per_epoch * c.epochs)
        # prepared samples kept for the next epoch (memo.py) only when there is one
        MEMO.configure(c.sample_memo_mb << 20 if (c.max_steps or steps_per_epoch * c.epochs) > steps_per_epoch else 0)
        # build terms: the declared loss terms, and what the collate must align for them
        terms = build_terms(c, CacheReader(run_dir / "cache_teacher", verify=False).meta)
        plan = CollatePlan(tuple(row_sets(terms).items()), affinity=any(t.name == "aff" for t in terms))
        # build student: weights (resumed), frozen groups, LoRA, the objective and its projectors, optimizer
        ckpt_dir = sd.path / "checkpoints"
        own = latest_checkpoint(ckpt_dir)
        b: Built = build(run_dir, cfg, adapter, terms, own or (cont.init if cont else None), total_steps, fp, rank,
                         world, device)
        if own is None and cont is not None and cont.init is not None:
            begin(b, cont, total_steps, fp)  # another run's state, now this run's start
        state = b.state
        log = Metrics(sd.path, rank, state, total_steps, terms, c.log_sample_ids, progress)
        b.model.train()
        while state["global_step"] < total_steps:
            ds = StepDataset(run_dir, st, root, batch_size=c.batch_size, micro_batch_size=c.micro_batch_size,
                             rank=rank, world=world, seed=c.seed, epoch=state["epoch"], shuffle_buffer=c.shuffle_buffer,
                             start_step=state["step_in_epoch"], max_steps=steps_per_epoch, skip=skip,
                             root_hint=compat.ROOT_HINT, plan=plan, sources=sources)
            # its own generator: each new iterator draws a base seed, which from the global RNG would shift every
            # later dropout mask (LoRA's) on resume — a relaunch makes one more iterator than the uninterrupted run
            loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=c.num_workers, persistent_workers=False,
                                                 generator=torch.Generator().manual_seed(c.seed * 1000003 + state["epoch"]))
            stepped = False
            for item in loader:
                if state["global_step"] >= total_steps:
                    break
                stepped = True
                # step: every term over this rank's micro-batches, one update (non-finite: stop or skip)
                result = run_step(b.ddp, item["micro_batches"], terms, b.opt, b.sched, b.params, c, state, world, device)
                state["global_step"] += 1
                state["step_in_epoch"] += 1
                log.step(state, b.sched.get_last_lr()[0], result)
                # checkpoint: every save_every_steps and the last step
                last = state["global_step"] == total_steps
                if state["global_step"] % c.save_every_steps == 0 or last:
                    if c.parallel == "fsdp":  # every rank writes its shard; the last step also the save_pretrained student
                        parallel.save_checkpoint(ckpt_dir, b.model, b.model.student, b.opt, b.sched, dict(state),
                                                 c.keep_checkpoints, adapter=adapter if last else None)
                    elif rank == 0:
                        save_checkpoint(ckpt_dir, b.student, adapter, b.model.projector, b.opt, b.sched, dict(state),
                                        c.keep_checkpoints)
                    if world > 1:
                        dist.barrier()
            if state["global_step"] < total_steps:
                if not stepped and state["step_in_epoch"] == 0:  # an epoch with no step would loop forever
                    raise StageError("train-student: an epoch produced no training step; the cache changed under the run?")
                state["epoch"] += 1
                state["step_in_epoch"] = 0
        # finish: the manifest names the final checkpoint (a relaunch with the same config is then a no-op)
        log.close()
        if world > 1:
            dist.barrier()  # every rank sees the final checkpoint
        final = latest_checkpoint(ckpt_dir)
        if rank == 0:
            m = sd.read_manifest()
            m.update({"complete": True, "final_checkpoint": final.name if final else None, "steps": total_steps,
                      "samples_valid": scan["valid"], "rejected": scan["rejected"]})
            sd.write_manifest(m)
        return {"final_checkpoint": str(final) if final else None, "steps": total_steps, "scan": scan}
