"""Samples whose problem shows only at their step (issue #22, classes 3 and 8).

The scan before training (``data.scan``) rejects every sample whose image is missing or not the one ingest
recorded, so the step schedule counts only samples that can train. An image can still change or vanish
between the scan and the step that loads it (someone edits the folder during a run). ``StepDataset.collate``
then leaves that sample out of its micro-batch with a reject (``missing_image``, ``image_changed``,
``undecodable_image``, ``processor_error`` …) instead of raising inside the DataLoader. Decided here:

- the step trains on the samples left; the loss is still normalised by the answer tokens actually in the step
  (all ranks together), so the gradient is the mean over the samples that trained;
- a micro-batch left with no sample is skipped; with several ranks (DDP's last micro-batch and every FSDP
  micro-batch are collectives) any empty micro-batch on any rank skips the whole step on every rank: no
  weight update, the learning-rate schedule still advances (as ``nonfinite=skip`` does);
- each such reject is appended to ``train_student/late_rejects.rank<R>.jsonl`` with its step (truncated to the
  checkpoint on resume, like ``metrics.jsonl``), and the step's metrics record ``rejected_late`` (count over all
  ranks) and ``skipped_no_sample`` (steps skipped so far).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass
class Gate:
    """One step's micro-batches after the late rejects: ``run`` (the micro-batches to train on; [] when the
    step is skipped), ``n_global`` (answer tokens in them, all ranks; float32 scalar tensor on the device),
    ``n_late`` (late rejects, all ranks), ``skipped``, ``rejects`` (this rank's, ``{"id", "reason", "detail"}``)."""

    run: list
    n_global: torch.Tensor
    n_late: int
    skipped: bool
    rejects: list = field(default_factory=list)


def gate(micro_batches: list[dict], world: int, device) -> Gate:
    """Agree across ranks (one all-reduce, the one that already summed the step's token count) on which
    micro-batches of this step train: module docstring."""
    run = [mb for mb in micro_batches if mb["sample_ids"]]
    rejects = [r for mb in micro_batches for r in mb["rejects"]]
    vec = torch.tensor([float(sum(len(mb["targets"]) for mb in run)), float(len(micro_batches) - len(run)),
                        float(len(rejects))], device=device)  # on the device: NCCL reduces no CPU tensor
    if world > 1:
        dist.all_reduce(vec)
    skipped = float(vec[0]) == 0 or (world > 1 and float(vec[1]) > 0)
    return Gate([] if skipped else run, vec[0], int(vec[2]), skipped, rejects)


def log(path: Path, state: dict, g: Gate, rec: dict, rank: int) -> None:
    """Write this rank's late rejects of the step just taken (``state["global_step"]``) to ``path``; add the
    step's counts to its metrics record ``rec`` and ``state``."""
    if g.rejects:
        with open(path, "a") as f:
            for r in g.rejects:
                f.write(json.dumps({"step": state["global_step"], **r}) + "\n")
    if g.n_late:
        rec["rejected_late"] = g.n_late
        state["rejected_late"] = state.get("rejected_late", 0) + g.n_late
    if g.skipped:
        state["skipped_no_sample"] = state.get("skipped_no_sample", 0) + 1
        rec["skipped"] = True
    if state.get("skipped_no_sample"):
        rec["skipped_no_sample"] = state["skipped_no_sample"]
    if g.n_late and rank == 0:
        print(f"[train-student] step {state['global_step']}: {g.n_late} sample(s) left out, their image changed or "
              f"vanished since the scan ({path.parent / 'late_rejects.rank*.jsonl'})"
              + ("; no sample left in a micro-batch: step skipped" if g.skipped else ""), file=sys.stderr)
