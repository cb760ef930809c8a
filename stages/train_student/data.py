"""Streaming training data: teacher-cache shards joined with their sample shards.

Order of work (every rank runs the same stream, so batches are identical whatever the world
size — the DDP test relies on it):

1. ``CacheReader`` streams cache shard i; sample shard i of the cache's source stage is read as
   a dict id → row (one shard at a time: memory is bounded by the shard size).
2. Each sample is rendered in the *student's* prompt format and tokenised; its answer
   token ids must equal the cache's ``token_ids`` — otherwise it is rejected (``token_mismatch``)
   and counted. Valid samples flow through a seeded shuffle buffer spanning shards.
3. The shuffled stream is cut into global batches of ``batch_size`` (the last partial one is
   dropped, so every rank always has a full share). Rank r takes the r-th slice of each global
   batch, split into ``micro_batch_size`` micro-batches: one *step*.
4. With DataLoader workers, worker w builds the steps whose index ≡ w (mod W); the DataLoader
   returns them round-robin, i.e. in step order. Images are loaded, expanded by the student's
   processor (its own token count for that image) and tensors built only here, only for this rank's samples, only for steps not skipped on resume.

A micro-batch (``collate``) is ``batch.collate``'s: the student's forward inputs, and per row set the terms
read (``terms.row_sets``) the flat student positions with the teacher's cached fields at the matched rows
(``rows.align``), the affinity blocks, ``sample_ids`` and ``rejects``.

The student's adapter (processor + prompt format) is built once per process (``load_adapter``: a
small cache keyed by the model directory, the format and its processor files' size/mtime), not once
per epoch; forked DataLoader workers inherit it instead of each re-reading the tokenizer (~1 s per
worker per epoch).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from torch.utils.data import IterableDataset, get_worker_info

from ...models.answer_ids import row_conversation
from ...pipeline.rundir import StageDir
from ...schemas.samples import Reject, iter_samples, sample_image
from ...schemas.teacher_cache import CacheReader
from ...schemas.teacher_cache.fields import KIND_ANSWER, POSITIONS
from .batch import CollatePlan, collate as collate_batch
from .memo import MEMO, conv_bytes, conversation_key, encode_key

ANSWER = POSITIONS["answer"]


@dataclass(frozen=True)
class Source:
    """One teacher cache a training stream reads: ``cache`` = its directory relative to the run directory
    (its samples come from the stage its ``index.json`` names as ``source``), ``ids`` = the sample ids kept
    (None: all). An on-policy round reads its round cache and the base cache's other prompts (issue #24)."""

    cache: str = "cache_teacher"
    ids: Optional[frozenset] = None


BASE = (Source(),)  # train-student's stream: the run's one cache, every sample


@dataclass
class StudentTokens:
    """What the loader needs to rebuild the student's ``ModelAdapter`` (picklable, for worker processes)."""

    model_dir: str
    prompt_format: str
    pad_token_id: int


# processor files whose change must invalidate a cached adapter
_PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "tokenizer.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                    "processor_config.json", "generation_config.json", "config.json")
_ADAPTERS: dict = {}  # key → ModelAdapter, this process only (forked workers inherit it)
_MAX_ADAPTERS = 4


def _adapter_key(model_dir: str, prompt_format: str) -> tuple:
    d = os.path.abspath(model_dir)
    sig = []
    for name in _PROCESSOR_FILES:
        try:
            s = os.stat(os.path.join(d, name))
        except OSError:
            continue
        sig.append((name, s.st_size, s.st_mtime_ns))
    return d, prompt_format, tuple(sig)


def load_adapter(model_dir: str, prompt_format: str = "auto"):
    """``models.ModelAdapter(model_dir, prompt_format)``, built once per process (and per change of
    the directory's processor files)."""
    from ...models.adapter import ModelAdapter

    key = _adapter_key(model_dir, prompt_format)
    ad = _ADAPTERS.pop(key, None) or ModelAdapter(model_dir, prompt_format)
    _ADAPTERS[key] = ad
    while len(_ADAPTERS) > _MAX_ADAPTERS:
        _ADAPTERS.pop(next(iter(_ADAPTERS)))
    return ad


def student_tokens(model_dir: str, prompt_format: str = "auto") -> StudentTokens:
    """The student's adapter spec; the adapter is cached for the loader of this process and of its
    forked workers."""
    ad = load_adapter(model_dir, prompt_format)
    return StudentTokens(model_dir, prompt_format, ad.pad_token_id)


def stream_samples(run_dir: Path, st: StudentTokens, rejects: Optional[list] = None, *,
                   image_root: Optional[str] = None, check_images: bool = True, skip: frozenset = frozenset(),
                   root_hint: str = "", sources: tuple = BASE) -> Iterator[dict]:
    """Valid training samples in cache order (``sources`` one after another): ``{"id", "row", "conv", "cache",
    "encode_key"}`` (``conv``: the conversation in the student's prompt format, ``models.adapter.TextConversation``,
    from ``memo.MEMO`` when it holds it; ``encode_key``: the memo key of its processor outputs, or None).

    A sample is rejected (appended to ``rejects`` as ``{"id", "reason", "detail"}``) when its row is
    missing (``missing_sample``), the student's answer ids differ from the cache's (``token_mismatch``),
    or — with ``check_images`` — its image under ``image_root`` is missing or not the one ingest recorded
    (``schemas.samples.sample_image``: ``missing_image``, ``image_changed``, …; file read and hashed, not
    decoded). ``check_images=False`` trusts an earlier scan instead: ids in ``skip`` (the scan's image
    rejects) are left out silently, so every epoch, rank and worker sees the same stream whatever happens
    to the image folder meanwhile (a later change is caught when the image is loaded, ``StepDataset.collate``)."""
    adapter = load_adapter(st.model_dir, st.prompt_format)
    student = _adapter_key(st.model_dir, st.prompt_format)  # the memo's key for this student's processor
    for source in sources:
        yield from _stream_cache(Path(run_dir), adapter, student, source, rejects, image_root, check_images, skip,
                                 root_hint)


def _conversation(adapter, student: tuple, row: dict) -> tuple:
    """``(conversation key, TextConversation)`` of a row, from the memo (``memo.py``) when it holds it."""
    ck = conversation_key(row)
    conv = MEMO.get(("conv", student, ck))
    if conv is None:
        # sampled answer ids (an on-policy round's rows) are spliced in, never re-tokenised from text
        conv = row_conversation(adapter, row)
        MEMO.put(("conv", student, ck), conv, conv_bytes(conv))
    return ck, conv


def _stream_cache(run_dir: Path, adapter, student: tuple, source: Source, rejects: Optional[list],
                  image_root: Optional[str], check_images: bool, skip: frozenset, root_hint: str) -> Iterator[dict]:
    reader = CacheReader(run_dir / source.cache)
    src = StageDir(run_dir, reader.meta.get("source", "regenerate"))
    for entry in reader.shards:
        src.verify_shard(entry["shard"])  # the source rows are the ones the cache was made from
        rows = {r["id"]: r for r in iter_samples(src.data_file(entry["shard"]))}
        for s in reader.iter_shard(entry):
            if s["sample_id"] in skip or (source.ids is not None and s["sample_id"] not in source.ids):
                continue
            row = rows.get(s["sample_id"])
            try:
                if row is None:
                    raise Reject("missing_sample", f"{s['sample_id']} is not in {src.data_file(entry['shard']).name}")
                ck, conv = _conversation(adapter, student, row)
                mine = [conv.ids[p] for a, b in conv.spans for p in range(a, b)]
                theirs = s["token_ids"][s["kind"] == KIND_ANSWER].tolist()  # whatever positions the cache keeps
                if mine != theirs:
                    raise Reject("token_mismatch", f"student answer ids differ from the cache's "
                                                   f"({len(mine)} vs {len(theirs)} tokens)")
                if check_images:
                    sample_image(image_root, row, run_dir=run_dir, decode=False, root_hint=root_hint)
            except Reject as r:
                if rejects is not None:
                    rejects.append({"id": s["sample_id"], "reason": r.reason, "detail": r.detail})
                continue
            yield {"id": s["sample_id"], "row": row, "conv": conv, "cache": s,
                   "encode_key": encode_key(student, ck, row)}


def scan(run_dir: Path, st: StudentTokens, out_dir: Path, fingerprint: str, image_root: Optional[str],
         root_hint: str = "", world: int = 1, sources: tuple = BASE) -> tuple[dict, frozenset]:
    """The run's one pass over its samples before training (``stream_samples`` with the image check):
    ``({"fingerprint", "valid": n, "rejected": {reason: n}}, ids rejected)``. The step schedule is computed
    on ``valid``; the ids are ``StepDataset``'s ``skip``. Kept in ``out_dir/scan.json`` + ``rejects.jsonl``
    (rank 0 writes them) and reused while ``fingerprint`` holds, so a relaunch resumes on the same stream.
    With ``world`` > 1 every rank scans (or reads the files), then all take rank 0's result
    (``broadcast_object_list``): one stream on every rank even if the image folder changed during the scan."""
    import json

    from ...pipeline import atomic

    scan_file, rej_file = Path(out_dir) / "scan.json", Path(out_dir) / "rejects.jsonl"
    res = json.loads(scan_file.read_text()) if scan_file.exists() else None
    if res and res.get("fingerprint") == fingerprint and rej_file.exists():
        rejects = [json.loads(l) for l in rej_file.read_text().splitlines() if l.strip()]
        fresh = False
    else:
        rejects = []
        n_valid = sum(1 for _ in stream_samples(run_dir, st, rejects, image_root=image_root, root_hint=root_hint,
                                                sources=sources))
        by_reason: dict = {}
        for r in rejects:
            by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
        res, fresh = {"fingerprint": fingerprint, "valid": n_valid, "rejected": dict(sorted(by_reason.items()))}, True
    rank = 0
    if world > 1:
        import torch.distributed as dist

        rank = dist.get_rank()
        box = [(res, rejects, fresh)]
        dist.broadcast_object_list(box, src=0)
        res, rejects, fresh = box[0]
    if fresh and rank == 0:
        atomic.write_jsonl(rej_file, rejects)
        atomic.write_json(scan_file, res)
    return res, frozenset(r["id"] for r in rejects)


def shuffled(items: Iterator[dict], buffer: int, seed: int) -> Iterator[dict]:
    """Seeded shuffle buffer (spans shard boundaries)."""
    rng = random.Random(seed)
    buf: list[dict] = []
    for it in items:
        if len(buf) < buffer:
            buf.append(it)
            continue
        j = rng.randrange(buffer)
        out, buf[j] = buf[j], it
        yield out
    rng.shuffle(buf)
    yield from buf


class StepDataset(IterableDataset):
    """Yields this rank's training steps of one epoch: ``{"step", "micro_batches": [dicts above]}``.

    ``skip``: ids the scan rejected for their image (``stream_samples``): the stream itself does not
    re-read images, so it is the same on every rank and worker. ``root_hint``: how to point at the right
    image folder, for reject details."""

    def __init__(self, run_dir: Path, st: StudentTokens, image_root: Optional[str], *, batch_size: int,
                 micro_batch_size: int, rank: int, world: int, seed: int, epoch: int, shuffle_buffer: int,
                 start_step: int = 0, max_steps: int = 0, skip: frozenset = frozenset(), root_hint: str = "",
                 plan: CollatePlan = CollatePlan(((ANSWER, ("kind", "token_ids")),)), sources: tuple = BASE):
        if batch_size % (world * micro_batch_size):
            raise ValueError(f"train_student.batch_size={batch_size} must be a multiple of "
                             f"micro_batch_size × world size = {micro_batch_size} × {world}")
        self.run_dir, self.st, self.image_root = Path(run_dir), st, image_root
        self.G, self.mb, self.rank, self.world = batch_size, micro_batch_size, rank, world
        self.seed, self.epoch, self.buffer = seed, epoch, shuffle_buffer
        self.start_step, self.max_steps = start_step, max_steps
        self.skip, self.root_hint, self.plan, self.sources = frozenset(skip), root_hint, plan, sources

    def _adapter(self):
        return load_adapter(self.st.model_dir, self.st.prompt_format)

    def global_batches(self, rejects: Optional[list] = None) -> Iterator[list[dict]]:
        stream = shuffled(stream_samples(self.run_dir, self.st, rejects, check_images=False, skip=self.skip,
                                         sources=self.sources),
                          self.buffer, self.seed * 1_000_003 + self.epoch)
        batch: list[dict] = []
        for it in stream:
            batch.append(it)
            if len(batch) == self.G:
                yield batch
                batch = []

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        share = self.G // self.world
        for step, gb in enumerate(self.global_batches()):
            if self.max_steps and step >= self.max_steps:
                break
            if step < self.start_step or step % nw != wid:
                continue
            mine = gb[self.rank * share: (self.rank + 1) * share]
            yield {"step": step, "micro_batches": [self.collate(mine[i: i + self.mb], self.root_hint)
                                                   for i in range(0, share, self.mb)]}

    def collate(self, items: list[dict], root_hint: str = "") -> dict:
        """A micro-batch of ``items`` (``batch.collate``: the plan's row sets, aligned per sample), plus
        ``rejects``: the items left out because their image is no longer the one the scan checked
        (``schemas.samples.sample_image``: ``missing_image``, ``image_changed``, …), the student's processor
        cannot take them (``processor_error``…) or their rows do not align with the cache's
        (``image_token_count``, ``prompt_mismatch``), each ``{"id", "reason", "detail"}``. Every item left
        out → only ``sample_ids`` ([]) and ``rejects``."""
        return collate_batch(self._adapter(), items, self.plan,
                             lambda row, decode=True: sample_image(self.image_root, row, run_dir=self.run_dir,
                                                                   decode=decode, root_hint=root_hint))
