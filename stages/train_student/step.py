"""One optimizer step of train-student: the micro-batches' forward and backward through the objective
(``objective.Objective``: every declared term), then clipping, the cross-rank finiteness check and the
update (``apply_update``), and the step's metrics record."""
from __future__ import annotations

import math
import sys
import warnings

import torch
import torch.distributed as dist

from ...pipeline.runner import StageError
from . import late, parallel
from .batch import to_device


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def run_step(ddp, micro_batches: list, terms: list, opt, sched, params, c, state: dict, world: int, device) -> dict:
    """Forward/backward of this rank's micro-batches, then the update. Returns the step's record: ``tokens``
    (answer rows, all ranks), each term's value (its normalised mean over the global batch), ``loss``
    (``Σ weight · value``), ``grad_norm``, ``applied`` and the gate (``late.Gate``, for the late-reject log)."""
    g = late.gate(micro_batches, terms, world, device)  # samples whose image or rows failed at load: left out
    sums = {t.name: 0.0 for t in terms}
    ok_local = True  # every micro-batch loss of this rank finite
    for i, mb in enumerate(g.run):
        mb = to_device(mb, device)
        mb["norms"] = g.norms
        sync = (i == len(g.run) - 1) or world == 1
        # FSDP reduce-scatters every micro-batch (no unsharded gradient kept between them)
        ctx = ddp.no_sync() if (world > 1 and not sync and c.parallel != "fsdp") else _Null()
        with ctx:
            loss, values = ddp(mb)
            # the rows carry global normalisers: this is the rank's share of the global mean; DDP averages
            # gradients over the ranks, so × world gives exactly the single-process gradient
            (loss * world).backward()
        ok_local = ok_local and math.isfinite(float(loss.detach()))
        for k, v in values.items():
            sums[k] += float(v)
    ids = [i for mb in g.run for i in mb["sample_ids"]]
    vec, gnorm, applied = apply_update(opt, sched, params, c, state, sums, ok_local, ids, world)
    rec = {"tokens": int(g.tokens), **{t.name: float(vec[j]) for j, t in enumerate(terms)}}
    rec["loss"] = sum(t.weight * rec[t.name] for t in terms)
    if gnorm is not None:
        rec["grad_norm"] = float(gnorm)
    return {"record": rec, "applied": applied, "gate": g, "ids": ids}


def apply_update(opt, sched, params, c, state: dict, sums: list, ok_local: bool, ids: list, world: int):
    """End of a step, after backward: clip, agree on finiteness across ranks, then update or not.

    ``sums``: this rank's term values (term name → value, in term order); ``ok_local``: its micro-batch losses were finite;
    ``ids``: its sample ids. The gradient norm (the clipping one, or the plain norm when clipping is off)
    must be finite too. The flag rides in the all-reduce of the term values, so every rank decides alike.
    A non-finite step never reaches the weights (its gradients are dropped before ``opt.step``):
    ``c.nonfinite == "stop"`` raises ``StageError`` naming the step and every rank's sample ids; ``"skip"``
    counts it in ``state["skipped_nonfinite"]`` and goes on (the scheduler still steps, so the schedule stays
    aligned with ``global_step``). Returns (all-reduced term values, the clipping grad norm or None, whether
    the weights were updated)."""
    if c.max_grad_norm > 0:
        gnorm = norm = parallel.full_tensor(torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm))  # FSDP: a DTensor
    else:
        gnorm, grads = None, [p.grad for p in params if p.grad is not None]
        norm = parallel.full_tensor(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                                    if grads else torch.zeros(()))
    ok = ok_local and bool(torch.isfinite(norm))
    n = len(sums)
    vec = torch.tensor(list(sums.values()) + [0.0 if ok else 1.0], dtype=torch.float64)
    if world > 1:  # NCCL reduces device tensors only (gloo either)
        vec = vec.to(norm.device)
        dist.all_reduce(vec)
        vec = vec.cpu()
    applied = bool(vec[n] == 0) and bool(torch.isfinite(vec[:n]).all())
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
        if (dist.get_rank() if world > 1 else 0) == 0:
            print(f"[train-student] step {state['global_step'] + 1}: non-finite loss or gradient, step skipped "
                  f"(sample ids {list(ids)}; {state['skipped_nonfinite']} skipped so far)", file=sys.stderr)
    with warnings.catch_warnings():  # a skipped first step: the schedule advances without an optimizer step, on purpose
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        sched.step()
    opt.zero_grad(set_to_none=True)
    return vec[:n], gnorm, applied
