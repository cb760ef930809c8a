"""``llavadi cache-teacher``: the teacher's work, cached once for any number of students.

Teacher-forced forward over each whole conversation of ``regenerate/`` (default) or ``data/``
(``cache_teacher.source``: the study's regenerated-or-original ablation). At every position that
predicts an answer token (``models.adapter.ModelAdapter``: spans and forward inputs) it keeps the
final-layer post-norm hidden state, the top-k token ids and raw log-probabilities (T = 1), the
full-row logit mean/std, and the answer token id — the arrays of ``schemas.teacher_cache``.

Outputs: ``cache_teacher/part-NNNNN.zarr`` (or ``.tar``) per input shard, ``index.json`` and
``teacher_head.safetensors`` (the output projection: with it a student that shares the
vocabulary recomputes the exact full-vocabulary teacher distribution from ``hidden``).

Rejects: ``token_mismatch`` (template tokenisation is not prefix-stable at a turn boundary),
``image_error``, ``too_long`` (conversation longer than the teacher's context).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

from ..pipeline import atomic
from ..pipeline.config import LlavadiConfig
from ..pipeline.estimate import space_problems
from ..pipeline.stage import (ShardOutput, ShardTask, StageContext, engine_installed, plan_from_upstream,
                              teacher_resources)
from ..models.engines.common import max_model_len, output_head
from ..models.engines.forcing import ForceRequest, ForceResult, HFTeacherForcer, make_forcer, topk_from_hidden
from ..schemas.conversation import tokenizer_hash
from ..schemas.samples import Reject, iter_samples
from ..schemas.teacher_cache import CacheShardWriter, CacheSpec, write_index
from .regenerate import load_image, teacher_identity, teacher_preflight

HEAD_FILE = "teacher_head.safetensors"
WINDOW_BATCHES = 8  # conversations are sorted by length within windows of 8 batches (less padding)


def cache_spec(cfg: LlavadiConfig, hidden_size: int) -> CacheSpec:
    c = cfg.cache_teacher
    return CacheSpec(hidden_size=hidden_size, top_k=c.top_k, hidden_dtype=c.hidden_dtype,
                     logprob_dtype=c.logprob_dtype, store=c.store)


def teacher_hidden_size(model_dir: str) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    return int(getattr(cfg, "text_config", cfg).hidden_size)


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
        return (engine_installed(cfg.cache_teacher.engine, "cache_teacher.engine")
                or teacher_preflight(cfg, cfg.cache_teacher.engine)
                or space_problems(run_dir, cfg))

    def material(self, cfg: LlavadiConfig, run_dir: Path) -> dict:
        c = asdict(cfg.cache_teacher)
        c.pop("batch_size")  # batching does not change the cached values beyond float noise
        for k in ("estimate_rows", "ignore_space_check"):  # the pre-launch size check, not the output
            c.pop(k)
        return {"cache_teacher": c, "teacher_identity": teacher_identity(cfg), "teacher_dtype": cfg.teacher.dtype,
                "image_root": cfg.ingest.image_root}

    def resources(self, cfg: LlavadiConfig) -> dict:
        return teacher_resources(cfg)

    def plan(self, ctx: StageContext, is_done: Callable[[int], bool]) -> Iterator[ShardTask | int]:
        return plan_from_upstream(ctx, is_done)

    def setup(self, ctx: StageContext):
        return make_forcer(ctx.cfg.cache_teacher.engine, ctx.cfg.teacher, ctx.cfg.cache_teacher.top_k)

    def prepare(self, ctx: StageContext, forcer, row: dict, limit: int) -> tuple[ForceRequest, list[int]]:
        """A sample row → (teacher-forcing request, answer token ids), or raise ``Reject``.
        The answer spans and the forward inputs come from the teacher's ``models.ModelAdapter``."""
        conv = forcer.adapter.conversation(row["conversations"], row["image"] is not None)
        image = None
        if row["image"] is not None:
            try:
                image = load_image(ctx.cfg.ingest.image_root, row["image"], ctx.run_dir)
            except Exception as e:  # noqa: BLE001
                raise Reject("image_error", f"{row['image']}: {type(e).__name__}: {e}") from None
        enc = forcer.adapter.encode(conv, image)
        if len(enc.ids) > limit:
            raise Reject("too_long", f"{len(enc.ids)} tokens > max_model_len={limit}")
        return ForceRequest(enc.ids, enc.positions, enc.inputs, image, conv.text), enc.answer_ids

    def process(self, ctx: StageContext, forcer, task: ShardTask) -> ShardOutput:
        """Three overlapped steps joined by bounded queues, so the teacher forward never waits
        on the CPU work around it: a reader thread reads rows, tokenises and loads the images of
        the next window (``prepare``) while the calling thread runs the forward passes (and the
        output head, once per batch: ``_score``) of the current one, and a writer thread
        quantises/compresses/writes (``CacheShardWriter.add``) the window before. Windows, their
        batches and the order of ``add`` are those of a serial loop (input order), so the bytes
        do not depend on thread timing. An exception in any step stops the others and is raised
        here; the temporary shard is removed. Only the shard's close (Zarr: compress + write +
        fsync) runs after the last forward."""
        c = ctx.cfg.cache_teacher
        limit = max_model_len(ctx.cfg.teacher)
        spec = cache_spec(ctx.cfg, forcer.hidden_size)
        out = ctx.stage.data_file(task.index)
        writer = CacheShardWriter(out, spec)
        rejects, reasons = [], {}
        n_in = 0
        t_fwd = 0.0
        t0 = time.time()
        window_size = c.batch_size * WINDOW_BATCHES
        cpu = {"prepare": 0.0, "write": 0.0}  # CPU seconds of the reader / writer threads (overlapped work)

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
                        req, tok = self.prepare(ctx, forcer, row, limit)
                        prepared.append((row["id"], req, tok, base + i, row.get("source")))
                    except Reject as r:
                        reject(base + i, row["id"], row.get("source"), r.reason, r.detail)
                # sorted by length within the window: less padding per batch
                return prepared, sorted(range(len(prepared)), key=lambda j: (len(prepared[j][1].input_ids), j))

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
            for (sid, _req, tok, _i, _src), r in zip(prepared, results):  # input order
                if r is not None:  # None: the teacher failed on this record (rejected as model_error)
                    writer.add(sid, tok, r.hidden, r.topk_ids, r.topk_logprobs, r.logit_stats)
            cpu["write"] += time.thread_time() - t

        reader = _Prefetch(prepared_windows, depth=1, name=f"cache-teacher-read-{task.index}")
        sink = _Sink(write, depth=2, name=f"cache-teacher-write-{task.index}")
        try:
            for prepared, order in reader:
                results: list = [None] * len(prepared)
                for b in range(0, len(order), c.batch_size):
                    idx = order[b: b + c.batch_size]
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
                  "tokens": info["n_tokens"]}
        secs = time.time() - t0
        stats = {"bytes": info["bytes"], "bytes_per_token": round(info["bytes"] / max(1, info["n_tokens"]), 1),
                 "forward_seconds": round(t_fwd, 3), "stage_seconds": round(secs, 3),
                 "prepare_cpu_seconds": round(cpu["prepare"], 3), "write_cpu_seconds": round(cpu["write"], 3),
                 "close_seconds": round(t_close, 3)}
        return ShardOutput(out, counts, stats)

    def cleanup(self, ctx: StageContext, task: ShardTask) -> None:
        pass

    def finalize(self, ctx: StageContext) -> None:
        """``index.json`` (from the done markers) and ``teacher_head.safetensors``."""
        from ..models.engines.common import teacher_adapter

        sd = ctx.stage
        t = ctx.cfg.teacher
        head = output_head(t.model)
        atomic.write_bytes(sd.path / HEAD_FILE, _safetensors_bytes({k: v.contiguous() for k, v in head.items()},
                                                                   {"logit_transform": "none", "format": "pt"}))
        adapter = teacher_adapter(t)
        tok = adapter.tokenizer
        V, H = head["weight"].shape
        meta = {**cache_spec(ctx.cfg, int(H)).to_meta(), "vocab_size": int(V), "teacher": teacher_identity(ctx.cfg),
                "tokenizer_sha256": tokenizer_hash(tok), "chat_template_sha256": adapter.renderer.identity,
                "prompt_format": t.prompt_format, "family": adapter.family.name,
                "source": ctx.cfg.cache_teacher.source, "engine": ctx.cfg.cache_teacher.engine,
                "stage_fingerprint": ctx.fingerprint, "head_file": HEAD_FILE}
        shards = []
        for i in sd.done_indices():
            d = sd.read_done(i)
            shards.append({"shard": i, "file": d["data_file"], "n_samples": d["counts"]["out"],
                           "n_tokens": d["counts"]["tokens"], "sha256": d["sha256"]})
        write_index(sd.path, meta, shards)


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


def _score_each(forcer, items: list, reject: Callable) -> list:
    """``_score`` of a batch; when the batch fails, each record alone, so a record the teacher cannot
    take is rejected (``model_error`` with the reason) and the shard goes on (None in its place)."""
    try:
        return _score(forcer, [it[1] for it in items])
    except Exception:  # noqa: BLE001
        out = []
        for sid, req, _tok, i, src in items:
            try:
                out.append(_score(forcer, [req])[0])
            except Exception as e:  # noqa: BLE001
                reject(i, sid, src, "model_error", f"{type(e).__name__}: {e}"[:500])
                out.append(None)
        return out


def _score(forcer, reqs) -> list:
    """``forcer.score(reqs)``; for the HF forcer the output head runs once per batch on the
    gathered answer positions instead of once per conversation (the head weight, V×H, is read
    once per batch: ~8% of a mid-size teacher's forward on CPU, per conversation, ~2% batched).
    Same arithmetic per row as ``HFTeacherForcer.score``; float-noise-level differences only."""
    if not isinstance(forcer, HFTeacherForcer):
        return forcer.score(reqs)
    import torch

    h = forcer.forward_hidden(reqs)
    counts = [len(r.positions) for r in reqs]
    with torch.inference_mode():
        bi = torch.tensor([b for b, n in enumerate(counts) for _ in range(n)], dtype=torch.long, device=h.device)
        pi = torch.tensor([p for r in reqs for p in r.positions], dtype=torch.long, device=h.device)
        hs = h[bi, pi]
        ids, lps, stats = topk_from_hidden(hs, forcer.head.weight, forcer.k, getattr(forcer.head, "bias", None))
        hs, ids, lps, stats = (x.float().cpu().numpy() if x.is_floating_point() else x.cpu().numpy()
                               for x in (hs, ids, lps, stats))
    res, a = [], 0
    for n in counts:
        res.append(ForceResult(hs[a:a + n], ids[a:a + n], lps[a:a + n], stats[a:a + n]))
        a += n
    return res


# ----------------------------------------------------------------------------- overlap helpers
_END = object()
_POLL_S = 0.1  # how often a blocked thread looks at the stop flag


class _Prefetch:
    """Run the generator ``make()`` in a daemon thread, at most ``depth`` items ahead of the
    consumer (a bounded queue). Iterating yields its items in order and re-raises its
    exception; ``stop`` ends the thread early (a blocked ``put`` gives up within ``_POLL_S``)."""

    def __init__(self, make: Callable[[], Iterator], depth: int, name: str):
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make,), name=name, daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def _run(self, make) -> None:
        try:
            for item in make():
                if not self._put((True, item)):
                    return
            self._put((True, _END))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put((False, e))

    def __iter__(self):
        while True:
            ok, item = self._q.get()
            if not ok:
                self._thread.join()
                raise item
            if item is _END:
                self._thread.join()
                return
            yield item

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class _Sink:
    """Apply ``fn`` to each ``put`` item in a daemon thread, in order, with at most ``depth``
    items waiting. ``put``/``finish`` re-raise ``fn``'s first exception (items after it are
    dropped); ``finish`` waits until every item is done; ``stop`` abandons the rest."""

    def __init__(self, fn: Callable[[object], None], depth: int, name: str):
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        while not self._stop.is_set():
            try:
                item = self._q.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if item is _END:
                return
            try:
                fn(item)
            except BaseException as e:  # noqa: BLE001 - handed to the producer
                self._error = e
                return

    def _check(self) -> None:
        if self._error is not None:
            self._thread.join()
            raise self._error

    def put(self, item) -> None:
        while True:
            self._check()
            if not self._thread.is_alive():
                raise RuntimeError(f"{self._thread.name} has stopped")
            try:
                self._q.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                pass

    def finish(self) -> None:
        self.put(_END)
        self._thread.join()
        self._check()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


STAGE = CacheTeacherStage()


def verify_cache(run_dir: Path | str, cfg: LlavadiConfig, n: int, seed: int = 0) -> dict:
    """Recompute ``n`` random cached samples with the teacher (HF engine) and report the max
    errors against the cache. Raises ``StageError`` when the cache is missing."""
    import random

    import numpy as np

    from ..pipeline.runner import StageError
    from ..pipeline.rundir import StageDir
    from ..models.engines.forcing import HFTeacherForcer
    from ..schemas.teacher_cache import CacheReader

    run_dir = Path(run_dir)
    sd = StageDir(run_dir, STAGE.dir_name)
    if not (sd.path / "index.json").exists():
        raise StageError(f"no teacher cache in {sd.path}: run `llavadi cache-teacher {run_dir}` first")
    reader = CacheReader(sd.path)
    src = StageDir(run_dir, reader.meta.get("source", cfg.cache_teacher.source))
    ids = [s["sample_id"] for s in reader]  # also verifies every shard's checksum
    pick = set(random.Random(seed).sample(ids, min(n, len(ids))))
    forcer = HFTeacherForcer(cfg.teacher, reader.spec.top_k)
    limit = max_model_len(cfg.teacher)
    ctx = StageContext(run_dir=run_dir, stage=sd, cfg=cfg, fingerprint="")
    rows = {}
    for i in src.done_indices():
        for row in iter_samples(src.data_file(i)):
            if row["id"] in pick:
                rows[row["id"]] = row
    err = {"hidden_max_abs": 0.0, "topk_logprobs_max_abs": 0.0, "logit_stats_max_abs": 0.0,
           "topk_id_agreement": 1.0, "token_ids_equal": True}
    agree = []
    for s in CacheReader(sd.path, verify=False):
        if s["sample_id"] not in pick:
            continue
        req, tok = STAGE.prepare(ctx, forcer, rows[s["sample_id"]], limit)
        r = forcer.score([req])[0]
        err["token_ids_equal"] &= list(tok) == s["token_ids"].tolist()
        if len(tok) == 0:
            continue
        err["hidden_max_abs"] = max(err["hidden_max_abs"], float(np.abs(r.hidden - s["hidden"]).max()))
        err["topk_logprobs_max_abs"] = max(err["topk_logprobs_max_abs"], float(np.abs(r.topk_logprobs - s["topk_logprobs"]).max()))
        err["logit_stats_max_abs"] = max(err["logit_stats_max_abs"], float(np.abs(r.logit_stats - s["logit_stats"]).max()))
        agree.append(float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(r.topk_ids.tolist(), s["topk_ids"].tolist())])))
    err["topk_id_agreement"] = min(agree) if agree else 1.0
    return {"samples_checked": len(pick), "hidden_dtype": reader.spec.hidden_dtype,
            "logprob_dtype": reader.spec.logprob_dtype, **err}
