"""Benchmark ``llavadi cache-teacher``: stage wall time vs the bare teacher forward on the same batches
(answer rows and every row), cache bytes per row for each field and codec with its measured error, the
stage's peak memory as the dataset grows 10x, and the cache's read rate.

The claims under test (design §7, issue #20 "Measured"):

* cache-teacher wall time <= 1.05 x the bare teacher forward passes on the same batches with
  ``positions=answer`` (reading, tokenisation, image loading, the output head, quantisation, compression
  and writing overlap the forward or are small beside it); the same ratio with ``positions=all`` is
  reported (the head then runs on every position and every row is written);
* cache bytes per row for each field and codec with its measured error; logits-only caches: top-64 <= 250
  B/row (Megatron-LM's offline KD: 320), 16 sampled ids (RS-KD) <= 48 B/row;
* the stage's peak memory stays flat as the dataset grows: peak RSS at 10x the samples / at 1x <= 1.1.

Input: ``stages.demo.synthetic_vqa.generate`` (``--conversations``, default 160: single- and multi-turn
image conversations and text-only rows; short answers, ~3 tokens per conversation), ingested with
``llavadi ingest`` into ``--shard-size`` rows per shard (default 80, so 2 shards). Teachers built locally
with ``stages.demo.tiny_models.build_tiny_llava``, random weights: ``MIDSIZE`` (headline, 164M parameters,
H 768, V 32064: the forward dominates as with real teachers) and the tiny ``TEACHER`` (H 256; per-call
overheads and the output head dominate; reported as measured). Teacher dtype ``auto`` (float32 on CPU,
bfloat16 on GPU); the stage's defaults (``pipeline.cache_plan.cache_spec``): ``top_k`` 64,
``batch_size`` 8, float16 hidden of the final layer, float32 log-probs, logit statistics, Zarr.

Per model, every input shard, in this one process with one loaded ``HFTeacherForcer``:

(a) ``bare``: ``HFTeacherForcer.forward_hidden`` over exactly the batches the stage runs — the requests
    built by the stage's own ``prepare`` (tokenisation, images, row layout), windows of ``batch_size *
    WINDOW_BATCHES`` rows sorted by length and cut into batches as ``CacheTeacherStage.process`` does; only
    the ``forward_hidden`` calls are timed (with a CUDA synchronise on GPU). Requests are built before
    timing.
(b) ``stage``: ``CacheTeacherStage.process(ctx, forcer, ShardTask)`` called directly (what the local
    executor calls), wall time of the call: Parquet read, prepare, forward + output head, writer, Zarr
    close + fsync + rename, image rows, rejects file. With ``positions=all`` the image-row store is
    emptied before every stage run (outside the timing), so every run writes its image rows.

Warm-up forwards and scores on two batch shapes precede the timing. Shards run a then b, the next
repetition b then a (``--reps-midsize`` 3, ``--reps-tiny`` 3 with ``positions=answer``; ``--reps-all`` 1
with ``positions=all``, same loaded model). Headline ``<model>_ratio`` = sum over shards of the fastest
stage run / sum over shards of the fastest bare run (the minimum filters other processes' load on a
shared box); ``<model>_ratio_all_positions`` the same with ``positions=all``; ``ratio_pair_median`` =
median over (shard, repetition) of stage / bare of the two back-to-back runs of that shard; per-repetition
ratios are listed too. ``stage_stats``: the stage's own stats of those fastest runs, summed —
``forward_seconds`` (inside the forward + output-head calls), ``outside_forward_seconds`` (stage wall minus
that: what the overlap did not hide, mostly the Zarr close), ``close_seconds``, the CPU seconds of the
overlapped reader (``prepare_cpu_seconds``) and writer (``write_cpu_seconds``) threads, rows (by kind),
answer tokens, bytes and ``image_bytes_written``.

On a box shared with other jobs, passes seconds to minutes apart see different load, so one more figure
is given that is robust to it: ``ratio_estimate`` = ``score_over_forward_interleaved`` (``score``: forward
+ output head as the stage runs it / bare forward, alternating batch by batch on ``INTERLEAVED_BATCHES``
batches; the median of the per-batch ratios) x ``stage_seconds / forward_seconds`` (from the same stage
run). It assumes the overlapped threads' CPU work does not slow the forward (true where a core or the GPU
is free; on a saturated CPU see ``prepare_cpu_seconds + write_cpu_seconds``). ``machine.loadavg_start/end``
show the box's load. The cache the stage wrote is checked against the bare pass's float32 outputs
(``stage_cache_hidden_max_abs_vs_bare_f32``: the same rows, the same next tokens, hidden within float16).

(c) bytes per row (``configs``): the float32 final hidden states of the first bare repetition at the answer
    rows (``positions=answer``), with every logit field computed from them by the stage's own
    ``forcing.teacher_outputs`` and the head (outside the timing; sampled draws keyed by
    ``forcing.draw_uniforms`` as the stage keys them), are written with ``CacheShardWriter`` into one shard
    per store per config: hidden float16 / bfloat16 / int8 x log-probs float32 / float16 with top-64;
    logits-only (``hidden_layers=()``) top-64 with float16 log-probs, and 16 sampled ids; hidden-only
    (``logits=none``) per hidden dtype. Per config and store: ``bytes_per_row`` = the whole shard on disk
    / rows (offsets, sample ids and store framing included: with this data's ~3 rows per sample and small
    shards they weigh more than on real data) and ``row_bytes_per_row`` = the row arrays only (the bytes
    that grow with the rows: what a long-answer dataset pays per row, and what the peers' per-token
    figures count); per stored array bytes/row (``sizes.shard_part_bytes``), its declared uncompressed
    bytes (``sizes.raw_part_bytes``) and their ratio; the same for H 5120 (a 13B teacher): the arrays
    whose declared size depends on H at their uncompressed size at 5120 x the compression ratio measured
    here at 768, the others as measured (``*_h5120``). Errors, read back from the Zarr shard against
    float32: max abs error of ``hidden`` and ``topk_logprobs`` (ids must be equal), the mean top-k tail
    mass, and for the exact-KD path the full-vocabulary teacher distribution recomputed from the stored
    hidden with the output head: max abs log-prob error at the teacher's top-k ids and KL(float32 ||
    stored) (mean, max; up to ``EXACT_KD_ROWS`` rows). NB the teachers have random weights: their
    distributions are near-uniform (a top-64 tail mass near 1), so the log-probs' compression (and the
    hidden states') is indicative, not what a trained teacher gives.
(d) memory (``rss``): ``python -m llavadi.cli cache-teacher RUN --executor local --teacher TINY
    cache_teacher.source=data cache_teacher.positions=all`` in a subprocess on ``--rss-conversations``
    (default 60) conversations and on 10x as many, ``--rss-shard-size`` rows per shard (default 20: 3 vs
    30 shards); peak RSS of the child = the ``VmHWM`` of its own address space, which it writes at exit
    (the local executor runs the stage in that one process). Not ``os.wait4``'s ``ru_maxrss``: Linux
    carries the spawning process's high-water mark across fork + execve into it, so every child of this
    process would report this process's peak. The process tree's RSS polled every 0.05 s
    (``benchmarks/ingest.run_measured``) is given beside it. ``rss_ratio_10x`` = 10x / 1x, and the growth
    in MB (imports and the model are most of the 1x figure).
(e) reading: the recorded samples of the first model repeated to ``--read-samples`` samples (new ids) in 4
    shards per store, default spec (float16 hidden, top-64 float32 log-probs, logit stats);
    ``CacheReader`` iterated end to end (dequantised float32 samples) with and without sha256
    verification: samples/s and rows/s.

(f) engines (issue #23; ``--no-engines`` skips it, ``--engines-only`` runs only this): cache-teacher with
    ``cache_teacher.engine=vllm`` ÷ with ``engine=hf`` — the same ``MIDSIZE`` teacher, the same input shards
    (those above, or ``--engine-conversations`` of its own), ``positions=answer`` and the stage's other
    defaults (HF ``batch_size`` 8, vLLM ``vllm_requests`` 32 per ``LLM.encode``; vLLM eager on CPU) — for
    this checkout (``new``) and for the commit before issue #23's forcer (``old``: ``--old-tree PATH``, a
    checkout of it, or else ``--old-commit``, default :data:`OLD_COMMIT`, extracted with ``git archive``;
    its vLLM forcer sent one request per ``generate()`` with ``prompt_logprobs=k`` and read the hidden
    states through a forward hook). Each side (``new:hf``, ``new:vllm``, ``old:hf``, ``old:vllm``) is its
    own persistent worker process (this file with ``--engine-worker``; vLLM's CPU backend binds the
    OpenMP threads of the process it runs in, so HF must not share it; the ``old`` sides import the old
    tree's ``llavadi``) that sets up the forcer as its stage does (``STAGE.setup``) and processes the
    first shard once untimed; then the driver runs one side's whole pass (``STAGE.process`` on every
    shard, wall time) at a time, every side in turn, the next repetition in reverse order
    (``--reps-engines``, default 2). Figures: per side the fastest pass (``new_hf_stage_s``,
    ``new_vllm_stage_s``, ``old_*``); ``engine_vllm_speedup_over_hf`` = HF seconds ÷ vLLM seconds of the
    fastest passes (> 1: vLLM faster; ``_old`` before the change); ``*_pair_median`` = the median over
    repetitions of the two back-to-back passes' ratio; per side the load average around each pass, the
    CPU seconds the idle workers used meanwhile, engine start-up and warm-up seconds, samples and rows
    (both engines must cache the same rows). Where vLLM does not import, ``engine_note`` says so.
(g) logits-only bytes with long answers (``--no-long-answers`` skips it, ``--long-answers-only`` runs only
    this): (c)'s whole-shard bytes per row carry each sample's fixed cost (id, offsets, token ids, Zarr
    metadata) over the synthetic data's ~3 answer rows; here ``llavadi cache-teacher`` (tiny teacher,
    ``hidden_layers=[]``) caches ``--long-answer-conversations`` conversations whose answers carry 24 more
    words (~40 answer rows each, as real answers have), top-64 with float16 log-probs and 16 sampled ids:
    ``bytes_per_row_<config>_long_answers`` = bytes of every shard file ÷ cached rows (targets ≤ 250, ≤ 48).

Prints ONE JSON object on stdout's last line (``--out FILE`` also writes it).

Usage: ``.venv/bin/python benchmarks/cache_teacher.py [--models midsize,tiny] [--conversations 160]
[--shard-size 80] [--reps-midsize 3] [--reps-tiny 3] [--reps-all 1] [--read-samples 4000]
[--rss-conversations 60] [--rss-shard-size 20] [--no-rss] [--[no-]engines] [--engines-only]
[--reps-engines 2] [--engine-conversations N] [--old-tree PATH | --old-commit REV] [--[no-]long-answers]
[--long-answers-only] [--long-answer-conversations 200] [--out FILE] [--workdir D]``
"""
from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
from _common import PipeWorker, emit, machine_info as _common_machine_info, run_cli_peak  # noqa: E402

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET_RATIO = 1.05  # design §7, positions=answer
TARGET_TOPK64_LOGITS_ONLY = 250.0  # B/row (Megatron-LM's offline KD: 320)
TARGET_SAMPLED16 = 48.0  # B/row (an RS-KD cache of 12 sampled tokens: 37)
TARGET_RSS = 1.1
H_PROJECTED = 5120  # a 13B teacher (the study's)
TOP_K, SAMPLES = 64, 16
EXACT_KD_ROWS = 512
READ_SHARDS = 4
INTERLEAVED_BATCHES = 16
# (f) "before": the parent of the commit that moved the vLLM forcer onto the pooling runner (4d4308f,
# issue #23): one request per generate(), prompt_logprobs, a forward hook installed with apply_model
OLD_COMMIT = "e09b16c"
ENGINE_HEADLINE = ("engine_vllm_speedup_over_hf", "engine_vllm_speedup_over_hf_pair_median", "new_hf_stage_s",
                   "new_vllm_stage_s", "engine_vllm_speedup_over_hf_old", "engine_vllm_speedup_over_hf_old_pair_median",
                   "old_hf_stage_s", "old_vllm_stage_s", "same_rows_all_sides", "engine_note")


def configs() -> list[tuple[str, dict]]:
    """(label, ``CacheSpec`` keys) of the bytes-per-row study (c)."""
    from llavadi.schemas.teacher_cache import HIDDEN_DTYPES, LOGPROB_DTYPES

    out = [(f"{hd}_{ld}", {"hidden_dtype": hd, "logprob_dtype": ld}) for hd in HIDDEN_DTYPES for ld in LOGPROB_DTYPES]
    out.append(("logits_only_topk64", {"hidden_layers": (), "logprob_dtype": "float16"}))
    out.append(("sampled16", {"hidden_layers": (), "logits": "sampled", "samples": SAMPLES}))
    out += [(f"hidden_only_{hd}", {"logits": "none", "hidden_dtype": hd}) for hd in HIDDEN_DTYPES]
    return out


# --------------------------------------------------------------------------- machine

def machine_info() -> dict:
    """``_common.machine_info`` + torch version/threads/device and the load average (the box may
    be shared: the figures depend on it)."""
    info = _common_machine_info()
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    except Exception:  # noqa: BLE001
        pass
    try:
        info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def log(msg: str) -> None:
    print(f"[bench cache-teacher] {msg}", file=sys.stderr, flush=True)


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "LLAVADI_PROGRESS"}  # no progress bar


# --------------------------------------------------------------------------- setup

def make_run(work: Path, n: int, shard_size: int, answer_words: int = 0) -> tuple[Path, Path, dict]:
    """``n`` synthetic conversations in ``work/data`` (``answer_words`` filler words appended to every answer),
    ingested into ``work/run/data`` (the stage's ``source=data``)."""
    from llavadi.stages.demo.synthetic_vqa import generate

    root = work / "data"
    js = generate(root, n, seed=0, split="bench")
    if answer_words:
        from train_student import lengthen_answers  # benchmarks/train_student.py

        lengthen_answers(js, answer_words, seed=5)
    recs = json.loads(js.read_text())
    kinds = {"conversations": len(recs), "with_image": sum(1 for r in recs if r.get("image")),
             "multi_turn": sum(1 for r in recs if len(r["conversations"]) > 2),
             "text_only": sum(1 for r in recs if not r.get("image"))}
    run = work / "run"
    cmd = [sys.executable, "-m", "llavadi.cli", "ingest", str(run), "--input", str(js), "--image-root", str(root),
           "--shard-size", str(shard_size), "--executor", "local"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return run, root, kinds


def build_model(work: Path, name: str) -> Path:
    """Built in a subprocess: building the 164M model in this process was seen to leave the later
    forward passes ~30% slower (allocator state), which would skew nothing in the ratio but
    everything in the absolute figures."""
    out = work / f"teacher-{name}"
    spec = {"midsize": "MIDSIZE", "tiny": "TEACHER"}[name]
    code = (f"from llavadi.stages.demo.tiny_models import {spec}, build_tiny_llava; "
            f"build_tiny_llava({str(out)!r}, {spec})")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"building the {name} teacher failed:\n{p.stderr[-4000:]}")
    return out


# --------------------------------------------------------------------------- (a) + (b)

def stage_batches(ctx, forcer, data_file: str, limit: int) -> list[list]:
    """The batches ``CacheTeacherStage.process`` runs for this shard, as lists of the stage's own
    ``Prepared`` (``STAGE.prepare``): same windows, same sort, same cut."""
    from llavadi.schemas.samples import Reject, iter_samples
    from llavadi.stages.cache_teacher import STAGE, WINDOW_BATCHES

    B = ctx.cfg.cache_teacher.batch_size
    batches = []

    def flush(window, base):
        prepared = []
        for i, row in enumerate(window):
            try:
                prepared.append(STAGE.prepare(ctx, forcer, row, limit, base + i))
            except Reject:
                continue
        order = sorted(range(len(prepared)), key=lambda j: (len(prepared[j].req.input_ids), j))
        for b in range(0, len(order), B):
            batches.append([prepared[j] for j in order[b:b + B]])

    window, n = [], 0
    for row in iter_samples(data_file):
        window.append(row)
        n += 1
        if len(window) == B * WINDOW_BATCHES:
            flush(window, n - len(window))
            window = []
    if window:
        flush(window, n - len(window))
    return batches


def bench_model(name: str, model_dir: Path, run: Path, image_root: Path, reps: int, positions: str = "answer",
                forcer=None, reference: list | None = None) -> tuple[dict, list, object]:
    """(a) and (b) for one teacher and ``cache_teacher.positions``. ``forcer``: an ``HFTeacherForcer`` of
    this teacher already loaded (its spec is replaced by this config's); ``reference``: the float32 samples
    of a ``positions=answer`` run, to check this cache's answer rows against. Returns (figures, recorded
    float32 samples at the kept rows — ``positions=answer`` only, else [] —, forcer)."""
    import numpy as np
    import torch

    from llavadi.models.engines.common import max_model_len
    from llavadi.models.engines.forcing import HFTeacherForcer
    from llavadi.pipeline.cache_plan import cache_spec
    from llavadi.pipeline.config import load_config
    from llavadi.pipeline.rundir import StageDir
    from llavadi.pipeline.stage import ShardTask, StageContext
    from llavadi.schemas.teacher_cache import IMAGE_DIR, KIND_ANSWER, KINDS, iter_cache_shard
    from llavadi.stages.cache_teacher import STAGE

    cfg = load_config({"teacher": {"model": str(model_dir)}, "ingest": {"image_root": str(image_root)},
                       "cache_teacher": {"source": "data", "positions": positions}})
    c = cfg.cache_teacher
    spec = cache_spec(cfg)
    t = time.perf_counter()
    if forcer is None:
        forcer = HFTeacherForcer(cfg.teacher, spec, c.sample_seed)
    forcer.spec = spec  # the same loaded model, this config's fields (prepare and score read forcer.spec)
    load_s = time.perf_counter() - t
    cuda = forcer.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    up = StageDir(run, "data")
    shards = up.done_indices()
    out_sd = StageDir(run, f"cache_teacher-{name}" + ("" if positions == "answer" else f"-{positions}"),
                      STAGE.ext_for(cfg))
    out_sd.mkdirs()
    ctx = StageContext(run_dir=run, stage=out_sd, cfg=cfg, fingerprint="bench", upstream=up)
    limit = max_model_len(cfg.teacher)
    batches = {i: stage_batches(ctx, forcer, str(up.data_file(i)), limit) for i in shards}
    every = [p for bs in batches.values() for b in bs for p in b]
    n_fwd_tokens = sum(len(p.req.input_ids) for p in every)
    n_padded = sum(len(b) * max(len(p.req.input_ids) for p in b) for bs in batches.values() for b in bs)
    n_answer = sum(len(p.answer_ids) for p in every)
    kept_by_kind = [int(sum((p.kinds == k).sum() for p in every)) for k in range(len(KINDS))]

    b0 = batches[shards[0]]
    for b in (b0[0], b0[-1]):  # warm-up on two shapes: allocator, kernels, lazy imports
        forcer.forward_hidden([p.req for p in b])
        forcer.score([p.req for p in b])
    sync()

    recorded: dict[str, dict] = {}
    record_rows = positions == "answer"

    def bare(i: int, record: bool) -> float:
        total = 0.0
        for b in batches[i]:
            reqs = [p.req for p in b]
            t0 = time.perf_counter()
            h = forcer.forward_hidden(reqs)
            sync()
            total += time.perf_counter() - t0
            if record:  # float32 reference outputs at the kept rows, outside the timing
                with torch.inference_mode():
                    for k, p in enumerate(b):
                        hs = h[k, torch.tensor(p.req.positions, dtype=torch.long, device=h.device)]
                        recorded[p.sample_id] = {"sample_id": p.sample_id, "position": np.asarray(p.req.positions),
                                                 "kind": p.kinds, "token_ids": p.next_ids,
                                                 "hidden": hs.float().cpu().numpy()}
            del h
        return total

    def stage(i: int) -> tuple[float, object]:
        shutil.rmtree(out_sd.path / IMAGE_DIR, ignore_errors=True)  # every run writes its image rows
        t0 = time.perf_counter()
        out = STAGE.process(ctx, forcer, ShardTask(i, str(up.data_file(i))))
        sync()
        return time.perf_counter() - t0, out

    times = {"bare": {i: [] for i in shards}, "stage": {i: [] for i in shards}}
    outs = {i: [] for i in shards}
    for rep in range(reps):
        for i in shards:
            for kind in (("bare", "stage") if rep % 2 == 0 else ("stage", "bare")):
                if kind == "bare":
                    times["bare"][i].append(bare(i, record=record_rows and rep == 0))
                else:
                    s, out = stage(i)
                    times["stage"][i].append(s)
                    outs[i].append(out)
        log(f"{name} positions={positions} rep {rep}: bare {sum(v[-1] for v in times['bare'].values()):.2f}s, "
            f"stage {sum(v[-1] for v in times['stage'].values()):.2f}s")

    # forward+head (as the stage calls it) vs bare forward, alternating batch by batch: the output
    # head's cost measured where other processes' load hits both sides alike
    pick = [b for i in shards for b in batches[i]]
    pick = pick[:: max(1, len(pick) // INTERLEAVED_BATCHES)][:INTERLEAVED_BATCHES]
    pair_ratios = []
    for n, b in enumerate(pick):
        reqs = [p.req for p in b]
        dt = {}
        for kind in (("f", "s") if n % 2 == 0 else ("s", "f")):
            t0 = time.perf_counter()
            if kind == "f":
                forcer.forward_hidden(reqs)
            else:
                forcer.score(reqs)
            sync()
            dt[kind] = time.perf_counter() - t0
        pair_ratios.append(dt["s"] / dt["f"])
    score_over_forward = statistics.median(pair_ratios)  # the median pair: robust to bursts of load

    # the stage's cache holds the bare pass's rows and next tokens, hidden within float16 storage
    ref = recorded if record_rows else {s["sample_id"]: s for s in (reference or [])}
    diff, n_cached, n_checked = 0.0, 0, 0
    for i in shards:
        for s in iter_cache_shard(out_sd.data_file(i)):
            n_cached += 1
            r = ref.get(s["sample_id"])
            if r is None:
                continue
            n_checked += 1
            ans = s["kind"] == KIND_ANSWER
            assert s["position"][ans].tolist() == r["position"].tolist(), s["sample_id"]
            assert s["token_ids"][ans].tolist() == r["token_ids"].tolist(), s["sample_id"]
            if ans.any():
                diff = max(diff, float(np.abs(s["hidden"][ans] - r["hidden"]).max()))
    assert n_cached == len(every), (n_cached, len(every))

    best_bare = sum(min(v) for v in times["bare"].values())
    best_stage = sum(min(v) for v in times["stage"].values())
    # the stage's own stats and counts of its fastest run per shard
    best_outs = [outs[i][times["stage"][i].index(min(times["stage"][i]))] for i in shards]
    st = {k: round(sum(o.stats[k] for o in best_outs), 3) for k in
          ("stage_seconds", "forward_seconds", "close_seconds", "prepare_cpu_seconds", "write_cpu_seconds")}
    for k in ("bytes", "image_bytes_written"):
        st[k] = sum(o.stats[k] for o in best_outs)
    for k in ("rows", "answer_tokens"):
        st[k] = sum(o.counts[k] for o in best_outs)
    st["samples"] = sum(o.counts["out"] for o in best_outs)
    st["rows_by_kind"] = {k: sum(o.counts["rows_by_kind"][k] for o in best_outs) for k in KINDS}
    assert list(st["rows_by_kind"].values()) == kept_by_kind, (st["rows_by_kind"], kept_by_kind)
    all_rows = sum(kept_by_kind)
    st["bytes_per_row"] = round(st["bytes"] / max(1, st["rows"]), 1)  # the shards' own rows
    st["bytes_per_row_with_image_rows"] = round((st["bytes"] + st["image_bytes_written"]) / max(1, all_rows), 1)
    st["outside_forward_seconds"] = round(st["stage_seconds"] - st["forward_seconds"], 3)
    per_rep = [round(sum(times["stage"][i][r] for i in shards) / sum(times["bare"][i][r] for i in shards), 4)
               for r in range(reps)]
    pairs = [times["stage"][i][r] / times["bare"][i][r] for i in shards for r in range(reps)]
    ratio = best_stage / best_bare
    fig = {"model": name, "positions": positions,
           "params_m": round(sum(p.numel() for p in forcer.model.parameters()) / 1e6, 1),
           "hidden_size": forcer.hidden_size, "vocab_size": spec.vocab_size,
           "dtype": str(forcer.dtype).replace("torch.", ""), "load_s": round(load_s, 2), "shards": len(shards),
           "samples": len(every), "batches": sum(len(b) for b in batches.values()), "batch_size": c.batch_size,
           "forward_tokens": n_fwd_tokens, "padded_tokens": n_padded, "answer_tokens": n_answer,
           "rows_kept": all_rows, "reps": reps,
           "bare_forward_s": round(best_bare, 3), "stage_s": round(best_stage, 3),
           "ratio": round(ratio, 4), "meets_target": ratio <= TARGET_RATIO,
           "ratio_pair_median": round(statistics.median(pairs), 4), "ratio_per_rep": per_rep,
           "bare_forward_s_per_rep": [round(sum(times["bare"][i][r] for i in shards), 3) for r in range(reps)],
           "stage_s_per_rep": [round(sum(times["stage"][i][r] for i in shards), 3) for r in range(reps)],
           "forward_tokens_per_s_bare": round(n_fwd_tokens / best_bare, 1),
           "interleaved_batches": len(pick), "score_over_forward_interleaved": round(score_over_forward, 4),
           # contention-robust estimate of the ratio: (forward+head)/forward measured batch-interleaved
           # x stage wall / time inside forward+head, both sides of each factor measured together
           "ratio_estimate": round(score_over_forward * st["stage_seconds"] / st["forward_seconds"], 4),
           "stage_stats": st, "stage_cache_hidden_max_abs_vs_bare_f32": diff,
           "stage_cache_checked_samples": n_checked}
    samples = [recorded[s] for s in sorted(recorded)]
    return fig, samples, forcer


# --------------------------------------------------------------------------- (c) bytes per row

def logit_fields(samples: list[dict], head_w, head_b, vocab_size: int, seed: int) -> dict:
    """Every logit field the study writes, on the recorded rows of all ``samples`` in order (one array
    per field), by ``forcing.teacher_outputs`` — the stage's own derivation — from the float32 hidden:
    top-64 ids + float32 log-probs + logit stats, and 16 sampled ids (draws keyed as the stage keys them)."""
    import numpy as np
    import torch

    from llavadi.models.engines.forcing import draw_uniforms, teacher_outputs
    from llavadi.schemas.teacher_cache import CacheSpec

    H = int(head_w.shape[1])
    h = torch.from_numpy(np.concatenate([s["hidden"] for s in samples])).to(head_w.device)
    uni = np.concatenate([draw_uniforms(seed, s["sample_id"], s["position"], SAMPLES) for s in samples])
    with torch.inference_mode():
        out = teacher_outputs(h, head_w, head_b, CacheSpec(hidden_size=H, vocab_size=vocab_size, top_k=TOP_K))
        out.update(teacher_outputs(h, head_w, head_b, CacheSpec(hidden_size=H, vocab_size=vocab_size,
                                                                logits="sampled", samples=SAMPLES), uni))
    return out


def sample_rows(spec, samples: list[dict], logits: dict) -> list[tuple[str, dict]]:
    """(sample id, row fields of ``spec``) per sample: the recorded rows + their slice of ``logits``."""
    from llavadi.schemas.teacher_cache import hidden_field_name

    names = [f.name for f in spec.row_fields()]
    out, a = [], 0
    for s in samples:
        n = len(s["position"])
        vals = {"position": s["position"], "kind": s["kind"], "token_ids": s["token_ids"],
                hidden_field_name(-1): s["hidden"], **{k: v[a:a + n] for k, v in logits.items()}}
        out.append((s["sample_id"], {k: vals[k] for k in names}))
        a += n
    return out


def bytes_study(work: Path, name: str, samples: list[dict], forcer, seed: int = 0) -> list[dict]:
    """(c): one shard per store per config of :func:`configs`; bytes per row by array, and the errors."""
    import dataclasses

    import numpy as np
    import torch

    from llavadi.schemas.teacher_cache import CacheShardWriter, CacheSpec, iter_cache_shard
    from llavadi.schemas.teacher_cache.sizes import raw_part_bytes, shard_part_bytes

    head_w = forcer.head.weight.detach().float()
    head_b = getattr(forcer.head, "bias", None)
    head_b = head_b.detach().float() if head_b is not None else None
    V, H = (int(x) for x in head_w.shape)
    logits = logit_fields(samples, head_w, head_b, V, seed)
    ref = {s["sample_id"]: s for s in samples}
    off = np.cumsum([0] + [len(s["position"]) for s in samples])
    at = {s["sample_id"]: (int(off[j]), int(off[j + 1])) for j, s in enumerate(samples)}
    n_rows, n_samples = int(off[-1]), len(samples)
    W = head_w.cpu().double()
    bias = head_b.cpu().double() if head_b is not None else None
    # exact-KD reference: full-vocabulary log-probs from the float32 hidden, the first EXACT_KD_ROWS rows
    kd_n = min(EXACT_KD_ROWS, n_rows)

    def full_lp(h: np.ndarray) -> torch.Tensor:
        z = torch.from_numpy(np.ascontiguousarray(h[:kd_n], dtype=np.float32)).double() @ W.T
        return torch.log_softmax(z + bias if bias is not None else z, -1)

    ref_h = np.concatenate([s["hidden"] for s in samples]) if n_rows else np.zeros((0, H), np.float32)
    ref_lp = full_lp(ref_h)
    ref_top = torch.from_numpy(logits["topk_ids"][:kd_n].astype(np.int64))
    tail = 1.0 - np.exp(logits["topk_logprobs"].astype(np.float64)).sum(-1)
    kd_by_hidden: dict[str, dict] = {}
    out = []
    d = work / f"bytes-{name}"
    for label, keys in configs():
        spec = CacheSpec(hidden_size=H, vocab_size=V, top_k=TOP_K, **keys)
        row = {"model": name, "config": label, "hidden_size": H, "vocab_size": V, "rows": n_rows,
               "samples": n_samples, **{k: getattr(spec, k) for k in ("hidden_layers", "hidden_dtype", "logits",
                                                                     "top_k", "samples", "logprob_dtype")}}
        row["hidden_layers"] = list(spec.hidden_layers)
        raw = raw_part_bytes(spec)
        raw_big = raw_part_bytes(dataclasses.replace(spec, hidden_size=H_PROJECTED))
        row["raw_bytes_per_row"] = sum(raw.values())
        row[f"raw_bytes_per_row_h{H_PROJECTED}"] = sum(raw_big.values())
        rows = sample_rows(spec, samples, logits)
        for store in ("zarr", "webdataset"):
            sp = dataclasses.replace(spec, store=store)
            path = d / f"{label}.{sp.ext}"
            w = CacheShardWriter(path, sp)
            for sid, r in rows:
                w.add(sid, r)
            info = w.close()
            parts, framing = shard_part_bytes(path)
            row_data = sum(parts.get(k, 0) for k in raw)
            other = info["bytes"] - row_data  # offsets, sample ids, per-sample arrays and framing
            # H 5120: arrays whose declared size grows with H at the ratio measured here, the rest as measured
            big = {k: raw_big[k] * (parts.get(k, 0) / (n_rows * raw[k])) if raw_big[k] != raw[k]
                   else parts.get(k, 0) / n_rows for k in raw}
            row[store] = {"bytes": info["bytes"], "bytes_per_row": round(info["bytes"] / n_rows, 1),
                          "row_bytes_per_row": round(row_data / n_rows, 1),
                          "other_bytes_per_row": round(other / n_rows, 1), "framing_bytes": framing,
                          "parts_bytes_per_row": {k: round(v / n_rows, 2) for k, v in sorted(parts.items())},
                          "ratio": {k: round(parts.get(k, 0) / (n_rows * raw[k]), 4) for k in raw},
                          f"bytes_per_row_h{H_PROJECTED}": round(sum(big.values()) + other / n_rows, 1),
                          f"row_bytes_per_row_h{H_PROJECTED}": round(sum(big.values()), 1),
                          f"parts_bytes_per_row_h{H_PROJECTED}": {k: round(v, 2) for k, v in big.items()}}
        # errors: the Zarr shard read back against float32
        eh = elp = 0.0
        got = {}
        for s in iter_cache_shard(d / f"{label}.zarr", spec):
            a, b = at[s["sample_id"]]
            r = ref[s["sample_id"]]
            assert s["token_ids"].tolist() == r["token_ids"].tolist(), s["sample_id"]
            for f in ("topk_ids", "sampled_ids"):
                if f in s:
                    assert np.array_equal(s[f], logits[f][a:b]), (label, f, s["sample_id"])
            if b > a and "hidden" in s:
                eh = max(eh, float(np.abs(s["hidden"] - r["hidden"]).max()))
                got[s["sample_id"]] = s["hidden"]
            if b > a and "topk_logprobs" in s:
                elp = max(elp, float(np.abs(s["topk_logprobs"] - logits["topk_logprobs"][a:b]).max()))
        if spec.logits == "topk":
            row["topk_logprobs_max_abs_err"] = elp
            row["topk_tail_mass_mean"] = round(float(tail.mean()), 4) if n_rows else 0.0
        if spec.hidden_layers:
            row["hidden_max_abs_err"] = eh
            row["hidden_max_abs"] = float(np.abs(ref_h).max()) if n_rows else 0.0
            kd = kd_by_hidden.get(spec.hidden_dtype)
            if kd is None:  # the exact-KD error depends on the hidden dtype only
                q = np.concatenate([got[s["sample_id"]] for s in samples]) if n_rows else ref_h
                lp = full_lp(q)
                kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1)
                top_err = (lp.gather(1, ref_top) - ref_lp.gather(1, ref_top)).abs()
                kd = kd_by_hidden[spec.hidden_dtype] = {
                    "exact_kd_rows": kd_n, "exact_kd_topk_logprob_max_abs_err": float(top_err.max()) if kd_n else 0.0,
                    "exact_kd_kl_mean": float(kl.mean()) if kd_n else 0.0,
                    "exact_kd_kl_max": float(kl.max()) if kd_n else 0.0}
            row.update(kd)
        out.append(row)
    shutil.rmtree(d, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- (g) logits-only bytes, long answers

LONG_ANSWER_WORDS = 24  # filler words appended to every answer: ~40 answer rows per conversation, as in LLaVA data


def long_answer_bytes(work: Path, model_dir: Path, n: int) -> dict:
    """(g): the logits-only caches as ``llavadi cache-teacher`` writes them (``hidden_layers=[]``; top-64 with
    float16 log-probs, and 16 sampled ids) on ``n`` conversations whose answers carry ``LONG_ANSWER_WORDS`` more
    words (``benchmarks/train_student.lengthen_answers``), so a sample's fixed cost (its id, offsets, token ids,
    Zarr metadata) is spread over tens of rows as with real answers, not the ~3 of the synthetic ones: bytes of
    every file of the shards ÷ cached rows."""
    from llavadi.schemas.teacher_cache import read_index

    d = work / "long-answers"
    out = {"conversations": n, "answer_words_appended": LONG_ANSWER_WORDS, "teacher": model_dir.name}
    for key, keys in (("logits_only_topk64", ["cache_teacher.top_k=64", "cache_teacher.logprob_dtype=float16"]),
                      ("sampled16", ["cache_teacher.logits=sampled", f"cache_teacher.samples={SAMPLES}"])):
        run, _root, _kinds = make_run(d / key, n, max(1, n // 2), LONG_ANSWER_WORDS)
        p = subprocess.run([sys.executable, "-m", "llavadi.cli", "cache-teacher", str(run), "--teacher", str(model_dir),
                            "--executor", "local", "cache_teacher.source=data", "cache_teacher.hidden_layers=[]", *keys],
                           capture_output=True, text=True, env=_env())
        if p.returncode != 0:
            raise RuntimeError(f"cache-teacher ({key}) exited {p.returncode}: {p.stderr[-2000:]}")
        cache = run / "cache_teacher"
        shards = read_index(cache)["shards"]
        rows = sum(s["n_rows"] for s in shards)
        nbytes = sum(f.stat().st_size for s in shards for f in (cache / s["file"]).rglob("*") if f.is_file())
        out[key] = {"rows": rows, "samples": sum(s["n_samples"] for s in shards), "bytes": nbytes,
                    "bytes_per_row": round(nbytes / max(rows, 1), 1)}
    shutil.rmtree(d, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- (d) memory

def rss_study(work: Path, model_dir: Path, n: int, shard_size: int) -> dict:
    """(d): ``llavadi cache-teacher`` (``positions=all``, local executor) in a subprocess on ``n`` and
    ``10 n`` conversations; peak RSS of each child = its ``VmHWM`` at exit, the process tree's RSS polled every
    0.05 s beside it (``_common.run_cli_peak``)."""
    from llavadi.pipeline.rundir import StageDir
    from llavadi.schemas.teacher_cache import KINDS, read_index

    res = {"positions": "all", "shard_size": shard_size, "teacher": model_dir.name}
    for mult in (1, 10):
        d = work / f"rss-{mult}x"
        run, _root, kinds = make_run(d, n * mult, shard_size)
        r = run_cli_peak(["cache-teacher", run, "--teacher", model_dir, "--executor", "local", "cache_teacher.source=data",
                          "cache_teacher.positions=all"], d, _env())
        sd = StageDir(run, "cache_teacher")
        done = [sd.read_done(i)["counts"] for i in sd.done_indices()]
        meta = read_index(sd.path)["meta"]
        res[f"{mult}x"] = {"conversations": kinds["conversations"], "shards": len(done),
                           "samples": sum(c["out"] for c in done), "shard_rows": sum(c["rows"] for c in done),
                           "rows_by_kind": {k: sum(c["rows_by_kind"][k] for c in done) for k in KINDS},
                           "images_stored": meta["image_rows"]["images"], "wall_s": round(r["wall_s"], 1),
                           "peak_rss_mb": round(r["peak_rss_mb"], 1),
                           "tree_rss_polled_mb": round(r["tree_rss_polled_mb"], 1)}
        log(f"rss {mult}x: {res[f'{mult}x']}")
        shutil.rmtree(d, ignore_errors=True)
    lo, hi = res["1x"]["peak_rss_mb"], res["10x"]["peak_rss_mb"]
    res.update(rss_ratio_10x=round(hi / lo, 3), rss_growth_mb_10x=round(hi - lo, 1),
               meets_target=hi / lo <= TARGET_RSS)
    return res


# --------------------------------------------------------------------------- (e) reading

def read_rate(work: Path, samples: list[dict], forcer, n_target: int, seed: int = 0) -> dict:
    import dataclasses

    from llavadi.schemas.teacher_cache import CacheReader, CacheShardWriter, CacheSpec, write_index

    head_b = getattr(forcer.head, "bias", None)
    head_w = forcer.head.weight.detach().float()
    V, H = (int(x) for x in head_w.shape)
    logits = logit_fields(samples, head_w, None if head_b is None else head_b.detach().float(), V, seed)
    base = CacheSpec(hidden_size=H, vocab_size=V, top_k=TOP_K)  # the stage's defaults
    rows = sample_rows(base, samples, logits)
    res = {"read_samples": 0, "read_rows": 0}
    per = max(1, -(-n_target // READ_SHARDS))
    for store in ("zarr", "webdataset"):
        spec = dataclasses.replace(base, store=store)
        d = work / f"read-{store}"
        entries, n, T = [], 0, 0
        t = time.perf_counter()
        for sh in range(READ_SHARDS):
            w = CacheShardWriter(d / spec.shard_name(sh), spec)
            for j in range(per):
                sid, r = rows[(sh * per + j) % len(rows)]
                w.add(f"{sid}-r{sh * per + j}", r)
            info = w.close()
            entries.append({"shard": sh, **{k: info[k] for k in ("file", "n_samples", "n_rows", "sha256")}})
            n += info["n_samples"]
            T += info["n_rows"]
        write_s = time.perf_counter() - t
        write_index(d, spec.to_meta(), entries)
        res.update(read_samples=n, read_rows=T)
        res[f"{store}_write_samples_per_s"] = round(n / write_s, 1)
        for verify in (True, False):
            best = None
            for _ in range(2):  # the second pass reads from the page cache, as a training epoch would
                t = time.perf_counter()
                cnt = rws = 0
                for s in CacheReader(d, verify=verify):
                    cnt += 1
                    rws += len(s["position"])
                dt = time.perf_counter() - t
                assert (cnt, rws) == (n, T)
                best = dt if best is None else min(best, dt)
            tag = "" if verify else "_noverify"
            res[f"{store}{tag}_samples_per_s"] = round(n / best, 1)
            res[f"{store}{tag}_rows_per_s"] = round(T / best, 1)
        shutil.rmtree(d, ignore_errors=True)
    return res


# --------------------------------------------------------------------------- (f) engines

ENGINE_SIDES = ("new:hf", "new:vllm", "old:hf", "old:vllm")


def engine_worker_main(spec_path: str, fd: int) -> int:
    """One side of the engine study (f), a persistent subprocess: the ``llavadi`` on ``PYTHONPATH`` (this
    checkout, or ``--old-tree``'s) loads the teacher as its cache-teacher stage does
    (``STAGE.setup``: ``make_forcer`` of ``cache_teacher.engine``), processes the first shard once untimed,
    then on every ``run`` line calls ``STAGE.process`` on every input shard and answers one JSON line.
    Only APIs the old commit has too (``load_config``, ``StageDir``, ``StageContext``, ``ShardTask``,
    ``STAGE.setup/process``)."""
    spec = json.loads(Path(spec_path).read_text())
    out = os.fdopen(fd, "w", buffering=1)
    import torch

    import llavadi
    from llavadi.pipeline.config import load_config
    from llavadi.pipeline.rundir import StageDir
    from llavadi.pipeline.stage import ShardTask, StageContext
    from llavadi.stages.cache_teacher import STAGE

    run = Path(spec["run"])
    cfg = load_config({"teacher": {"model": spec["model"], **spec.get("teacher", {})},
                       "ingest": {"image_root": spec["image_root"]},
                       "cache_teacher": {"source": "data", "engine": spec["engine"]}})
    up = StageDir(run, "data")
    shards = up.done_indices()
    sd = StageDir(run, spec["stage_dir"], STAGE.ext_for(cfg))
    sd.mkdirs()
    ctx = StageContext(run_dir=run, stage=sd, cfg=cfg, fingerprint="bench", upstream=up)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t = time.perf_counter()
    forcer = STAGE.setup(ctx)
    init_s = time.perf_counter() - t

    def one(i: int):
        t0 = time.perf_counter()
        o = STAGE.process(ctx, forcer, ShardTask(i, str(up.data_file(i))))
        sync()
        return time.perf_counter() - t0, o

    warm_s, _ = one(shards[0])  # steady state: allocator, kernels, lazy imports, vLLM's first batches
    out.write(json.dumps({"event": "ready", "init_s": round(init_s, 2), "warmup_s": round(warm_s, 2),
                          "llavadi": str(Path(llavadi.__file__).resolve().parent), "forcer": type(forcer).__name__,
                          "torch_threads": torch.get_num_threads(),
                          "vllm_in_process": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0",
                          "device": torch.cuda.get_device_name(0) if cuda else "cpu"}) + "\n")
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        t0, c0 = time.perf_counter(), time.process_time()
        per, outs = [], []
        for i in shards:
            s, o = one(i)
            per.append(s)
            outs.append(o)
        res = {"event": "result", "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
               "shard_s": per, "samples": sum(o.counts["out"] for o in outs),
               "rejected": sum(sum(o.counts["rejected"].values()) for o in outs),
               "rows": sum(o.counts.get("rows", o.counts.get("tokens", 0)) for o in outs),
               "forward_seconds": sum(o.stats["forward_seconds"] for o in outs),
               "stage_seconds": sum(o.stats["stage_seconds"] for o in outs)}
        out.write(json.dumps(res) + "\n")
    return 0


class EngineWorker(PipeWorker):
    """Driver-side handle of one :func:`engine_worker_main` subprocess (``side`` = ``new|old:hf|vllm``)."""

    def __init__(self, side: str, work: Path, run: Path, image_root: Path, model_dir: Path, pythonpath: str,
                 teacher_kw: dict | None = None):
        self.side = side
        engine = side.split(":")[1]
        tag = side.replace(":", "-")
        spec = work / f"engine-{tag}.in.json"
        spec.write_text(json.dumps({"run": str(run), "image_root": str(image_root), "model": str(model_dir),
                                    "engine": engine, "stage_dir": f"cache_teacher-engine-{tag}",
                                    "teacher": teacher_kw or {}}))
        env = _env()
        env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if engine == "vllm":  # the engine in the worker's process, as regenerate's benchmark runs it
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        super().__init__(f"engine {side}", [Path(__file__).resolve(), "--engine-worker", spec],
                         work / f"engine-{tag}.log", env)
        self.ready = None

    def wait_ready(self) -> dict:
        self.ready = self.read()
        return self.ready


def engine_study(work: Path, run: Path, image_root: Path, model_dir: Path, reps: int, old_tree: str | None = None,
                 teacher_kw: dict | None = None) -> dict:
    """(f): cache-teacher with ``cache_teacher.engine=vllm`` ÷ with ``engine=hf``, this checkout and (with
    ``old_tree``) the commit before issue #23's forcer, each side its own persistent worker
    (:func:`engine_worker_main`; vLLM's CPU backend binds the OpenMP threads of the process it runs in,
    so no two sides share one). All load and warm up first; then the driver runs every side's whole
    ``STAGE.process`` pass over every shard in turn, one side at a time, the next repetition in reverse
    order. Per side the fastest repetition; ``*_speedup_over_hf`` = HF seconds ÷ vLLM seconds (> 1: vLLM
    faster) from the fastest runs, and ``*_pair_median`` the median over repetitions of the two
    back-to-back runs' ratio."""
    work.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent.parent
    # `llavadi` must resolve to this checkout: a folder whose `llavadi` entry is it
    link_dir = work / "path-new"
    link_dir.mkdir(exist_ok=True)
    if not (link_dir / "llavadi").exists():
        (link_dir / "llavadi").symlink_to(here)
    paths = {"new": str(link_dir)}
    sides = ["new:hf", "new:vllm"]
    res: dict = {"positions": "answer", "teacher": model_dir.name, "reps": reps}
    if old_tree:
        old = Path(old_tree).resolve()
        if (old / "llavadi").is_dir():  # a folder holding the old `llavadi`
            paths["old"] = str(old)
        else:  # the old checkout itself
            old_link = work / "path-old"
            old_link.mkdir(exist_ok=True)
            if not (old_link / "llavadi").exists():
                (old_link / "llavadi").symlink_to(old)
            paths["old"] = str(old_link)
        sides += ["old:hf", "old:vllm"]
    workers = []
    try:
        for s in sides:
            t = time.perf_counter()
            w = EngineWorker(s, work, run, image_root, model_dir, paths[s.split(":")[0]], teacher_kw)
            workers.append(w)
            w.wait_ready()  # one at a time: loads and warm-ups do not compete for the cores
            log(f"engines {s}: ready in {time.perf_counter() - t:.1f}s ({w.ready['forcer']}, init {w.ready['init_s']}s, "
                f"warm-up {w.ready['warmup_s']}s)")
        times = {s: [] for s in sides}
        runs = {s: [] for s in sides}
        for rep in range(reps):
            order = workers if rep % 2 == 0 else workers[::-1]
            for w in order:
                r = w.run(peers=workers)
                times[w.side].append(r["wall_s"])
                runs[w.side].append(r)
                log(f"engines rep {rep} {w.side}: {r['wall_s']:.2f}s (load {r['loadavg_1m']})")
    finally:
        for w in workers:
            w.close()
    for w in workers:
        s = w.side.replace(":", "_")
        rr = runs[w.side]
        res[s] = {**{k: v for k, v in w.ready.items() if k != "event"}, "stage_s": round(min(times[w.side]), 3),
                  "stage_s_per_rep": [round(x, 3) for x in times[w.side]],
                  "forward_s_per_rep": [round(r["forward_seconds"], 3) for r in rr],
                  "cpu_s_per_rep": [round(r["cpu_s"], 2) for r in rr],
                  "loadavg_1m_per_rep": [r["loadavg_1m"] for r in rr],
                  "idle_peer_cpu_s_per_rep": [r["idle_peer_cpu_s"] for r in rr],
                  "samples": rr[0]["samples"], "rejected": rr[0]["rejected"], "rows": rr[0]["rows"]}
    for tree in ("new", "old"):
        if f"{tree}:hf" not in times:
            continue
        hf, vl = times[f"{tree}:hf"], times[f"{tree}:vllm"]
        key = "engine_vllm_speedup_over_hf" + ("" if tree == "new" else "_old")
        res[key] = round(min(hf) / min(vl), 4)
        res[key + "_pair_median"] = round(statistics.median(h / v for h, v in zip(hf, vl)), 4)
        res[f"{tree}_hf_stage_s"] = round(min(hf), 3)
        res[f"{tree}_vllm_stage_s"] = round(min(vl), 3)
    # every side cached the same samples and rows (answer rows: one per answer token)
    res["same_rows_all_sides"] = len({(r["samples"], r["rows"]) for s in sides for r in runs[s]}) == 1
    loads = [x for s in sides for r in runs[s] for x in r["loadavg_1m"]]
    res["max_loadavg_1m"] = max(loads) if loads else None
    return res


def old_tree_from_git(work: Path, rev: str) -> tuple[Path | None, str]:
    """(a folder holding commit ``rev`` of this repository's files, its short hash) by ``git archive``, or
    (None, why) where this checkout has no git history or no such commit."""
    repo = Path(__file__).resolve().parent.parent
    h = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", f"{rev}^{{commit}}"], capture_output=True,
                       text=True)
    if h.returncode != 0:
        return None, f"commit {rev} not found in {repo}: {h.stderr.strip()[:200]}"
    d = work / f"old-{h.stdout.strip()}"
    if not d.exists():
        d.mkdir(parents=True)
        a = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", rev], capture_output=True)
        if a.returncode != 0:
            shutil.rmtree(d, ignore_errors=True)
            return None, f"git archive {rev} failed: {a.stderr.decode(errors='replace')[:200]}"
        subprocess.run(["tar", "-x", "-C", str(d)], input=a.stdout, check=True)
    return d, h.stdout.strip()


def run_engines(args, work: Path, run: Path, image_root: Path, model_dir: Path) -> dict:
    """(f) with the command line's settings; a note instead where vLLM does not import here."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # noqa: BLE001
        log(f"engines: not measured, vLLM does not import ({type(e).__name__})")
        return {"engine_note": f"not measured: vLLM does not import here ({type(e).__name__}: {e})"[:300]}
    t = time.perf_counter()
    d = work / "engines"
    if args.engine_conversations:
        run, image_root, kinds = make_run(d / "data", args.engine_conversations, args.shard_size)
    else:
        kinds = None
    old, old_commit, why = args.old_tree, None, None
    if old:
        tree = Path(old) / "llavadi" if (Path(old) / "llavadi").is_dir() else Path(old)
        h = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        old_commit = h.stdout.strip() if h.returncode == 0 else None
    elif args.old_commit:
        old, got = old_tree_from_git(d, args.old_commit)
        old_commit, why = (got, None) if old else (None, got)
    else:
        why = "--old-commit ''"
    res = engine_study(d, run, image_root, model_dir, max(1, args.reps_engines), old_tree=old and str(old))
    if kinds is not None:
        res["data"] = {**kinds, "shard_size": args.shard_size}
    if old:
        res["old_commit"] = old_commit
    else:
        res["engine_note"] = f"'before' not measured: {why}"
    log(f"engines {time.perf_counter() - t:.1f}s: vLLM speedup over HF {res.get('engine_vllm_speedup_over_hf')} "
        f"(before: {res.get('engine_vllm_speedup_over_hf_old')})")
    shutil.rmtree(d / "data", ignore_errors=True)
    return res


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="midsize,tiny", help="comma-separated: midsize,tiny (default both)")
    ap.add_argument("--conversations", type=int, default=160, help="synthetic conversations (default 160)")
    ap.add_argument("--shard-size", type=int, default=80, help="rows per input shard (default 80)")
    ap.add_argument("--reps-midsize", type=int, default=3, help="timing repetitions on the mid-size teacher")
    ap.add_argument("--reps-tiny", type=int, default=3, help="timing repetitions on the tiny teacher")
    ap.add_argument("--reps-all", type=int, default=1, help="timing repetitions with positions=all (default 1)")
    ap.add_argument("--read-samples", type=int, default=4000, help="samples in the read-rate stores")
    ap.add_argument("--rss-conversations", type=int, default=60, help="conversations of the 1x memory run (default 60)")
    ap.add_argument("--rss-shard-size", type=int, default=20, help="rows per input shard in the memory runs")
    ap.add_argument("--no-rss", action="store_true", help="skip the memory runs (d)")
    ap.add_argument("--long-answers", action=argparse.BooleanOptionalAction, default=True,
                    help="(g) logits-only caches on conversations with long answers, tiny teacher (default on)")
    ap.add_argument("--long-answers-only", action="store_true", help="run (g) only")
    ap.add_argument("--long-answer-conversations", type=int, default=200, help="(g): conversations (default 200)")
    ap.add_argument("--engines", action=argparse.BooleanOptionalAction, default=True,
                    help="(f) cache-teacher with engine=vllm vs engine=hf on the mid-size teacher (default on; "
                         "skipped with a note where vLLM does not import)")
    ap.add_argument("--engines-only", action="store_true", help="run (f) only (data + the mid-size teacher)")
    ap.add_argument("--reps-engines", type=int, default=2, help="timing repetitions of each engine side (default 2)")
    ap.add_argument("--engine-conversations", type=int, default=0,
                    help="conversations of the engine study's own data (default 0: the --conversations data)")
    ap.add_argument("--old-tree", default=None,
                    help="(f) 'before': a checkout of the old commit, or a folder holding it as llavadi/ "
                         "(default: --old-commit extracted with git archive)")
    ap.add_argument("--old-commit", default=OLD_COMMIT,
                    help=f"(f) 'before' commit when no --old-tree (default {OLD_COMMIT}; '' = not measured)")
    ap.add_argument("--out", default=None, help="also write the JSON result to this file")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed afterwards)")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m.strip()]
    if not models or any(m not in ("midsize", "tiny") for m in models):
        ap.error("--models takes midsize and/or tiny")
    if args.engines_only:
        if not args.engines:
            ap.error("--engines-only with --no-engines runs nothing")
        models = []
    if args.long_answers_only:
        models, args.engines, args.no_rss, args.long_answers = [], False, True, True

    t_start = time.perf_counter()
    machine = machine_info()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="llavadi-bench-cache-teacher-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"benchmark": "cache_teacher", "target_ratio": TARGET_RATIO,
                    "target_bytes_per_row_logits_only_topk64": TARGET_TOPK64_LOGITS_ONLY,
                    "target_bytes_per_row_sampled16": TARGET_SAMPLED16, "target_rss_ratio": TARGET_RSS}
    rss = engines = rr = longa = None
    try:
        run, image_root, kinds = make_run(work, args.conversations, args.shard_size)
        result["data"] = {**kinds, "shard_size": args.shard_size}
        log(f"data: {kinds}")
        read_src = None
        runs, table = [], []
        for name in models:
            t = time.perf_counter()
            model_dir = build_model(work, name)
            log(f"{name}: built in {time.perf_counter() - t:.1f}s")
            reps = args.reps_midsize if name == "midsize" else args.reps_tiny
            fig, samples, forcer = bench_model(name, model_dir, run, image_root, max(1, reps))
            log(f"{name}: bare {fig['bare_forward_s']}s, stage {fig['stage_s']}s, ratio {fig['ratio']}, "
                f"estimate {fig['ratio_estimate']}")
            for k in ("bare_forward_s", "stage_s", "ratio", "meets_target", "ratio_pair_median", "ratio_estimate"):
                result[f"{name}_{k}"] = fig[k]
            runs.append(fig)
            fig_all, _, forcer = bench_model(name, model_dir, run, image_root, max(1, args.reps_all), "all",
                                             forcer=forcer, reference=samples)
            log(f"{name} positions=all: bare {fig_all['bare_forward_s']}s, stage {fig_all['stage_s']}s, "
                f"ratio {fig_all['ratio']}, estimate {fig_all['ratio_estimate']}")
            for k in ("bare_forward_s", "stage_s", "ratio", "ratio_estimate"):
                result[f"{name}_{k}_all_positions"] = fig_all[k]
            runs.append(fig_all)
            t = time.perf_counter()
            table += bytes_study(work, name, samples, forcer)
            log(f"{name}: bytes study {time.perf_counter() - t:.1f}s")
            if read_src is None:
                t = time.perf_counter()
                rr = read_rate(work, samples, forcer, args.read_samples)
                rr["source_model"] = name
                log(f"read rate {time.perf_counter() - t:.1f}s")
                read_src = name
            del forcer, samples
            if name == "midsize" and args.engines:
                engines = run_engines(args, work, run, image_root, model_dir)
            if name == "tiny" and not args.no_rss:
                t = time.perf_counter()
                rss = rss_study(work, model_dir, args.rss_conversations, args.rss_shard_size)
                log(f"rss study {time.perf_counter() - t:.1f}s: ratio {rss['rss_ratio_10x']}")
            shutil.rmtree(model_dir, ignore_errors=True)
        if engines is None and args.engines:  # the engine study uses the mid-size teacher, whatever --models says
            model_dir = build_model(work, "midsize")
            engines = run_engines(args, work, run, image_root, model_dir)
            shutil.rmtree(model_dir, ignore_errors=True)
        if args.long_answers and not args.engines_only:
            model_dir = build_model(work, "tiny")
            t = time.perf_counter()
            longa = long_answer_bytes(work, model_dir, args.long_answer_conversations)
            log(f"long answers {time.perf_counter() - t:.1f}s: " + ", ".join(
                f"{k} {longa[k]['bytes_per_row']} B/row" for k in ("logits_only_topk64", "sampled16")))
            shutil.rmtree(model_dir, ignore_errors=True)
        if rss is None and not args.no_rss and not args.engines_only:  # the memory runs use the tiny teacher
            model_dir = build_model(work, "tiny")
            t = time.perf_counter()
            rss = rss_study(work, model_dir, args.rss_conversations, args.rss_shard_size)
            log(f"rss study {time.perf_counter() - t:.1f}s: ratio {rss['rss_ratio_10x']}")
            shutil.rmtree(model_dir, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    # headline bytes: the first model's configs (Zarr); the WebDataset figures are in "configs"
    for r in table:
        if r["model"] != models[0]:
            continue
        key, z = r["config"], r["zarr"]
        result[f"bytes_per_row_{key}"] = z["bytes_per_row"]
        result[f"row_bytes_per_row_{key}"] = z["row_bytes_per_row"]
        result[f"bytes_per_row_h{H_PROJECTED}_{key}"] = z[f"bytes_per_row_h{H_PROJECTED}"]
        result[f"row_bytes_per_row_h{H_PROJECTED}_{key}"] = z[f"row_bytes_per_row_h{H_PROJECTED}"]
        if "topk_logprobs_max_abs_err" in r:
            result[f"topk_logprobs_max_abs_err_{key}"] = r["topk_logprobs_max_abs_err"]
        if "hidden_max_abs_err" in r:
            result[f"hidden_max_abs_err_{r['hidden_dtype']}"] = r["hidden_max_abs_err"]
            result[f"exact_kd_kl_mean_{r['hidden_dtype']}"] = r["exact_kd_kl_mean"]
    for key, target in (("logits_only_topk64", TARGET_TOPK64_LOGITS_ONLY), ("sampled16", TARGET_SAMPLED16)):
        if f"bytes_per_row_{key}" in result:
            result[f"meets_target_{key}"] = result[f"bytes_per_row_{key}"] <= target
            result[f"meets_target_row_bytes_{key}"] = result[f"row_bytes_per_row_{key}"] <= target
    if longa is not None:
        for key in ("logits_only_topk64", "sampled16"):
            result[f"bytes_per_row_{key}_long_answers"] = longa[key]["bytes_per_row"]
        result["long_answers"] = longa
    if rss is not None:
        result["rss_ratio_10x"] = rss["rss_ratio_10x"]
        result["rss_growth_mb_10x"] = rss["rss_growth_mb_10x"]
        result["rss_meets_target"] = rss["meets_target"]
    if rr is not None:
        for store in ("zarr", "webdataset"):
            result[f"read_{store}_samples_per_s"] = rr[f"{store}_samples_per_s"]
            result[f"read_{store}_rows_per_s"] = rr[f"{store}_rows_per_s"]
    if engines is not None:
        for k in ENGINE_HEADLINE:
            if k in engines:
                result[k] = engines[k]
    result["runs"] = runs
    result["configs"] = table
    if rr is not None:
        result["read"] = rr
    if rss is not None:
        result["rss"] = rss
    if engines is not None:
        result["engines"] = engines
    result["machine"] = machine
    try:
        result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    result["bench_wall_s"] = round(time.perf_counter() - t_start, 1)

    return emit(result, args.out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--engine-worker"]:  # one side of (f): engine_study starts it
        sys.exit(engine_worker_main(sys.argv[2], int(sys.argv[sys.argv.index("--fd") + 1])))
    sys.exit(main())
