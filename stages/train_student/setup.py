"""The phases of ``train()`` before the first step: the process group, the stage directory (fingerprint,
manifest), the student (weights, frozen groups, LoRA, gradient checkpointing), the objective (terms and
projectors, wrapped for DDP / FSDP2), the optimizer and schedule, and the resume from the newest checkpoint."""
from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ...pipeline import atomic
from ...pipeline.config import LlavadiConfig, changed_keys
from ...pipeline.rundir import StageDir
from ...pipeline.runner import StageError, write_run_config
from ...schemas.teacher_cache import CacheReader
from . import compat, lora, parallel
from .checkpoint import latest_checkpoint, load_training_state
from .objective import Objective


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int, bool]:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, nccl on GPU).
    Returns (rank, world, whether we created the group — only then do we destroy it: an
    in-process vLLM engine may own a world-1 group of its own)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return (*dist_info(), True)
    return (*dist_info(), False)


def material(cfg: LlavadiConfig) -> dict:
    c = asdict(cfg.train_student)
    for k in ("num_workers", "save_every_steps", "keep_checkpoints", "log_every_steps", "log_sample_ids",
              "cache_from", "nonfinite", "gradient_checkpointing", "cache_image_root", "sample_memo_mb"):
        c.pop(k)  # how it runs, not what it computes (a pulled cache is checked by its own fingerprint)
    if not c["lora"]["enabled"]:
        c.pop("lora")  # LoRA off: the fingerprints of runs from before the lora keys existed stay valid
    if c["parallel"] == "ddp":
        c.pop("parallel")  # the default: fingerprints of runs from before the key existed stay valid
    return {"train_student": c, "student_dir": os.path.abspath(cfg.train_student.student or ""),
            "image_root": compat.image_root(cfg)[0]}  # the folder the samples' images are read from


def open_stage(sd: StageDir, run_dir: Path, cfg: LlavadiConfig, fp: str, mat: dict, up_fp, rank: int, world: int,
               force: bool, own_config: bool) -> Optional[dict]:
    """Check the directory against this config (a changed one is refused naming the keys), return the
    finished result when it was already trained with it, else (re)open it for training: manifest, the
    resolved config (``RUN/config.yaml``, or the directory's own with ``own_config``: a sweep arm)."""
    manifest = sd.read_manifest()
    if manifest and manifest.get("fingerprint") != fp and not force:
        keys = changed_keys(manifest.get("material", {}), mat)
        if manifest.get("upstream_fingerprint") != up_fp:
            keys.append("(the teacher cache was redone)")
        raise StageError(f"train-student: the config differs from the one {sd.path} was trained with; changed: "
                         f"{', '.join(keys)}. Revert it, use a new run directory, or pass --force to start over.")
    if manifest and manifest.get("fingerprint") == fp and manifest.get("complete") and not force:
        final = latest_checkpoint(sd.path / "checkpoints")
        if final is not None and final.name == manifest.get("final_checkpoint"):
            # finished earlier with this exact config: nothing to do (a relaunch is a no-op)
            return {"final_checkpoint": str(final), "steps": manifest["steps"],
                    "scan": {"valid": manifest["samples_valid"], "rejected": manifest["rejected"]}}
    if rank == 0:
        if force:
            sd.wipe()
        sd.path.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale_tmp(sd.path / "checkpoints")
        sd.write_manifest({"stage": "train-student", "fingerprint": fp, "upstream_fingerprint": up_fp, "material": mat,
                           "complete": False})
        if own_config:
            from ...pipeline.config import dump_yaml

            atomic.write_bytes(sd.path / "config.yaml", dump_yaml(cfg).encode())
        else:
            write_run_config(run_dir, cfg)
    if world > 1:
        dist.barrier()
    return None


def frozen_parameters(student, family, c) -> set[str]:
    """Names of the parameters ``freeze_vision`` / ``freeze_projector`` / ``freeze_lm`` freeze, by the
    family's parameter groups (``models.base.Family.group_params``: a group that matches nothing raises
    ``ValueError`` rather than silently training what the user froze)."""
    out: set[str] = set()
    for flag, group in ((c.freeze_vision, "vision"), (c.freeze_projector, "projector"), (c.freeze_lm, "lm")):
        if flag:
            out.update(family.group_params(student, group))
    return out


@dataclass
class Built:
    """What the step loop trains: ``model`` (the objective), ``ddp`` (what the step calls: the model, or its
    DDP wrapper), ``student`` (to save: the PEFT model with LoRA), ``params``, ``opt``, ``sched``, ``state``."""

    model: Objective
    ddp: torch.nn.Module
    student: torch.nn.Module
    params: list
    opt: torch.optim.Optimizer
    sched: object
    state: dict


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        prog = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * prog)) if kind == "cosine" else 1.0 - prog
    return f


def build(run_dir: Path, cfg: LlavadiConfig, adapter, terms: list, resume: Optional[Path], total_steps: int, fp: str,
          rank: int, world: int, device: str) -> Built:
    """The student (from the newest checkpoint when resuming), its frozen groups and LoRA adapters, the
    objective with its projectors, FSDP2 or DDP, AdamW and the schedule, and the resumed training state."""
    from transformers import AutoModelForImageTextToText

    c = cfg.train_student
    src = str(resume) if resume and not c.lora.enabled else c.student  # LoRA: base student + the checkpoint's adapter
    if c.parallel == "fsdp":
        src = c.student  # the weights come from the sharded checkpoint (parallel.load_checkpoint)
    torch.manual_seed(c.seed)
    use_bf16 = c.precision == "bf16" or (c.precision == "auto" and device == "cuda")
    # FSDP: stays on the CPU until fully_shard moves each rank's shard to the device
    student = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).to(
        "cpu" if c.parallel == "fsdp" and world > 1 else device)
    reader = CacheReader(run_dir / "cache_teacher", verify=False)
    teacher_hidden = {layer: reader.spec.hidden_size for layer in reader.spec.hidden_layers}
    head_t = None
    if any(t.name == "kd" and t.params["source"] == "exact" for t in terms) or \
            any(t.name == "ce" and "hidden" in t.fields for t in terms):
        from safetensors.torch import load_file

        head_t = {k: v.to(device) for k, v in load_file(run_dir / "cache_teacher" / "teacher_head.safetensors").items()}

    def autocast():
        return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16)

    torch.manual_seed(c.seed)  # projector init independent of what ran before
    model = Objective(student, terms, teacher_hidden, head_t, autocast, c.reduction)
    model.projector.to(device)  # the student stays where it is (FSDP: on the CPU until fully_shard)
    frozen = frozen_parameters(student, adapter.family, c)
    for name, p in student.named_parameters():
        p.requires_grad_(name not in frozen)
    # LoRA: adapters injected into `student` in place (+ loaded from `resume`); the LM's base weights frozen
    peft_model = lora.wrap(student, adapter.family, c, frozen, resume) if c.lora.enabled else None
    if c.gradient_checkpointing:
        parallel.enable_gradient_checkpointing(student)
        if rank == 0:
            print("[train-student] gradient checkpointing on (activations recomputed in backward)", file=sys.stderr)
    ddp = model
    if c.parallel == "fsdp":  # FSDP2: per decoder layer, then the root (stages/train_student/parallel.py)
        parallel.shard(model, parallel.decoder_layers(student, adapter.family), device=device, bf16=use_bf16)
    elif world > 1:
        # a micro-batch without images leaves the multimodal projector unused on that rank
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.cuda.current_device()] if device == "cuda" else None, find_unused_parameters=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    warmup = int(round(c.warmup_ratio * total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(c.schedule, warmup, total_steps))
    state = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "total_steps": total_steps, "fingerprint": fp}
    if resume:
        if c.parallel == "fsdp":  # weights, projectors, optimizer (sharded), scheduler, this rank's RNG
            parallel.load_checkpoint(resume, model, opt, sched)
            import json

            state = json.loads((resume / "trainer_state.json").read_text())
        else:
            state = load_training_state(resume, opt, sched, model.projector)
        if rank == 0:
            print(f"[train-student] resuming from {resume.name} (step {state['global_step']}/{total_steps})",
                  file=sys.stderr)
    return Built(model, ddp, student if peft_model is None else peft_model, params, opt, sched, state)
