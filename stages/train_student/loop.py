"""The training loop of ``llavadi train-student`` (design §6). Never loads the teacher:
targets come from the cache. Imports ``schemas`` and ``pipeline`` only (no vLLM, no Ray).

Loss on the answer tokens of a global batch (sums over all its tokens, divided by the global
answer-token count, so DDP ranks with different token counts still produce exactly the
single-process gradient):

    ce_weight · CE  +  kd_weight · KD  +  feature_weight · FEAT

The student computes logits only at answer positions: ``lm_head(h[rows])``.

Run dir: ``train_student/checkpoints/step_NNNNNN/`` (``save_pretrained`` student + processor,
``trainer_state.json``, ``training_state.pt`` with optimizer, scheduler, projector, RNG),
``metrics.jsonl``, ``tensorboard/``, ``rejects.jsonl`` + ``scan.json`` (the scan before training: ``data.scan``),
``late_rejects.rank<R>.jsonl`` (samples whose image failed only at their step: ``late.py``), ``_stage.json``,
``_lock.json``. What must agree before any work (student, cache, vocabulary, head sizes, image root): ``compat.py``.
The LM head is read by the fused loss as it runs, LoRA adapters included: ``head.py``.
The same command resumes from the newest checkpoint exactly. With ``train_student.lora`` the
checkpoints hold the adapter instead of the student, the last one also the merged student (``lora.py``).
With ``train_student.parallel=fsdp`` (FSDP2) they are sharded, the last one also the ``save_pretrained``
student; that and ``train_student.gradient_checkpointing``: ``parallel.py``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ...pipeline import atomic, remote
from ...pipeline.config import LlavadiConfig, changed_keys, fingerprint
from ...pipeline.locks import StageLock
from ...pipeline.rundir import StageDir
from ...pipeline.runner import StageError, write_run_config
from ...schemas import image_store
from ...schemas.teacher_cache import CacheReader
from . import compat, late, lora, losses
from .head import operands as head_operands
from .compat import preflight
from .data import StepDataset, load_adapter, scan as scan_samples, student_tokens
from . import parallel  # train_student.parallel=fsdp (FSDP2, sharded checkpoints), gradient_checkpointing

STAGE_DIR = "train_student"


class Projector(torch.nn.Module):
    """Student hidden → teacher hidden (trained, checkpointed for resume, never saved with the
    student)."""

    def __init__(self, hs: int, ht: int, kind: str):
        super().__init__()
        self.net = losses.FeatureProjector(hs, ht, kind)

    def forward(self, x):
        return self.net(x)


class StudentWithProjector(torch.nn.Module):
    """Student + feature projector + the loss, as one module: DDP must see every use of the
    student's parameters (the LM head too) inside ``forward``, and syncs the projector's
    gradients with the student's."""

    def __init__(self, student, projector, cfg: LlavadiConfig, head_t: Optional[dict], autocast):
        super().__init__()
        self.student, self.projector = student, projector
        self.cfg, self.head_t, self.autocast = cfg, head_t, autocast

    def forward(self, mb: dict):
        with self.autocast():
            out = self.student.model(**mb["inputs"])
            hid = out.last_hidden_state
            h = hid.reshape(-1, hid.shape[-1])[mb["rows"]]  # [N, Hs]: answer positions only
            proj = self.projector(h)
        return step_loss(self.student.get_output_embeddings(), h.float(), proj.float(), mb, self.cfg, self.head_t)


# ----------------------------------------------------------------------------- setup helpers


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
              "cache_from", "nonfinite", "gradient_checkpointing", "cache_image_root"):
        c.pop(k)  # how it runs, not what it computes (a pulled cache is checked by its own fingerprint)
    if not c["lora"]["enabled"]:
        c.pop("lora")  # LoRA off: the fingerprints of runs from before the lora keys existed stay valid
    if c["parallel"] == "ddp":
        c.pop("parallel")  # the default: fingerprints of runs from before the key existed stay valid
    return {"train_student": c, "student_dir": os.path.abspath(cfg.train_student.student or ""),
            "image_root": compat.image_root(cfg)[0]}  # the folder the samples' images are read from



def frozen_parameters(student, family, c) -> set[str]:
    """Names of the parameters ``freeze_vision`` / ``freeze_projector`` / ``freeze_lm`` freeze, by the
    family's parameter groups (``models.base.Family.group_params``: a group that matches nothing raises
    ``ValueError`` rather than silently training what the user froze)."""
    out: set[str] = set()
    for flag, group in ((c.freeze_vision, "vision"), (c.freeze_projector, "projector"), (c.freeze_lm, "lm")):
        if flag:
            out.update(family.group_params(student, group))
    return out


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    done = sorted(p for p in ckpt_dir.glob("step_*") if (p / "trainer_state.json").exists() and atomic.TMP_MARK not in p.name)
    return done[-1] if done else None


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        prog = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * prog)) if kind == "cosine" else 1.0 - prog
    return f


# ----------------------------------------------------------------------------- the loss


# The student's head, CE and KD run fused (``losses.fused_head_loss``): each block of answer rows
# makes its [rows, V] logits once, turns them into both losses and their gradient, and folds that
# into the head's and hidden states' gradients at once — no second head pass for KD, no checkpoint
# recompute in backward. On CPU a block is about this many bytes of float32 logits: blocks this
# small come from the allocator's reused memory (a fresh > 32 MiB buffer is a new mmap: page faults
# on every pass) and stay in cache, while the per-block [V, Hs] head-gradient update stays amortised
# (measured on V = 32064: 16 MiB blocks ~1.5-2x faster than 8 MiB or one block at Hs 768). On GPU
# blocks of ``kd.chunk_size`` rows (big kernels). ``kd.chunk_size`` caps the block on both.
CPU_LOGITS_BLOCK_BYTES = 16 << 20


def block_rows(vocab: int, chunk_size: int, device: torch.device) -> int:
    if device.type != "cpu":
        return int(chunk_size)
    return max(16, min(int(chunk_size), CPU_LOGITS_BLOCK_BYTES // (4 * max(1, vocab))))


def step_loss(head, h, proj, mb: dict, cfg: LlavadiConfig, head_t: Optional[dict]):
    """Summed loss terms of one micro-batch: ``h [N,Hs]`` student hidden at answer positions,
    ``proj [N,Ht]`` its projection. Returns (weighted sum, {term: detached sum})."""
    c = cfg.train_student
    terms = {}
    total = h.new_zeros(())
    if c.ce_weight > 0 or c.kd_weight > 0:
        teacher = {}
        if c.kd_weight > 0 and c.kd.exact:
            teacher = dict(teacher_hidden=mb["t_hidden"], teacher_head_weight=head_t["weight"],
                           teacher_head_bias=head_t.get("bias"))
        elif c.kd_weight > 0:
            teacher = dict(topk_ids=mb["t_topk_ids"], topk_logprobs=mb["t_topk_logprobs"],
                           teacher_logit_std=mb["t_logit_std"])
        x, w, b = head_operands(head, h)  # the head as it runs: LoRA on lm_head included (head.py)
        head_loss, ce, kd = losses.fused_head_loss(
            x, w, b, targets=mb["targets"], ce_weight=c.ce_weight,
            kd_weight=c.kd_weight, kind=c.kd.kind, beta=c.kd.beta, temperature=c.kd.temperature,
            standardize=c.kd.standardize, block_rows=block_rows(w.shape[0], c.kd.chunk_size, h.device),
            **teacher)
        total = total + head_loss
        if c.ce_weight > 0:
            terms["ce"] = ce
        if c.kd_weight > 0:
            terms["kd"] = kd
    if c.feature_weight > 0:
        feat = losses.feature_loss(proj, mb["t_hidden"], kind=c.feature.kind, reduction="sum")
        total = total + c.feature_weight * feat
        terms["feat"] = feat.detach()
    return total, terms


def apply_update(opt, sched, params, c, state: dict, sums: dict, ok_local: bool, ids: list, world: int):
    """End of a step, after backward: clip, agree on finiteness across ranks, then update or not.

    ``sums``: this rank's summed loss terms; ``ok_local``: its micro-batch losses were finite; ``ids``:
    its sample ids. The gradient norm (the clipping one, or the plain norm when clipping is off) must
    be finite too. The flag rides in the all-reduce of the loss sums, so every rank decides alike.
    A non-finite step never reaches the weights (its gradients are dropped before ``opt.step``):
    ``c.nonfinite == "stop"`` raises ``StageError`` naming the step and every rank's sample ids;
    ``"skip"`` counts it in ``state["skipped_nonfinite"]`` and goes on (the scheduler still steps,
    so the schedule stays aligned with ``global_step``). Returns (all-reduced ``[ce, kd, feat]``
    sums, the clipping grad norm or None, whether the weights were updated)."""
    if c.max_grad_norm > 0:
        gnorm = norm = parallel.full_tensor(torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm))  # FSDP: a DTensor
    else:
        gnorm, grads = None, [p.grad for p in params if p.grad is not None]
        norm = parallel.full_tensor(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                                    if grads else torch.zeros(()))
    ok = ok_local and bool(torch.isfinite(norm))
    vec = torch.tensor([sums.get(k, 0.0) for k in ("ce", "kd", "feat")] + [0.0 if ok else 1.0], dtype=torch.float64)
    if world > 1:  # NCCL reduces device tensors only (gloo either)
        vec = vec.to(norm.device)
        dist.all_reduce(vec)
        vec = vec.cpu()
    applied = bool(vec[3] == 0) and bool(torch.isfinite(vec[:3]).all())
    if applied:
        opt.step()
    else:
        opt.zero_grad(set_to_none=True)  # the non-finite gradients never reach the weights
        if c.nonfinite == "stop":
            rank = dist.get_rank() if world > 1 else 0
            per_rank = [(rank, ok, list(ids))]
            if world > 1:  # every rank is here (they agreed on the flag): gather the batch's ids
                per_rank = [None] * world
                dist.all_gather_object(per_rank, (rank, ok, list(ids)))
            bad = [r for r, fine, _ in per_rank if not fine]
            where = "; ".join(f"rank {r}: {i}" for r, _, i in per_rank) if world > 1 else str(per_rank[0][2])
            raise StageError(
                f"train-student: non-finite loss or gradient at step {state['global_step'] + 1} (epoch "
                f"{state['epoch']}, step {state['step_in_epoch'] + 1} of the epoch), on rank(s) {bad}; the weights "
                f"were not updated. The batch's sample ids: {where}. Check those samples' teacher cache "
                f"entries, or set train_student.nonfinite=skip to skip such steps (counted as "
                f"skipped_nonfinite in metrics.jsonl)")
        state["skipped_nonfinite"] = state.get("skipped_nonfinite", 0) + 1
        if rank_zero():
            print(f"[train-student] step {state['global_step'] + 1}: non-finite loss or gradient, step skipped "
                  f"(sample ids {list(ids)}; {state['skipped_nonfinite']} skipped so far)", file=sys.stderr)
    import warnings

    with warnings.catch_warnings():  # a skipped first step: the schedule advances without an optimizer step, on purpose
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        sched.step()
    opt.zero_grad(set_to_none=True)
    return vec[:3], gnorm, applied


def rank_zero() -> bool:
    return dist_info()[0] == 0


# ----------------------------------------------------------------------------- checkpoints


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


def _truncate_metrics(path: Path, upto_step: int) -> None:
    """Drop metric lines past the checkpoint we resume from (they will be recomputed)."""
    if not path.exists():
        return
    keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= upto_step]
    atomic.write_bytes(path, "".join(l + "\n" for l in keep).encode())


# ----------------------------------------------------------------------------- main entry


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


def train(run_dir: Path | str, cfg: LlavadiConfig, *, force: bool = False, progress: bool = True) -> dict:
    run_dir = Path(run_dir)
    rank, world, own_group = init_distributed()
    if cfg.train_student.cache_from:
        if rank == 0:
            pull_cache(run_dir, cfg.train_student.cache_from)
        if world > 1:
            dist.barrier()
    problems, up_fp = preflight(run_dir, cfg)
    if problems:
        raise StageError("train-student: cannot start:\n  " + "\n  ".join(problems))
    mat = material(cfg)
    fp = fingerprint(mat, up_fp)
    sd = StageDir(run_dir, STAGE_DIR)
    lock = StageLock(sd.lock_file, "train-student") if rank == 0 else None
    if lock:
        lock.acquire()
    try:
        return _train_locked(run_dir, cfg, sd, fp, mat, up_fp, rank, world, force, progress)
    finally:
        if lock:
            lock.release()
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _train_locked(run_dir, cfg, sd, fp, mat, up_fp, rank, world, force, progress) -> dict:
    from transformers import AutoModelForImageTextToText
    from tqdm import tqdm

    c = cfg.train_student
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
        write_run_config(run_dir, cfg)
    if world > 1:
        dist.barrier()

    ckpt_dir = sd.path / "checkpoints"
    resume = latest_checkpoint(ckpt_dir)
    src = str(resume) if resume and not c.lora.enabled else c.student  # LoRA: base student + the checkpoint's adapter
    if c.parallel == "fsdp":
        src = c.student  # the weights come from the sharded checkpoint (parallel.load_checkpoint)
    torch.manual_seed(c.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    use_bf16 = c.precision == "bf16" or (c.precision == "auto" and device == "cuda")
    # FSDP: stays on the CPU until fully_shard moves each rank's shard to the device
    student = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).to(
        "cpu" if c.parallel == "fsdp" and world > 1 else device)
    st = student_tokens(c.student, c.prompt_format)
    adapter = load_adapter(c.student, c.prompt_format)

    # scan once: valid sample count for the schedule, rejects with reasons (missing / changed images included)
    root, root_from = compat.image_root(cfg)
    scan, skip = scan_samples(run_dir, st, sd.path, fp, root, compat.ROOT_HINT, world)
    steps_per_epoch = scan["valid"] // c.batch_size
    if steps_per_epoch < 1:
        raise StageError(f"train-student: {scan['valid']} usable samples < batch_size={c.batch_size} "
                         f"(rejected: {scan['rejected'] or 'none'}; see {sd.path / 'rejects.jsonl'}; images read from "
                         f"{root} ({root_from})): lower train_student.batch_size or cache more data")
    total_steps = c.max_steps or steps_per_epoch * c.epochs

    ht = CacheReader(run_dir / "cache_teacher", verify=False).spec.hidden_size
    torch.manual_seed(c.seed)  # projector init independent of what ran before
    projector = Projector(student.config.get_text_config().hidden_size, ht, c.feature.projector).to(device)
    frozen = frozen_parameters(student, adapter.family, c)
    for name, p in student.named_parameters():
        p.requires_grad_(name not in frozen)
    # LoRA: adapters injected into `student` in place (+ loaded from `resume`); the LM's base weights frozen
    peft_model = lora.wrap(student, adapter.family, c, frozen, resume) if c.lora.enabled else None
    if c.gradient_checkpointing:
        parallel.enable_gradient_checkpointing(student)
        if rank == 0:
            print("[train-student] gradient checkpointing on (activations recomputed in backward)", file=sys.stderr)
    head_t = None
    if c.kd.exact:
        from safetensors.torch import load_file

        head_t = {k: v.to(device) for k, v in load_file(run_dir / "cache_teacher" / "teacher_head.safetensors").items()}

    def autocast():
        return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16)

    model = StudentWithProjector(student, projector, cfg, head_t, autocast)
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
        if c.parallel == "fsdp":  # weights, projector, optimizer (sharded), scheduler, this rank's RNG
            parallel.load_checkpoint(resume, model, opt, sched)
        else:
            ts = torch.load(resume / "training_state.pt", weights_only=False)
            opt.load_state_dict(ts["optimizer"])
            sched.load_state_dict(ts["scheduler"])
            projector.load_state_dict(ts["projector"])
            torch.set_rng_state(ts["rng_torch"])
        state = json.loads((resume / "trainer_state.json").read_text())
        if rank == 0:
            print(f"[train-student] resuming from {resume.name} (step {state['global_step']}/{total_steps})",
                  file=sys.stderr)
    metrics_path = sd.path / "metrics.jsonl"
    ids_path = sd.path / f"sample_ids.rank{rank}.jsonl"
    late_path = sd.path / f"late_rejects.rank{rank}.jsonl"
    _truncate_metrics(late_path, state["global_step"])
    if c.log_sample_ids:
        _truncate_metrics(ids_path, state["global_step"])
    tb = None
    if rank == 0:
        _truncate_metrics(metrics_path, state["global_step"])
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(sd.path / "tensorboard"), purge_step=state["global_step"] + 1)
        except Exception:  # noqa: BLE001 - TensorBoard is optional; metrics.jsonl is the record
            tb = None

    bar = tqdm(total=total_steps, initial=state["global_step"], desc="train-student", unit="step",
               disable=not progress or rank != 0, file=sys.stderr, dynamic_ncols=True)
    t_last = time.time()
    model.train()
    while state["global_step"] < total_steps:
        ds = StepDataset(run_dir, st, root, batch_size=c.batch_size, micro_batch_size=c.micro_batch_size,
                         rank=rank, world=world, seed=c.seed, epoch=state["epoch"], shuffle_buffer=c.shuffle_buffer,
                         start_step=state["step_in_epoch"], max_steps=steps_per_epoch, skip=skip,
                         root_hint=compat.ROOT_HINT)
        # its own generator: each new iterator draws a base seed, which from the global RNG would shift every later
        # dropout mask (LoRA's) on resume — a relaunch makes one more iterator than the uninterrupted run
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=c.num_workers, persistent_workers=False,
                                             generator=torch.Generator().manual_seed(c.seed * 1000003 + state["epoch"]))
        stepped = False
        for item in loader:
            if state["global_step"] >= total_steps:
                break
            stepped = True
            g = late.gate(item["micro_batches"], world, device)  # samples whose image failed at load: left out
            mbs, n_global = g.run, g.n_global
            sums: dict = {}
            ok_local = True  # every micro-batch loss of this rank finite
            for i, mb in enumerate(mbs):
                mb = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in mb.items()}
                mb["inputs"] = {k: v.to(device) for k, v in mb["inputs"].items()}
                sync = (i == len(mbs) - 1) or world == 1
                # FSDP reduce-scatters every micro-batch (no unsharded gradient kept between them)
                ctx = ddp.no_sync() if (world > 1 and not sync and c.parallel != "fsdp") else _null()
                with ctx:
                    loss, terms = ddp(mb)
                    # sum over this rank's tokens / all ranks' tokens; DDP averages gradients over
                    # ranks, so × world makes the result the exact global-token mean
                    (loss * (world / float(n_global))).backward()
                ok_local = ok_local and math.isfinite(float(loss.detach()))
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            # a non-finite loss or gradient on any rank stops the run or skips the step (train_student.nonfinite)
            vec, gnorm, applied = apply_update(opt, sched, params, c, state, sums, ok_local,
                                               [i for mb in mbs for i in mb["sample_ids"]], world)
            state["global_step"] += 1
            state["step_in_epoch"] += 1
            if c.log_sample_ids:
                with open(ids_path, "a") as f:
                    f.write(json.dumps({"step": state["global_step"], "epoch": state["epoch"],
                                        "ids": [i for mb in mbs for i in mb["sample_ids"]]}) + "\n")
            n_tok = float(n_global)
            rec = {"step": state["global_step"], "epoch": state["epoch"], "lr": sched.get_last_lr()[0],
                   "tokens": int(n_tok), **{k: vec[j].item() / n_tok for j, k in enumerate(("ce", "kd", "feat")) if k in sums}}
            rec["loss"] = (c.ce_weight * rec.get("ce", 0) + c.kd_weight * rec.get("kd", 0)
                           + c.feature_weight * rec.get("feat", 0))
            if gnorm is not None:
                rec["grad_norm"] = float(gnorm)
            if state.get("skipped_nonfinite"):
                rec["skipped_nonfinite"] = state["skipped_nonfinite"]  # steps skipped so far
                if not applied:
                    rec["skipped"] = True
            late.log(late_path, state, g, rec, rank)
            now = time.time()
            rec["tokens_per_s"] = round(n_tok / max(1e-9, now - t_last), 1)
            t_last = now
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec, sort_keys=True) + "\n")
                if tb:
                    for k in ("loss", "ce", "kd", "feat", "lr", "grad_norm", "tokens_per_s", "skipped_nonfinite"):
                        if k in rec:
                            tb.add_scalar(f"train/{k}", rec[k], rec["step"])
                bar.update(1)
                bar.set_postfix({k: f"{rec[k]:.4g}" for k in ("loss", "ce", "kd", "feat") if k in rec}
                                | {"tok/s": rec["tokens_per_s"]})
            last = state["global_step"] == total_steps
            if state["global_step"] % c.save_every_steps == 0 or last:
                if c.parallel == "fsdp":  # every rank writes its shard; the last step also the save_pretrained student
                    parallel.save_checkpoint(ckpt_dir, model, student, opt, sched, dict(state), c.keep_checkpoints,
                                             adapter=adapter if last else None)
                elif rank == 0:
                    save_checkpoint(ckpt_dir, student if peft_model is None else peft_model, adapter, projector, opt,
                                    sched, dict(state), c.keep_checkpoints)
                if world > 1:
                    dist.barrier()
        if state["global_step"] < total_steps:
            if not stepped and state["step_in_epoch"] == 0:  # an epoch with no step would loop forever
                raise StageError("train-student: an epoch produced no training step; the cache changed under the run?")
            state["epoch"] += 1
            state["step_in_epoch"] = 0
    bar.close()
    if tb:
        tb.close()
    if world > 1:
        dist.barrier()  # every rank sees the final checkpoint
    final = latest_checkpoint(ckpt_dir)
    if rank == 0:
        m = sd.read_manifest()
        m.update({"complete": True, "final_checkpoint": final.name if final else None, "steps": total_steps,
                  "samples_valid": scan["valid"], "rejected": scan["rejected"]})
        sd.write_manifest(m)
    return {"final_checkpoint": str(final) if final else None, "steps": total_steps, "scan": scan}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
