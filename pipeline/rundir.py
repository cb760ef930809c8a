"""The run directory: a public contract (design §3).

```
RUN/
  config.yaml                     resolved config of the whole run
  <stage>/ part-00000.<ext> …     shard i is produced from input shard i
           _done/00000.json …     completion markers, written last
           rejects/00000.jsonl    record-level problems, one JSON object per line with "reason"
           stats/00000.json       per-shard statistics (timings, sizes)
           _stage.json            fingerprint, resolved stage section, planned shard count
           _lock.json             present while a launch runs (pid, host, start time)
```

A shard is done only when ``_done/NNNNN.json`` exists. It records the stage fingerprint,
counts (``in``, ``out``, ``rejected`` by reason) and the sha256 of the data file.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from . import atomic

STAGE_ORDER = ["data", "regenerate", "cache_teacher", "train_student", "eval"]
# the CLI command for each stage directory, for messages that tell users what to run
STAGE_COMMAND = {
    "data": "ingest",
    "regenerate": "regenerate",
    "cache_teacher": "cache-teacher",
    "train_student": "train-student",
    "eval": "eval",
    "on_policy": "on-policy",  # every part of every round (on_policy/round_<r>/<part>/): command_for
}


def command_for(stage_dir: str) -> str:
    """The CLI command that (re)makes a run-dir stage directory (``on_policy/round_2/generate`` → ``on-policy``)."""
    return STAGE_COMMAND.get(stage_dir.split("/")[0], stage_dir)


class CorruptShardError(RuntimeError):
    """A finished shard's data file no longer matches its ``_done`` marker."""


def shard_name(i: int) -> str:
    return f"{i:05d}"


@dataclass(frozen=True)
class StageDir:
    root: Path
    name: str
    ext: str = "parquet"

    @property
    def path(self) -> Path:
        return self.root / self.name

    def data_file(self, i: int) -> Path:
        return self.path / f"part-{shard_name(i)}.{self.ext}"

    def done_file(self, i: int) -> Path:
        return self.path / "_done" / f"{shard_name(i)}.json"

    def rejects_file(self, i: int) -> Path:
        return self.path / "rejects" / f"{shard_name(i)}.jsonl"

    def stats_file(self, i: int) -> Path:
        return self.path / "stats" / f"{shard_name(i)}.json"

    @property
    def manifest_file(self) -> Path:
        return self.path / "_stage.json"

    @property
    def lock_file(self) -> Path:
        return self.path / "_lock.json"

    @property
    def staging(self) -> Path:
        """Scratch inputs a stage spills for its workers; deleted shard by shard when done."""
        return self.path / "_staging"

    def mkdirs(self) -> None:
        for sub in ("_done", "rejects", "stats"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------- completion

    def done_indices(self) -> list[int]:
        d = self.path / "_done"
        if not d.exists():
            return []
        return sorted(int(p.stem) for p in d.glob("*.json") if p.stem.isdigit())

    def read_done(self, i: int) -> Optional[dict]:
        p = self.done_file(i)
        if not p.exists():
            return None
        return json.loads(p.read_text())

    def verify_shard(self, i: int) -> None:
        """Check shard ``i``'s data file against the sha256 its ``_done`` marker recorded when it was
        made; ``CorruptShardError`` names the file and the fix (truncated, bit-flipped, missing)."""
        marker = self.read_done(i)
        if not marker or not marker.get("data_file") or not marker.get("sha256"):
            return
        path = self.path / marker["data_file"]
        problem = None
        if not path.exists():
            problem = "is missing"
        elif atomic.sha256_path(path) != marker["sha256"]:
            problem = "is corrupt (its sha256 differs from the one recorded when it was written)"
        if problem:
            raise CorruptShardError(
                f"shard file {path} {problem}. Delete {self.done_file(i)} and rerun "
                f"`llavadi {command_for(self.name)}` on this run: it rebuilds only that shard "
                f"(then rerun the stages after it).")

    def is_done(self, i: int, fingerprint: str) -> bool:
        d = self.read_done(i)
        return d is not None and d.get("fingerprint") == fingerprint

    def read_manifest(self) -> Optional[dict]:
        if not self.manifest_file.exists():
            return None
        return json.loads(self.manifest_file.read_text())

    def write_manifest(self, manifest: dict) -> None:
        atomic.write_json(self.manifest_file, manifest)

    def has_outputs(self) -> bool:
        return bool(self.done_indices()) or self.manifest_file.exists()

    def wipe(self) -> None:
        """Remove every output of this stage (``--force``); the lock file is kept."""
        if not self.path.exists():
            return
        for p in self.path.iterdir():
            if p.name == self.lock_file.name:
                continue
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()


def write_done(stage: StageDir, i: int, *, fingerprint: str, counts: dict, data_file: Optional[Path],
               extra: Optional[dict] = None) -> dict:
    """Write the completion marker — the last write of a shard."""
    marker: dict[str, Any] = {
        "shard": i,
        "fingerprint": fingerprint,
        "counts": counts,
        "data_file": data_file.name if data_file is not None else None,
        "sha256": atomic.sha256_path(data_file) if data_file is not None else None,
    }
    if extra:
        marker.update(extra)
    atomic.write_json(stage.done_file(i), marker)
    return marker
