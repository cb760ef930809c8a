"""``llavadi cache-teacher``: the teacher's work, cached once for any number of students.

Teacher-forced forward over each whole conversation of ``regenerate/`` (default) or ``data/``
(``cache_teacher.source``: the study's regenerated-or-original ablation). At the rows
``cache_teacher.positions`` keeps (answer / + prompt / + image positions; ``models.adapter.Encoded.rows``)
it stores the fields the config declares (``pipeline.cache_plan.cache_spec`` → ``schemas.teacher_cache``):
hidden states of ``hidden_layers``, top-k or sampled logits and logit statistics, the image × answer
affinity. Image rows of causal families go once per unique image to ``image_rows/``.

Outputs: ``cache_teacher/part-NNNNN.zarr`` (or ``.tar``) per input shard, ``image_rows/``, ``index.json``
and ``teacher_head.safetensors`` (the output projection: with it a student that shares the vocabulary
recomputes the exact full-vocabulary teacher distribution from ``hidden``).

Rejects: ``token_mismatch`` (template tokenisation is not prefix-stable at a turn boundary),
``missing_image`` / ``image_changed`` / ``undecodable_image`` (``schemas.samples.sample_image``: the image is
checked against the sha256 ingest recorded), ``too_long`` (conversation longer than the teacher's context),
``model_error``; on rows with sampled answer ids (``answer_token_ids``: an on-policy round's, issue #24) the
ids are scored as they are (``models.answer_ids``) and an answer the format cannot hold is rejected with the
reasons listed there.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from ..models.answer_ids import row_conversation
from ..models.engines.common import max_model_len, output_head
from ..models.engines.forcing import ForceRequest, make_forcer, vllm_problems
from ..pipeline import atomic
from ..pipeline.cache_plan import cache_spec
from ..pipeline.config import LlavadiConfig
from ..pipeline.estimate import space_problems
from ..pipeline.overlap import Prefetch, Sink
from ..pipeline.stage import (ShardOutput, ShardTask, StageContext, engine_installed, plan_from_upstream,
                              teacher_resources)
from ..schemas.conversation import tokenizer_hash
from ..schemas.samples import Reject, iter_samples, sample_image
from ..schemas.teacher_cache import (KIND_IMAGE, CacheShardWriter, ImageRowStore, hidden_field_name,
                                     image_key, write_index)
from ..schemas.teacher_cache.fields import check_rows
from .regenerate import teacher_identity, teacher_preflight

HEAD_FILE = "teacher_head.safetensors"
WINDOW_BATCHES = 8  # conversations are sorted by length within windows of 8 batches (less padding)


@dataclass
class Prepared:
    """One conversation ready for the teacher: its request and what the writer needs besides the
    teacher's outputs (row kinds and next tokens, the image-row key)."""

    sample_id: str
    index: int  # input index in the shard
    source: Optional[str]
    req: ForceRequest
    kinds: np.ndarray  # [n] uint8
    next_ids: np.ndarray  # [n] int64: token at position + 1
    answer_ids: list
    key: Optional[bytes] = None  # image_rows entry (None: no image, or image rows kept per sample)


class CacheTeacherStage:
    name = "cache-teacher"
    dir_name = "cache_teacher"
    ext = "zarr"
    upstream = "regenerate"

    def upstream_for(self, cfg: LlavadiConfig) -> str:
        return cfg.cache_teacher.source

    def ext_for(self, cfg: LlavadiConfig) -> str:
        return "zarr" if cfg.cache_teacher.store == "zarr" else "tar"

    def preflight(self, cfg: LlavadiConfig, run_dir: Path) -> list[str]:
        # the disk-space check (pipeline/estimate.py) only once the teacher is known to load
        c = cfg.cache_teacher
        return (engine_installed(c.engine, "cache_teacher.engine")
                or teacher_preflight(cfg, c.engine)
                or (vllm_problems(cache_spec(cfg)) if c.engine == "vllm" else [])
                or space_problems(run_dir, cfg, probe=lambda: _probe(run_dir, cfg)))

    def material(self, cfg: LlavadiConfig, run_dir: Path) -> dict:
        c = asdict(cfg.cache_teacher)
        for k in ("batch_size", "vllm_requests"):  # batching does not change the cached values beyond float noise
            c.pop(k)
        for k in ("estimate_rows", "estimate_probe_samples", "ignore_space_check"):  # the pre-launch size check
            c.pop(k)
        return {"cache_teacher": c, "teacher_identity": teacher_identity(cfg), "teacher_dtype": cfg.teacher.dtype,
                "image_root": cfg.ingest.image_root}

    def resources(self, cfg: LlavadiConfig) -> dict:
        return teacher_resources(cfg)

    def plan(self, ctx: StageContext, is_done: Callable[[int], bool]) -> Iterator[ShardTask | int]:
        return plan_from_upstream(ctx, is_done)

    def setup(self, ctx: StageContext):
        c = ctx.cfg.cache_teacher
        return make_forcer(c.engine, ctx.cfg.teacher, cache_spec(ctx.cfg), c.sample_seed)

    def prepare(self, ctx: StageContext, forcer, row: dict, limit: int, index: int = 0) -> Prepared:
        """A sample row → its teacher-forcing request and row layout, or raise ``Reject``. The answer
        spans, image positions and forward inputs come from the teacher's ``models.ModelAdapter``."""
        spec = forcer.spec
        # a row with the sampled answer ids (an on-policy round's: issue #24) is scored on exactly those ids
        conv = row_conversation(forcer.adapter, row)
        # checked against the sha256 ingest recorded: a changed / missing image is this record's Reject
        image = sample_image(ctx.cfg.ingest.image_root, row, run_dir=ctx.run_dir)
        enc = forcer.adapter.encode(conv, image)
        if len(enc.ids) > limit:
            raise Reject("too_long", f"{len(enc.ids)} tokens > max_model_len={limit}")
        positions, kinds = enc.rows(spec.kinds)
        img = enc.image_positions
        aff = (img, enc.answer_token_positions) if spec.affinity and img else None
        key = None
        if spec.image_rows_separate and img:
            key = image_key(enc.ids[: img[-1] + 2], enc.inputs)
        req = ForceRequest(enc.ids, positions, enc.inputs, image, conv.text, row["id"], aff)
        next_ids = np.asarray([enc.ids[p + 1] for p in positions], dtype=np.int64)
        return Prepared(row["id"], index, row.get("source"), req, np.asarray(kinds, np.uint8), next_ids,
                        enc.answer_ids, key)

    def process(self, ctx: StageContext, forcer, task: ShardTask) -> ShardOutput:
        """Three overlapped steps joined by bounded queues (``pipeline.overlap``), so the teacher forward
        never waits on the CPU work around it: a reader thread reads rows, tokenises and loads the images
        of the next window (``prepare``) while the calling thread runs the forward passes and the output
        head of the current one, and a writer thread encodes/writes the window before (``CacheShardWriter.add``,
        ``ImageRowStore.put``). Windows, their batches and the order of ``add`` are those of a serial loop
        (input order), so the bytes do not depend on thread timing. An exception in any step stops the
        others and is raised here; the temporary shard is removed."""
        c = ctx.cfg.cache_teacher
        limit = max_model_len(ctx.cfg.teacher)
        spec = forcer.spec
        out = ctx.stage.data_file(task.index)
        writer = CacheShardWriter(out, spec)
        images = ImageRowStore(ctx.stage.path, spec)
        rejects, reasons = [], {}
        n_in = 0
        t_fwd = 0.0
        t0 = time.time()
        batch_size = c.vllm_requests if c.engine == "vllm" else c.batch_size  # vLLM: no padding, one encode call
        window_size = batch_size * WINDOW_BATCHES
        cpu = {"prepare": 0.0, "write": 0.0}  # CPU seconds of the reader / writer threads (overlapped work)
        rows_by_kind = [0, 0, 0]
        written = {"answer_tokens": 0, "image_bytes": 0}

        def reject(i: int, sid: str, source, reason: str, detail: str) -> None:
            # from the reader thread (prepare) and this one (model_error): sorted by input index at the end
            reasons[reason] = reasons.get(reason, 0) + 1
            rejects.append((i, {"id": sid, "source": source, "reason": reason, "detail": detail}))

        def prepared_windows() -> Iterator[tuple[list, list[int]]]:  # reader thread
            nonlocal n_in

            def prep(window):
                prepared = []
                base = n_in - len(window)  # input index of window[0]
                for i, row in enumerate(window):
                    try:
                        prepared.append(self.prepare(ctx, forcer, row, limit, base + i))
                    except Reject as r:
                        reject(base + i, row["id"], row.get("source"), r.reason, r.detail)
                # sorted by length within the window: less padding per batch
                return prepared, sorted(range(len(prepared)), key=lambda j: (len(prepared[j].req.input_ids), j))

            t = time.thread_time()
            window: list[dict] = []
            for row in iter_samples(task.payload):
                n_in += 1
                window.append(row)
                if len(window) == window_size:
                    item = prep(window)
                    cpu["prepare"] += time.thread_time() - t
                    yield item
                    t = time.thread_time()
                    window = []
            if window:
                item = prep(window)
                cpu["prepare"] += time.thread_time() - t
                yield item

        def write(item) -> None:  # writer thread
            t = time.thread_time()
            prepared, results = item
            for p, r in zip(prepared, results):  # input order
                if r is None:  # the teacher failed on this record (rejected as model_error)
                    continue
                rows, sample = sample_fields(spec, p, r)
                if spec.image_rows_separate:
                    img = p.kinds == KIND_IMAGE
                    if p.key is not None and img.any():
                        part = {k: v[img] for k, v in rows.items()}
                        written["image_bytes"] += images.put(p.key, task.index, check_rows(spec, p.sample_id, part),
                                                             int(img.sum()))
                    rows = {k: v[~img] for k, v in rows.items()}
                    sample["image_key"] = np.frombuffer(p.key or b"", dtype=np.uint8)
                writer.add(p.sample_id, rows, sample)
                for k in range(3):
                    rows_by_kind[k] += int((p.kinds == k).sum())
                written["answer_tokens"] += len(p.answer_ids)
            cpu["write"] += time.thread_time() - t

        reader = Prefetch(prepared_windows, depth=1, name=f"cache-teacher-read-{task.index}")
        sink = Sink(write, depth=2, name=f"cache-teacher-write-{task.index}")
        try:
            for prepared, order in reader:
                results: list = [None] * len(prepared)
                for b in range(0, len(order), batch_size):
                    idx = order[b: b + batch_size]
                    t = time.time()
                    for j, r in zip(idx, _score_each(forcer, [prepared[j] for j in idx], reject)):
                        results[j] = r
                    t_fwd += time.time() - t
                sink.put((prepared, results))
            sink.finish()  # waits for the last window's adds; raises the writer's error
            t_close = time.time()
            info = writer.close()
            t_close = time.time() - t_close
        except BaseException:
            reader.stop()
            sink.stop()
            writer.abort()
            raise
        atomic.write_jsonl(ctx.stage.rejects_file(task.index), [r for _, r in sorted(rejects, key=lambda x: x[0])])
        counts = {"in": n_in, "out": info["n_samples"], "rejected": dict(sorted(reasons.items())),
                  "rows": info["n_rows"], "answer_tokens": written["answer_tokens"],
                  "rows_by_kind": dict(zip(("image", "prompt", "answer"), rows_by_kind))}
        secs = time.time() - t0
        stats = {"bytes": info["bytes"], "bytes_per_row": round(info["bytes"] / max(1, info["n_rows"]), 1),
                 "image_bytes_written": written["image_bytes"],
                 "forward_seconds": round(t_fwd, 3), "stage_seconds": round(secs, 3),
                 "prepare_cpu_seconds": round(cpu["prepare"], 3), "write_cpu_seconds": round(cpu["write"], 3),
                 "close_seconds": round(t_close, 3)}
        return ShardOutput(out, counts, stats)

    def cleanup(self, ctx: StageContext, task: ShardTask) -> None:
        pass

    def finalize(self, ctx: StageContext) -> None:
        """The image-row store's entries (lowest shard's copy), ``teacher_head.safetensors`` and
        ``index.json`` (from the done markers)."""
        from ..models.engines.common import teacher_adapter

        sd = ctx.stage
        t = ctx.cfg.teacher
        head = output_head(t.model)
        atomic.write_bytes(sd.path / HEAD_FILE, _safetensors_bytes({k: v.contiguous() for k, v in head.items()},
                                                                   {"logit_transform": "none", "format": "pt"}))
        V, H = head["weight"].shape
        spec = cache_spec(ctx.cfg, {"vocab_size": int(V), "hidden_size": int(H)})
        img = ImageRowStore(sd.path, spec).finalize()
        adapter = teacher_adapter(t)
        meta = {**spec.to_meta(), "teacher": teacher_identity(ctx.cfg),
                "tokenizer_sha256": tokenizer_hash(adapter.tokenizer), "chat_template_sha256": adapter.renderer.identity,
                "prompt_format": t.prompt_format, "family": adapter.family.name,
                "source": self.upstream_for(ctx.cfg), "engine": ctx.cfg.cache_teacher.engine,
                "sample_seed": ctx.cfg.cache_teacher.sample_seed, "stage_fingerprint": ctx.fingerprint,
                "head_file": HEAD_FILE, "image_rows": img}
        shards = []
        for i in sd.done_indices():
            d = sd.read_done(i)
            shards.append({"shard": i, "file": d["data_file"], "n_samples": d["counts"]["out"],
                           "n_rows": d["counts"]["rows"], "sha256": d["sha256"]})
        write_index(sd.path, meta, shards)


def _probe(run_dir: Path, cfg: LlavadiConfig) -> dict:
    from .cache_probe import run_probe

    return run_probe(run_dir, cfg)


def sample_fields(spec, p: Prepared, r) -> tuple[dict, dict]:
    """The teacher's outputs for one conversation as the cache's row fields and per-sample fields."""
    rows = {"position": np.asarray(p.req.positions, dtype=np.int64), "kind": p.kinds, "token_ids": p.next_ids}
    for layer, h in r.hidden.items():
        rows[hidden_field_name(layer)] = h
    rows.update(r.logits)
    sample = {}
    if spec.affinity:
        sample["affinity"] = r.affinity if r.affinity is not None else np.zeros((0, 0), np.float32)
    return rows, sample


def _safetensors_bytes(tensors: dict, metadata: dict) -> bytes:
    """``safetensors.torch.save`` with the header's keys sorted: safetensors writes ``__metadata__``
    from a hash map, in a different order from one process to the next, and the head file must be
    byte-identical across runs (kill/resume). Same JSON, same length, so the offsets stand."""
    import json

    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    text = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    if len(text) > n:  # cannot happen for ASCII keys; never write a header that would not parse
        raise RuntimeError("safetensors header grew when its keys were sorted")
    return raw[:8] + text.ljust(n, b" ") + raw[8 + n:]


def _score_each(forcer, items: list[Prepared], reject: Callable) -> list:
    """``forcer.score`` of a batch; when the batch fails, each record alone, so a record the teacher
    cannot take is rejected (``model_error`` with the reason) and the shard goes on (None in its place)."""
    try:
        return forcer.score([p.req for p in items])
    except Exception:  # noqa: BLE001
        out = []
        for p in items:
            try:
                out.append(forcer.score([p.req])[0])
            except Exception as e:  # noqa: BLE001
                reject(p.index, p.sample_id, p.source, "model_error", f"{type(e).__name__}: {e}"[:500])
                out.append(None)
        return out


STAGE = CacheTeacherStage()
