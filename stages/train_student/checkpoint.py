"""Checkpoints of train-student (exact resume) and the cache pull of the train-elsewhere flow.

``checkpoints/step_NNNNNN/``: the ``save_pretrained`` student + processor (the layout transformers and vLLM
both load; with LoRA the adapter, the last one also the merged student: ``lora.py``; with FSDP sharded:
``parallel.py``), ``trainer_state.json`` (step, epoch, position in the epoch, counters) and
``training_state.pt`` (optimizer, scheduler, feature projectors, RNG). Published atomically; the newest
``keep`` are kept."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from ...pipeline import atomic, remote
from ...schemas import image_store
from ...schemas.teacher_cache import CacheReader
from . import lora


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    done = sorted(p for p in ckpt_dir.glob("step_*") if (p / "trainer_state.json").exists() and atomic.TMP_MARK not in p.name)
    return done[-1] if done else None


def save_checkpoint(out: Path, student, adapter, projector, opt, sched, state: dict, keep: int) -> Path:
    final = out / f"step_{state['global_step']:06d}"
    tmp = atomic.tmp_name(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    if hasattr(student, "peft_config"):  # LoRA (stages/train_student/lora.py): adapter; merged student at the end
        lora.save(student, adapter, tmp, merged=state["global_step"] >= state["total_steps"])
    else:
        adapter.family.save(student, adapter.processor, tmp)  # the layout transformers and vLLM both load
    for extra in ("generation_config.json", "chat_template.json", "chat_template.jinja"):
        # as the student shipped them (the template file a processor saves may have another name)
        src_file = Path(adapter.model_dir) / extra
        if src_file.exists():
            shutil.copyfile(src_file, tmp / extra)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "projector": projector.state_dict(),
                "rng_torch": torch.get_rng_state()}, tmp / "training_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    atomic.publish_dir(tmp, final, keep)  # files of subdirectories too (LoRA's adapter/)
    return final


def load_training_state(resume: Path, opt, sched, projector) -> dict:
    """Optimizer, scheduler, projectors and the torch RNG from ``resume``; returns its ``trainer_state.json``."""
    ts = torch.load(resume / "training_state.pt", weights_only=False)
    opt.load_state_dict(ts["optimizer"])
    sched.load_state_dict(ts["scheduler"])
    projector.load_state_dict(ts["projector"])
    torch.set_rng_state(ts["rng_torch"])
    return json.loads((resume / "trainer_state.json").read_text())


def truncate_metrics(path: Path, upto_step: int) -> None:
    """Drop metric lines past the checkpoint we resume from (they will be recomputed)."""
    if not path.exists():
        return
    keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= upto_step]
    atomic.write_bytes(path, "".join(l + "\n" for l in keep).encode())


def pull_cache(run_dir: Path, src: str) -> int:
    """Pull ``src``'s finished ``cache_teacher/`` and the sample shards it was made from into
    ``run_dir`` (``remote.pull_stage``: only missing files; every shard verified), and ``data/`` too
    when its image store (images that came embedded in the input) holds the samples' images.
    Returns files copied."""
    n = remote.pull_stage(src, "cache_teacher", run_dir)
    source = CacheReader(run_dir / "cache_teacher", verify=False).meta.get("source", "regenerate")
    n += remote.pull_stage(src, source, run_dir)
    if source != "data":
        fs, store = remote.filesystem(f"{str(src).rstrip('/')}/{image_store.STORE}")
        if fs.exists(store):
            n += remote.pull_stage(src, "data", run_dir)
    return n
