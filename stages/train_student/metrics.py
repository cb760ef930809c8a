"""What a train-student run records per step: ``metrics.jsonl`` (rank 0; one line per step: step, epoch,
lr, tokens, each term's value, loss, grad_norm, tokens_per_s, skip counters), TensorBoard (optional), the
progress bar, ``sample_ids.rank<R>.jsonl`` (``train_student.log_sample_ids``) and the late rejects
(``late.py``). On resume every file is cut back to the checkpoint's step, so a resumed run's records equal an
uninterrupted run's."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from . import late
from .checkpoint import truncate_metrics


class Metrics:
    def __init__(self, out: Path, rank: int, state: dict, total_steps: int, terms: list, log_ids: bool,
                 progress: bool):
        from tqdm import tqdm

        self.rank, self.terms, self.log_ids = rank, terms, log_ids
        self.path = out / "metrics.jsonl"
        self.ids_path = out / f"sample_ids.rank{rank}.jsonl"
        self.late_path = out / f"late_rejects.rank{rank}.jsonl"
        truncate_metrics(self.late_path, state["global_step"])
        if log_ids:
            truncate_metrics(self.ids_path, state["global_step"])
        self.tb = None
        if rank == 0:
            truncate_metrics(self.path, state["global_step"])
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=state["global_step"] + 1)
            except Exception:  # noqa: BLE001 - TensorBoard is optional; metrics.jsonl is the record
                self.tb = None
        self.bar = tqdm(total=total_steps, initial=state["global_step"], desc="train-student", unit="step",
                        disable=not progress or rank != 0, file=sys.stderr, dynamic_ncols=True)
        self.t_last = time.time()

    def step(self, state: dict, lr: float, result: dict) -> dict:
        """Record the step just taken (``step.run_step``'s result); returns the metrics record."""
        rec = {"step": state["global_step"], "epoch": state["epoch"], "lr": lr, **result["record"]}
        if self.log_ids:
            with open(self.ids_path, "a") as f:
                f.write(json.dumps({"step": state["global_step"], "epoch": state["epoch"], "ids": result["ids"]}) + "\n")
        if state.get("skipped_nonfinite"):
            rec["skipped_nonfinite"] = state["skipped_nonfinite"]  # steps skipped so far
            if not result["applied"]:
                rec["skipped"] = True
        late.log(self.late_path, state, result["gate"], rec, self.rank)
        now = time.time()
        rec["tokens_per_s"] = round(rec["tokens"] / max(1e-9, now - self.t_last), 1)
        self.t_last = now
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec, sort_keys=True) + "\n")
            keys = ["loss"] + [t.name for t in self.terms]
            if self.tb:
                for k in keys + ["lr", "grad_norm", "tokens_per_s", "skipped_nonfinite"]:
                    if k in rec:
                        self.tb.add_scalar(f"train/{k}", rec[k], rec["step"])
            self.bar.update(1)
            self.bar.set_postfix({k: f"{rec[k]:.4g}" for k in keys if k in rec} | {"tok/s": rec["tokens_per_s"]})
        return rec

    def close(self) -> None:
        self.bar.close()
        if self.tb:
            self.tb.close()
