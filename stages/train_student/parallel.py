"""``train_student.parallel=fsdp`` and ``train_student.gradient_checkpointing`` (issue #15, items 1-2).

FSDP2 (``torch.distributed.fsdp.fully_shard``, torch ≥ 2.6; the docs' "per layer, then the root"
recipe): each decoder layer of the student's language model is one FSDP unit, then the root unit
(``objective.Objective``: the student's embeddings, vision tower, multimodal projector, final
norm, LM head, and llavadi's feature projector). Every parameter is stored as a ``DTensor`` sharded
on dim 0 over the ranks (``Shard(0)``), so weights, gradients and AdamW's two moments are
``1/world`` per rank; a unit's parameters are all-gathered for its forward (and again for its
backward: ``reshard_after_forward=True`` for the layers, ``False`` for the root, torch's defaults)
and its gradients reduce-scattered (averaged over ranks, like DDP's all-reduce — so the loop's
``loss × world / global tokens`` scaling gives the one-process gradient under both).

Mixed precision (``MixedPrecisionPolicy``, from ``train_student.precision``): bf16 → the unsharded
(compute) parameters are bf16, gradients are reduced in float32, the sharded master weights and the
optimizer stay float32; float32 → no cast. The root unit does not cast its forward inputs
(``cast_forward_inputs=False``): the micro-batch dict holds the teacher's float32 targets, which must
reach the loss unrounded; the loss itself runs as under DDP (``losses.fused_head_loss`` upcasts to
float32).

Checkpoints (``train_student/checkpoints/step_NNNNNN/``, written by every rank together):

- ``dcp/``: ``torch.distributed.checkpoint`` directory (``.metadata`` + one ``__<rank>_0.distcp`` per
  rank) of ``{"model": ..., "optim": ...}`` from ``torch.distributed.checkpoint.state_dict.get_state_dict``
  (keys are parameter names: ``student.*``, ``projector.*``; the optimizer's state by parameter name).
  A relaunch may use another world size: DCP reshards on load.
- ``training_state.pt``: scheduler state, every rank's torch RNG state (``rng_torch_per_rank``),
  ``parallel="fsdp"``, the world size.
- ``trainer_state.json``: as under DDP (step, epoch, step in epoch: the loader position).
- The last step only, in addition: the student as a plain ``save_pretrained`` directory (the full
  state dict gathered on rank 0 with ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``,
  written by the family's ``save``), so ``llavadi eval --model``, transformers and vLLM load it.
  Intermediate steps hold ``dcp/`` only.

Gradient checkpointing: transformers' ``gradient_checkpointing_enable`` with
``use_reentrant=False`` (torch.utils.checkpoint's recommended mode; it composes with DDP's
``find_unused_parameters`` and with FSDP2, whose pre-forward hook skips the all-gather during the
recompute and leaves it to its pre-backward hook — torch/distributed/fsdp/_fully_shard/_fsdp_state.py).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ...pipeline import atomic

DCP_DIR = "dcp"
TRAINING_STATE = "training_state.pt"


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ----------------------------------------------------------------------------- gradient checkpointing


def enable_gradient_checkpointing(student) -> None:
    """Recompute each checkpointed layer's activations in backward instead of keeping them
    (transformers ``PreTrainedModel.gradient_checkpointing_enable``; non-reentrant
    ``torch.utils.checkpoint``, so gradients equal the stored-activation ones: same ops, same order).
    Raises ``ValueError`` for a model class that does not support it."""
    if not getattr(student, "supports_gradient_checkpointing", False):
        raise ValueError(f"train_student.gradient_checkpointing: {type(student).__name__} does not support "
                         f"gradient checkpointing (transformers' supports_gradient_checkpointing is False)")
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# ----------------------------------------------------------------------------- FSDP2 wrapping


def decoder_layers(student, family) -> list[torch.nn.Module]:
    """The language model's decoder layers, found generically: modules whose class name ends in
    ``DecoderLayer`` (transformers' naming: ``LlamaDecoderLayer``, ``Qwen2VLDecoderLayer``,
    ``Gemma3DecoderLayer``, …) and all of whose parameters are in the family's ``lm`` group
    (``models.base.Family.group_params``: a vision tower's layers never match). Outermost matches
    only. Raises ``ValueError`` when none is found (sharding only the root would all-gather the
    whole model at once)."""
    lm = set(family.group_params(student, "lm"))
    out: list[tuple[str, torch.nn.Module]] = []
    for name, mod in student.named_modules():
        if not type(mod).__name__.endswith("DecoderLayer") or any(name.startswith(f"{n}.") for n, _ in out):
            continue
        names = [f"{name}.{n}" for n, _ in mod.named_parameters()]
        if names and all(n in lm for n in names):
            out.append((name, mod))
    if not out:
        raise ValueError(f"train_student.parallel=fsdp: no decoder layer (a module whose class name ends in "
                         f"'DecoderLayer', inside the {family.name} family's 'lm' parameter group) found in "
                         f"{type(student).__name__}")
    return [m for _, m in out]


def mixed_precision(bf16: bool, *, cast_forward_inputs: bool = True):
    """``MixedPrecisionPolicy`` for ``train_student.precision``: bf16 → ``param_dtype=bfloat16,
    reduce_dtype=float32``; otherwise no cast (float32 throughout)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if bf16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=cast_forward_inputs)
    return MixedPrecisionPolicy(cast_forward_inputs=cast_forward_inputs)


def shard(model: torch.nn.Module, layers: list[torch.nn.Module], *, device: str, bf16: bool) -> torch.nn.Module:
    """``fully_shard`` each of ``layers``, then ``model`` (the root), over all ranks of the default
    process group (a 1-D device mesh on ``device``: ``"cuda"`` or ``"cpu"``, gloo on CPU). In place;
    returns ``model``. Parameters move to the mesh's device (a student loaded on the CPU lands on the
    GPU already sharded). With one process nothing is sharded and ``model`` is returned as is (the
    checkpoint layout is still this module's)."""
    rank, world = _rank_world()
    if world == 1:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (world,))
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mixed_precision(bf16))
    fully_shard(model, mesh=mesh, mp_policy=mixed_precision(bf16, cast_forward_inputs=False))
    # a micro-batch without images leaves the multimodal projector unused on that rank while another rank
    # uses it: zero gradients keep the reduce-scatters matched (FSDP2's counterpart of DDP's
    # find_unused_parameters; torch/distributed/fsdp/_fully_shard/_fully_shard.py)
    model.set_reduce_scatter_unused_params(True)
    if rank == 0:
        print(f"[train-student] FSDP2 over {world} ranks: {len(layers)} decoder layers + the root sharded "
              f"({'bf16 compute, float32 reduce' if bf16 else 'float32'})", file=sys.stderr)
    return model


def full_tensor(t):
    """A ``DTensor`` (a gradient norm under FSDP: partial over ranks) as a plain replicated tensor;
    anything else unchanged. Collective for a ``DTensor``: every rank must call it."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


# ----------------------------------------------------------------------------- checkpoints


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def full_student(model: torch.nn.Module, student: torch.nn.Module, prefix: str = "student.") -> Optional[torch.nn.Module]:
    """The student with its full (unsharded) float32 weights on the CPU, on rank 0 (None on the other
    ranks). Collective: every rank must call it. The weights come from
    ``get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))``
    (torch.distributed.checkpoint.state_dict: gathered to rank 0 only, parameter by parameter) and are
    assigned into a fresh meta-device instance of the student's class (no second copy); tied weights
    are re-tied (``tie_weights``). Host memory on rank 0: the student's full size (4 bytes/parameter)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    rank, world = _rank_world()
    if world == 1:
        return student
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    with torch.device("meta"):
        skel = type(student)._from_config(student.config)
    missing, unexpected = skel.load_state_dict(sd, strict=False, assign=True)
    skel.tie_weights()
    still_meta = [n for n, p in skel.named_parameters() if p.is_meta]
    if unexpected or still_meta:
        raise RuntimeError(f"train-student: the gathered FSDP state dict does not fit {type(student).__name__}: "
                           f"unexpected {unexpected[:5]}, not loaded {still_meta[:5]}")
    skel.generation_config = student.generation_config
    return skel.eval()


def save_student(student, adapter, out_dir: Path) -> None:
    """The student as ``checkpoint.save_checkpoint`` writes it: the family's ``save`` (the layout transformers
    and vLLM load) plus the student's own generation config / chat template files."""
    adapter.family.save(student, adapter.processor, out_dir)
    for extra in ("generation_config.json", "chat_template.json", "chat_template.jinja"):
        src = Path(adapter.model_dir) / extra
        if src.exists():
            shutil.copyfile(src, Path(out_dir) / extra)


def save_checkpoint(out: Path, model, student, opt, sched, state: dict, keep: int, adapter=None) -> Path:
    """Write ``out/step_NNNNNN/`` (layout in the module docstring) from every rank; collective.

    ``model``: the FSDP root (``objective.Objective``); ``student``: its student submodule;
    ``state``: the trainer state (``global_step``, ``epoch``, ``step_in_epoch``, …);
    ``adapter`` (the student's ``models.adapter.ModelAdapter``): given → also the ``save_pretrained``
    student (the final step; ``save_student`` on rank 0 with the gathered full-weight student). Crash-safe like ``checkpoint.save_checkpoint``:
    everything goes to a temporary sibling that rank 0 renames into place after every rank finished
    writing (a SIGKILL before that leaves a temporary directory, removed at the next launch); keeps the
    newest ``keep`` checkpoints. Returns the checkpoint directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, world = _rank_world()
    final = out / f"step_{state['global_step']:06d}"
    names = [str(atomic.tmp_name(final))]
    if world > 1:
        dist.broadcast_object_list(names, src=0)  # one directory for all ranks: rank 0's name
    tmp = Path(names[0])
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier(world)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / DCP_DIR), no_dist=world == 1)
    rngs = [torch.get_rng_state()]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, torch.get_rng_state())
    full = full_student(model, student) if adapter is not None else None
    if rank == 0:
        if adapter is not None:
            save_student(full, adapter, tmp)
        torch.save({"scheduler": sched.state_dict(), "rng_torch_per_rank": rngs, "parallel": "fsdp", "world": world},
                   tmp / TRAINING_STATE)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    _barrier(world)  # every rank's shard file is written (DCP's writer fsyncs its files)
    if rank == 0:
        atomic.publish_dir(tmp, final, keep)
    _barrier(world)
    return final


def load_checkpoint(ckpt: Path, model, opt, sched) -> None:
    """Restore weights (student + feature projector), optimizer state, scheduler and this rank's RNG
    from ``save_checkpoint``'s directory; collective. The sharded state is read with
    ``torch.distributed.checkpoint.load`` into the current model's own ``get_state_dict`` layout (so
    another world size works: DCP reshards) and applied with ``set_state_dict``. The RNG state is this
    rank's when the world size is unchanged, else rank 0's (as the DDP path restores rank 0's)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (ckpt / DCP_DIR / ".metadata").exists():
        raise RuntimeError(f"train-student: {ckpt} holds no sharded checkpoint ({DCP_DIR}/.metadata): it was not "
                           f"written with train_student.parallel=fsdp")
    rank, world = _rank_world()
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(ckpt / DCP_DIR), no_dist=world == 1)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ts = torch.load(ckpt / TRAINING_STATE, weights_only=False)
    sched.load_state_dict(ts["scheduler"])
    rngs = ts["rng_torch_per_rank"]
    torch.set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
