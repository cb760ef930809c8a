"""A training run that continues another's full state on other data: an on-policy round's train part
(issue #24). ``train(..., cont=Continuation(...))`` differs from train-student in four things only:

- its stream reads ``sources`` (``data.Source``: the round cache, and the base cache's other prompts) in one
  pass: ``steps`` = usable samples // ``batch_size``;
- it starts from ``init``'s checkpoint — weights, AdamW moments, scheduler (its step count), feature
  projectors, torch RNG, the global step — instead of the initial student (``init`` None: the initial
  student, a fresh start);
- its learning rate is ``lr``, constant (``train_student.schedule=constant``, no warmup: set by the caller);
- its fingerprint chains ``upstream_fingerprint`` (the round cache's) and holds ``material``.

The round's data position is the step within the round (``trainer_state.json``: ``epoch`` 0,
``step_in_epoch``; ``round_start_step`` = the global step it started from), so a kill inside the round
resumes from the round's own newest checkpoint, exactly as train-student does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class Continuation:
    sources: tuple  # data.Source, read one after another, then shuffled
    init: Optional[Path]  # checkpoint whose full state continues (None: the initial student)
    upstream_fingerprint: str  # the round cache's stage fingerprint
    lr: float  # the constant learning rate of this run
    material: dict = field(default_factory=dict)  # the rest of what determines the result (prompts, rounds keys)


def start_step(cont: Optional[Continuation]) -> int:
    """The global step the continued checkpoint ended at (0 without one)."""
    if cont is None or cont.init is None:
        return 0
    return int(json.loads((Path(cont.init) / "trainer_state.json").read_text())["global_step"])


def begin(built, cont: Continuation, total_steps: int, fp: str) -> None:
    """The state ``build`` loaded from ``cont.init``, turned into the start of this run: the position in its
    own stream at 0, its step budget and fingerprint, and the learning rate ``cont.lr`` in the optimizer and
    as the scheduler's base (its step count kept: the schedule's state carries on)."""
    st = built.state
    st.update({"epoch": 0, "step_in_epoch": 0, "total_steps": total_steps, "fingerprint": fp,
               "round_start_step": st["global_step"]})
    for g in built.opt.param_groups:
        g["lr"] = cont.lr
        g["initial_lr"] = cont.lr
    built.sched.base_lrs = [cont.lr] * len(built.opt.param_groups)
    built.sched._last_lr = [cont.lr] * len(built.opt.param_groups)
