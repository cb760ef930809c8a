"""Samples whose problem shows only at their step (issue #22, classes 3 and 8).

The scan before training (``data.scan``) rejects every sample whose image is missing or not the one ingest
recorded, so the step schedule counts only samples that can train. An image can still change or vanish
between the scan and the step that loads it (someone edits the folder during a run). ``StepDataset.collate``
then leaves that sample out of its micro-batch with a reject (``missing_image``, ``image_changed``,
``undecodable_image``, ``processor_error`` …, and ``rows.py``'s ``image_token_count`` / ``prompt_mismatch`` when a
term reads image or prompt rows) instead of raising inside the DataLoader. Decided here:

- the step trains on the samples left; each term is still normalised by its rows (or samples) actually in the
  step (all ranks together), so the gradient is the mean over the samples that trained;
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
    step is skipped), ``norms`` (term name → (rows, samples) in them, all ranks: ``objective.row_weights``),
    ``tokens`` (answer rows in them, all ranks), ``n_late`` (late rejects, all ranks), ``skipped``, ``rejects``
    (this rank's, ``{"id", "reason", "detail"}``)."""

    run: list
    norms: dict
    tokens: float
    n_late: int
    skipped: bool
    rejects: list = field(default_factory=list)


def gate(micro_batches: list[dict], terms: list, world: int, device) -> Gate:
    """Agree across ranks (one all-reduce, the one that sums the step's per-term row and sample counts) on
    which micro-batches of this step train: module docstring."""
    from .objective import counts

    run = [mb for mb in micro_batches if mb["sample_ids"]]
    rejects = [r for mb in micro_batches for r in mb["rejects"]]
    per = [0.0] * (2 * len(terms))
    tokens = 0.0
    for mb in run:
        per = [a + b for a, b in zip(per, counts(terms, mb))]
        first = next(iter(mb["sets"].values()), None)
        tokens += float((first["kind"] == 2).sum()) if first is not None else 0.0
    vec = torch.tensor(per + [tokens, float(len(micro_batches) - len(run)), float(len(rejects))],
                       dtype=torch.float64, device=device)  # on the device: NCCL reduces no CPU tensor
    if world > 1:
        dist.all_reduce(vec)
    v = vec.tolist()
    n = len(per)
    skipped = not any(v[:n]) or (world > 1 and v[n + 1] > 0)
    norms = {t.name: (v[2 * i], v[2 * i + 1]) for i, t in enumerate(terms)}
    return Gate([] if skipped else run, norms, v[n], int(v[n + 2]), skipped, rejects)


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
