"""What one on-policy round is before it runs (issue #24): its directories, its seed, its prompts, its
generator and starting state, and the fingerprint it chains.

``RUN/on_policy/round_<r>/``::

    prompts.json            the round's prompt draw: {"round", "seed", "on_policy": [ids], "base": [ids]}
    generate/               the student's answers (a shard stage: part-NNNNN.parquet, _done/, rejects/, stats/)
    cache_teacher/          the teacher's pass over exactly those answer ids (the base cache's fields)
    train_student/          the continued student (train-student's layout, its own config.yaml)
    round.json              written when the round finishes: seed, generator, prompts, steps, final checkpoint

Round r's generator — the student that answers — and its starting state are round r−1's final checkpoint;
round 1's are train-student's final checkpoint on the base cache (``on_policy.start=trained``) or the
initial student (``initial``). A generator is known by the sha256 of every byte of its weights
(``models.engines.common.weights_sha256``), and round r's generate fingerprint holds it and round r−1's
train fingerprint, so every round chains all the rounds before it (and the base run).
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ...pipeline.config import LlavadiConfig
from ...pipeline.rundir import StageDir
from ...pipeline.runner import StageError
from ...schemas.samples import iter_samples

ON_POLICY_DIR = "on_policy"
PARTS = ("generate", "cache_teacher", "train_student")


def round_dir(r: int) -> str:
    """Round ``r``'s directory, relative to the run directory (a ``StageDir`` name)."""
    return f"{ON_POLICY_DIR}/round_{r}"


def part_dir(r: int, part: str) -> str:
    return f"{round_dir(r)}/{part}"


def round_seed(seed: int, r: int) -> int:
    """Round ``r``'s seed from ``on_policy.seed``: its prompt draw, answer sampling and shuffle."""
    h = hashlib.blake2b(f"{seed}\x00on_policy_round\x00{r}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def done_rounds(run_dir: Path) -> list[int]:
    """Rounds with a ``round.json`` (finished), ascending."""
    base = Path(run_dir) / ON_POLICY_DIR
    out = []
    for p in base.glob("round_*"):
        tail = p.name[len("round_"):]
        if tail.isdigit() and (p / "round.json").exists():
            out.append(int(tail))
    return sorted(out)


def base_source(run_dir: Path) -> str:
    """The stage directory the base cache was made from (``regenerate`` or ``data``): the prompts' rows."""
    index = Path(run_dir) / "cache_teacher" / "index.json"
    if not index.exists():
        raise StageError(f"on-policy: {run_dir} has no finished teacher cache: run `llavadi cache-teacher {run_dir}` first")
    return json.loads(index.read_text())["meta"].get("source", "regenerate")


def select_prompts(run_dir: Path, cfg: LlavadiConfig, r: int) -> tuple[list[str], list[str]]:
    """(ids the student re-answers, ids trained on with their base-cache answers) of round ``r``: a seeded draw
    of ``prompts_per_round`` (0: all) from the base cache's source shards in shard and row order, the first
    ``round(fraction × drawn)`` (at least 1) re-answered."""
    op = cfg.on_policy
    src = StageDir(Path(run_dir), base_source(run_dir))
    pool = [row["id"] for i in src.done_indices() for row in iter_samples(src.data_file(i), columns=["id"])]
    rng = random.Random(round_seed(op.seed, r))
    if op.prompts_per_round and op.prompts_per_round < len(pool):
        drawn = rng.sample(pool, op.prompts_per_round)
    else:
        drawn = list(pool)
        rng.shuffle(drawn)
    n_on = max(1, round(op.fraction * len(drawn))) if drawn else 0
    return drawn[:n_on], drawn[n_on:]


def rel_path(path: Path | str, run_dir: Path | str) -> str:
    """``path`` relative to ``run_dir`` when inside it (what fingerprints hold: a moved run keeps them), else
    absolute."""
    p, r = Path(path).resolve(), Path(run_dir).resolve()
    return str(p.relative_to(r)) if p.is_relative_to(r) else str(p)


def digest(ids: list[str]) -> str:
    return hashlib.sha256("\x00".join(ids).encode()).hexdigest()


@dataclass(frozen=True)
class RoundStart:
    """Where round ``r`` starts: ``generator`` (the model directory that answers), ``init`` (the checkpoint
    whose full training state continues; None: the initial student, fresh), ``previous`` (the fingerprint the
    round chains: round r−1's train part, train-student's, or the initial student's weights hash)."""

    r: int
    generator: Path
    init: Optional[Path]
    previous: str


def _final(sd: StageDir, what: str, fix: str) -> tuple[Path, str]:
    m = sd.read_manifest() or {}
    if not m.get("complete") or not m.get("final_checkpoint"):
        raise StageError(f"on-policy: {what} ({sd.path}) has not finished: {fix}")
    return sd.path / "checkpoints" / m["final_checkpoint"], m["fingerprint"]


def round_start(run_dir: Path, cfg: LlavadiConfig, r: int) -> RoundStart:
    """Round ``r``'s generator, starting state and chained fingerprint (module doc). Raises ``StageError``
    naming what must finish first."""
    from ...models.engines.common import weights_sha256

    run_dir = Path(run_dir)
    if r > 1:
        ckpt, fp = _final(StageDir(run_dir, part_dir(r - 1, "train_student")), f"round {r - 1}'s training",
                          f"rerun `llavadi on-policy {run_dir} --rounds {r - 1}`")
        return RoundStart(r, ckpt, ckpt, fp)
    if cfg.on_policy.start == "trained":
        ckpt, fp = _final(StageDir(run_dir, "train_student"), "train-student on the base cache",
                          f"run `llavadi train-student {run_dir}` first, or set on_policy.start=initial")
        return RoundStart(1, ckpt, ckpt, fp)
    student = cfg.train_student.student
    if not student or not (Path(student) / "config.json").exists():
        raise StageError(f"on-policy: on_policy.start=initial needs train_student.student, a model directory "
                         f"(got {student!r}): pass train_student.student=DIR")
    return RoundStart(1, Path(student), None, "initial:" + weights_sha256(student))
