"""Benchmark ``llavadi cache-teacher``: stage wall time vs the bare teacher forward on the same
batches, cache bytes per answer token and error per dtype option, and the cache's read rate.

The claims under test (design §7): cache-teacher wall time <= 1.10 x the bare teacher forward
passes on the same batches (reading, tokenisation, image loading, the output head, quantisation,
compression and writing overlap the forward or are small beside it); cache bytes per answer
token reported for each dtype option with its measured error.

Input: ``stages.demo.synthetic_vqa.generate`` (``--conversations``, default 160: single- and
multi-turn image conversations and text-only rows), ingested with ``llavadi ingest`` into
``--shard-size`` rows per shard (default 80, so 2 shards). Teachers built locally with
``stages.demo.tiny_models.build_tiny_llava``: ``MIDSIZE`` (headline, ~135M parameters, the
forward dominates as with real teachers) and the tiny ``TEACHER`` (per-call overheads dominate;
reported as measured). Teacher dtype ``auto`` (float32 on CPU, bfloat16 on GPU); the stage's
defaults: ``top_k`` 64, ``batch_size`` 8, float16 hidden, float32 log-probs, Zarr.

Per model, every input shard, in this one process with one loaded ``HFTeacherForcer``:

(a) ``bare``: ``HFTeacherForcer.forward_hidden`` over exactly the batches the stage runs — the
    requests built by the stage's own ``prepare`` (tokenisation, images), windows of
    ``batch_size * WINDOW_BATCHES`` rows sorted by length and cut into batches as
    ``CacheTeacherStage.process`` does; only the ``forward_hidden`` calls are timed (with a CUDA
    synchronise on GPU). Requests are built before timing.
(b) ``stage``: ``CacheTeacherStage.process(ctx, forcer, ShardTask)`` called directly (what the
    local executor calls), wall time of the call: Parquet read, prepare, forward + output head,
    writer, Zarr close + fsync + rename, rejects file.

Warm-up forwards and scores on two batch shapes precede the timing. Shards run a then b, the
next repetition b then a (``--reps-midsize`` 3, ``--reps-tiny`` 3). Headline ``<model>_ratio`` =
sum over shards of the fastest stage run / sum over shards of the fastest bare run (the minimum
filters other processes' load on a shared box); ``ratio_pair_median`` = median over (shard,
repetition) of stage / bare of the two back-to-back runs of that shard; per-repetition ratios
are listed too.
``stage_stats``: the stage's own stats of those fastest runs, summed — ``forward_seconds`` (inside
the forward + output-head calls), ``outside_forward_seconds`` (stage wall minus that: what the
overlap did not hide, mostly the Zarr close), ``close_seconds``, and the CPU seconds of the
overlapped reader (``prepare_cpu_seconds``) and writer (``write_cpu_seconds``) threads.

On a box shared with other jobs, passes seconds to minutes apart see different load, so one more
figure is given that is robust to it: ``ratio_estimate`` = ``score_over_forward_interleaved``
(forward + output head as the stage runs it / bare forward, alternating batch by batch on
``INTERLEAVED_BATCHES`` batches; the median of the per-batch ratios) x ``stage_seconds /
forward_seconds`` (from the same stage run). It assumes the overlapped threads' CPU work does
not slow the forward (true where a core or the GPU is free; on a saturated CPU see
``prepare_cpu_seconds + write_cpu_seconds``). ``machine.loadavg_start/end`` show the box's load.

(c) dtypes: the float32 teacher outputs of the first bare repetition (its hidden states; the
    head applied at the answer positions outside the timing) are written with
    ``CacheShardWriter`` once per ``hidden_dtype`` x ``logprob_dtype`` in both stores, read back
    and compared with float32: bytes per answer token on disk (whole shard incl. per-sample ids
    and store metadata, so small shards overstate it slightly; ``theoretical`` = uncompressed
    per-token arrays), max abs error of ``hidden`` and ``topk_logprobs``, and for the exact-KD
    path the full-vocabulary teacher distribution recomputed from the stored hidden with the
    output head: max abs log-prob error at the teacher's top-k ids and mean KL(float32 || stored)
    (up to ``EXACT_KD_TOKENS`` tokens).
(d) reading: the recorded samples of the first model repeated to ``--read-samples`` samples (new
    ids) in 4 shards per store, default spec; ``CacheReader`` iterated end to end (dequantised
    float32 samples) with and without sha256 verification: samples/s and tokens/s.

Prints ONE JSON object on stdout's last line (``--out FILE`` also writes it).

Usage: ``.venv/bin/python benchmarks/cache_teacher.py [--models midsize,tiny] [--conversations 160]
[--shard-size 80] [--reps-midsize 3] [--reps-tiny 3] [--read-samples 4000] [--out FILE] [--workdir D]``
"""
from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
from _common import emit, machine_info as _common_machine_info  # noqa: E402

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

TARGET_RATIO = 1.10
EXACT_KD_TOKENS = 512
READ_SHARDS = 4
INTERLEAVED_BATCHES = 16


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


# --------------------------------------------------------------------------- setup

def make_run(work: Path, n: int, shard_size: int) -> tuple[Path, Path, dict]:
    """Synthetic conversations ingested into ``work/run/data`` (the stage's ``source=data``)."""
    from llavadi.stages.demo.synthetic_vqa import generate

    root = work / "data"
    js = generate(root, n, seed=0, split="bench")
    recs = json.loads(js.read_text())
    kinds = {"conversations": len(recs), "with_image": sum(1 for r in recs if r.get("image")),
             "multi_turn": sum(1 for r in recs if len(r["conversations"]) > 2),
             "text_only": sum(1 for r in recs if not r.get("image"))}
    run = work / "run"
    cmd = [sys.executable, "-m", "llavadi.cli", "ingest", str(run), "--input", str(js), "--image-root", str(root),
           "--shard-size", str(shard_size), "--executor", "local"]
    env = {k: v for k, v in os.environ.items() if k != "LLAVADI_PROGRESS"}  # no progress bar
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return run, root, kinds


def build_model(work: Path, name: str) -> Path:
    """Built in a subprocess: building the 135M model in this process was seen to leave the later
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

def stage_batches(stage, ctx, forcer, data_file: str, limit: int) -> list[list[tuple[str, list[int], object]]]:
    """The batches ``CacheTeacherStage.process`` runs for this shard, as lists of
    (sample id, answer token ids, ForceRequest): same windows, same sort, same cut."""
    from llavadi.schemas.samples import Reject, iter_samples
    from llavadi.stages.cache_teacher import WINDOW_BATCHES

    B = ctx.cfg.cache_teacher.batch_size
    batches = []

    def flush(window):
        prepared = []
        for row in window:
            try:
                req, tok = stage.prepare(ctx, forcer, row, limit)
            except Reject:
                continue
            prepared.append((row["id"], tok, req))
        order = sorted(range(len(prepared)), key=lambda j: (len(prepared[j][2].input_ids), j))
        for b in range(0, len(order), B):
            batches.append([prepared[j] for j in order[b:b + B]])

    window = []
    for row in iter_samples(data_file):
        window.append(row)
        if len(window) == B * WINDOW_BATCHES:
            flush(window)
            window = []
    if window:
        flush(window)
    return batches


def bench_model(name: str, model_dir: Path, run: Path, image_root: Path, reps: int) -> tuple[dict, list, object]:
    """(a) and (b) for one teacher. Returns (figures, recorded float32 samples, forcer)."""
    import torch

    from llavadi.pipeline.config import load_config
    from llavadi.pipeline.rundir import StageDir
    from llavadi.pipeline.stage import ShardTask, StageContext
    from llavadi.models.engines.common import max_model_len
    from llavadi.models.engines.forcing import HFTeacherForcer, topk_from_hidden
    from llavadi.stages.cache_teacher import STAGE, _score

    cfg = load_config({"teacher": {"model": str(model_dir)}, "ingest": {"image_root": str(image_root)},
                       "cache_teacher": {"source": "data"}})
    c = cfg.cache_teacher
    t = time.perf_counter()
    forcer = HFTeacherForcer(cfg.teacher, c.top_k)
    load_s = time.perf_counter() - t
    cuda = forcer.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    up = StageDir(run, "data")
    shards = up.done_indices()
    out_sd = StageDir(run, f"cache_teacher-{name}", STAGE.ext_for(cfg))
    out_sd.mkdirs()
    ctx = StageContext(run_dir=run, stage=out_sd, cfg=cfg, fingerprint="bench", upstream=up)
    limit = max_model_len(cfg.teacher)
    batches = {i: stage_batches(STAGE, ctx, forcer, str(up.data_file(i)), limit) for i in shards}
    n_fwd_tokens = sum(len(r.input_ids) for bs in batches.values() for b in bs for _, _, r in b)
    n_padded = sum(len(b) * max(len(r.input_ids) for _, _, r in b) for bs in batches.values() for b in bs)
    n_answer = sum(len(tok) for bs in batches.values() for b in bs for _, tok, _ in b)

    b0 = batches[shards[0]]
    for b in (b0[0], b0[-1]):  # warm-up on two shapes: allocator, kernels, lazy imports
        forcer.forward_hidden([r for _, _, r in b])
        _score(forcer, [r for _, _, r in b])
    sync()

    head_w, head_b = forcer.head.weight, getattr(forcer.head, "bias", None)
    recorded: dict[str, dict] = {}

    def bare(i: int, record: bool) -> float:
        total = 0.0
        for b in batches[i]:
            reqs = [r for _, _, r in b]
            t0 = time.perf_counter()
            h = forcer.forward_hidden(reqs)
            sync()
            total += time.perf_counter() - t0
            if record:  # float32 reference outputs, outside the timing
                with torch.inference_mode():
                    for k, (sid, tok, r) in enumerate(b):
                        hs = h[k, torch.tensor(r.positions, dtype=torch.long, device=h.device)]
                        ids, lps, st = topk_from_hidden(hs, head_w, c.top_k, head_b)
                        recorded[sid] = {"sample_id": sid, "token_ids": list(tok), "hidden": hs.float().cpu().numpy(),
                                         "topk_ids": ids.cpu().numpy(), "topk_logprobs": lps.cpu().numpy(),
                                         "logit_stats": st.cpu().numpy()}
            del h
        return total

    def stage(i: int) -> tuple[float, object]:
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
                    times["bare"][i].append(bare(i, record=rep == 0))
                else:
                    s, out = stage(i)
                    times["stage"][i].append(s)
                    outs[i].append(out)
        log(f"{name} rep {rep}: bare {sum(v[-1] for v in times['bare'].values()):.2f}s, "
            f"stage {sum(v[-1] for v in times['stage'].values()):.2f}s")

    # forward+head (as the stage calls it) vs bare forward, alternating batch by batch: the output
    # head's cost measured where other processes' load hits both sides alike
    pick = [b for i in shards for b in batches[i]]
    pick = pick[:: max(1, len(pick) // INTERLEAVED_BATCHES)][:INTERLEAVED_BATCHES]
    pair_ratios = []
    for n, b in enumerate(pick):
        reqs = [r for _, _, r in b]
        dt = {}
        for kind in (("f", "s") if n % 2 == 0 else ("s", "f")):
            t0 = time.perf_counter()
            if kind == "f":
                forcer.forward_hidden(reqs)
            else:
                _score(forcer, reqs)
            sync()
            dt[kind] = time.perf_counter() - t0
        pair_ratios.append(dt["s"] / dt["f"])
    score_over_forward = statistics.median(pair_ratios)  # the median pair: robust to bursts of load

    # the stage's cache equals the bare pass's float32 outputs up to float16 storage
    import numpy as np

    from llavadi.schemas.teacher_cache import iter_cache_shard

    diff = 0.0
    n_cached = 0
    for i in shards:
        for s in iter_cache_shard(out_sd.data_file(i)):
            ref = recorded[s["sample_id"]]
            assert s["token_ids"].tolist() == ref["token_ids"], s["sample_id"]
            if len(ref["token_ids"]):
                diff = max(diff, float(np.abs(s["hidden"] - ref["hidden"]).max()))
            n_cached += 1
    assert n_cached == len(recorded), (n_cached, len(recorded))

    best_bare = sum(min(v) for v in times["bare"].values())
    best_stage = sum(min(v) for v in times["stage"].values())
    # the stage's own stats of its fastest run per shard
    best_outs = [outs[i][times["stage"][i].index(min(times["stage"][i]))] for i in shards]
    st = {k: round(sum(o.stats[k] for o in best_outs), 3) for k in
          ("stage_seconds", "forward_seconds", "close_seconds", "prepare_cpu_seconds", "write_cpu_seconds")}
    st["bytes"] = sum(o.stats["bytes"] for o in best_outs)
    st["tokens"] = sum(o.counts["tokens"] for o in best_outs)
    st["samples"] = sum(o.counts["out"] for o in best_outs)
    st["bytes_per_token"] = round(st["bytes"] / max(1, st["tokens"]), 1)
    st["outside_forward_seconds"] = round(st["stage_seconds"] - st["forward_seconds"], 3)
    per_rep = [round(sum(times["stage"][i][r] for i in shards) / sum(times["bare"][i][r] for i in shards), 4)
               for r in range(reps)]
    pairs = [times["stage"][i][r] / times["bare"][i][r] for i in shards for r in range(reps)]
    ratio = best_stage / best_bare
    fig = {"model": name, "params_m": round(sum(p.numel() for p in forcer.model.parameters()) / 1e6, 1),
           "hidden_size": forcer.hidden_size, "dtype": str(forcer.dtype).replace("torch.", ""),
           "load_s": round(load_s, 2), "shards": len(shards), "samples": len(recorded),
           "batches": sum(len(b) for b in batches.values()), "batch_size": c.batch_size,
           "forward_tokens": n_fwd_tokens, "padded_tokens": n_padded, "answer_tokens": n_answer, "reps": reps,
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
           "stage_stats": st, "stage_cache_hidden_max_abs_vs_bare_f32": diff}
    samples = [recorded[s] for s in sorted(recorded)]
    return fig, samples, forcer


# --------------------------------------------------------------------------- (c) dtypes

def dtype_study(work: Path, name: str, samples: list[dict], forcer, top_k: int) -> list[dict]:
    import numpy as np
    import torch

    from llavadi.schemas.teacher_cache import (HIDDEN_DTYPES, LOGPROB_DTYPES, CacheShardWriter, CacheSpec,
                                               bytes_per_token, iter_cache_shard)

    H = forcer.hidden_size
    W = forcer.head.weight.detach().float().cpu()
    bias = getattr(forcer.head, "bias", None)
    bias = bias.detach().float().cpu() if bias is not None else None
    n_tok = sum(len(s["token_ids"]) for s in samples)
    ref = {s["sample_id"]: s for s in samples}
    # exact-KD reference: full-vocabulary log-probs from the float32 hidden, first EXACT_KD_TOKENS rows
    kd_ids, rows = [], 0
    for s in samples:
        if rows >= EXACT_KD_TOKENS:
            break
        kd_ids.append(s["sample_id"])
        rows += len(s["token_ids"])

    def full_lp(h: np.ndarray) -> torch.Tensor:
        logits = torch.from_numpy(np.ascontiguousarray(h, dtype=np.float32)).double() @ W.double().T
        if bias is not None:
            logits = logits + bias.double()
        return torch.log_softmax(logits, -1)

    ref_h = np.concatenate([ref[i]["hidden"] for i in kd_ids]) if kd_ids else np.zeros((0, H), np.float32)
    ref_lp = full_lp(ref_h)
    ref_top = torch.from_numpy(np.concatenate([ref[i]["topk_ids"] for i in kd_ids]).astype(np.int64)) if kd_ids \
        else torch.zeros((0, top_k), dtype=torch.long)
    out = []
    d = work / f"dtypes-{name}"
    for hd in HIDDEN_DTYPES:
        kd = None
        for ld in LOGPROB_DTYPES:
            row = {"model": name, "hidden_dtype": hd, "logprob_dtype": ld, "answer_tokens": n_tok}
            for store in ("zarr", "webdataset"):
                spec = CacheSpec(hidden_size=H, top_k=top_k, hidden_dtype=hd, logprob_dtype=ld, store=store)
                w = CacheShardWriter(d / f"{hd}-{ld}.{spec.ext}", spec)
                for s in samples:
                    w.add(s["sample_id"], s["token_ids"], s["hidden"], s["topk_ids"], s["topk_logprobs"],
                          s["logit_stats"])
                info = w.close()
                row[f"bytes_per_token_{store}"] = round(info["bytes"] / max(1, n_tok), 1)
                if store == "zarr":
                    row["theoretical_bytes_per_token"] = bytes_per_token(spec)
                    eh = elp = 0.0
                    got = {}
                    for s in iter_cache_shard(d / f"{hd}-{ld}.{spec.ext}", spec):
                        r = ref[s["sample_id"]]
                        if len(r["token_ids"]):
                            eh = max(eh, float(np.abs(s["hidden"] - r["hidden"]).max()))
                            elp = max(elp, float(np.abs(s["topk_logprobs"] - r["topk_logprobs"]).max()))
                        got[s["sample_id"]] = s["hidden"]
                    row["hidden_max_abs_err"] = eh
                    row["hidden_max_abs"] = float(max(np.abs(s["hidden"]).max() for s in samples
                                                      if len(s["token_ids"])))
                    row["topk_logprobs_max_abs_err"] = elp
                    if kd is None:  # the exact-KD error depends on the hidden dtype only
                        q = np.concatenate([got[i] for i in kd_ids]) if kd_ids else np.zeros((0, H), np.float32)
                        lp = full_lp(q)
                        kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1)
                        top_err = (lp.gather(1, ref_top) - ref_lp.gather(1, ref_top)).abs()
                        kd = {"exact_kd_tokens": int(q.shape[0]),
                              "exact_kd_topk_logprob_max_abs_err": float(top_err.max()) if len(q) else 0.0,
                              "exact_kd_kl_mean": float(kl.mean()) if len(q) else 0.0,
                              "exact_kd_kl_max": float(kl.max()) if len(q) else 0.0}
                    row.update(kd)
            out.append(row)
    shutil.rmtree(d, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- (d) reading

def read_rate(work: Path, samples: list[dict], H: int, top_k: int, n_target: int) -> dict:
    from llavadi.schemas.teacher_cache import CacheReader, CacheShardWriter, CacheSpec, write_index

    res = {"read_samples": 0, "read_tokens": 0}
    per = max(1, -(-n_target // READ_SHARDS))
    for store in ("zarr", "webdataset"):
        spec = CacheSpec(hidden_size=H, top_k=top_k, store=store)
        d = work / f"read-{store}"
        entries, n, T = [], 0, 0
        t = time.perf_counter()
        for sh in range(READ_SHARDS):
            w = CacheShardWriter(d / spec.shard_name(sh), spec)
            for j in range(per):
                s = samples[(sh * per + j) % len(samples)]
                w.add(f"{s['sample_id']}-r{sh * per + j}", s["token_ids"], s["hidden"], s["topk_ids"],
                      s["topk_logprobs"], s["logit_stats"])
            info = w.close()
            entries.append({"shard": sh, **{k: info[k] for k in ("file", "n_samples", "n_tokens", "sha256")}})
            n += info["n_samples"]
            T += info["n_tokens"]
        write_s = time.perf_counter() - t
        write_index(d, spec.to_meta(), entries)
        res.update(read_samples=n, read_tokens=T)
        res[f"{store}_write_samples_per_s"] = round(n / write_s, 1)
        for verify in (True, False):
            best = None
            for _ in range(2):  # the second pass reads from the page cache, as a training epoch would
                t = time.perf_counter()
                cnt = toks = 0
                for s in CacheReader(d, verify=verify):
                    cnt += 1
                    toks += len(s["token_ids"])
                dt = time.perf_counter() - t
                assert (cnt, toks) == (n, T)
                best = dt if best is None else min(best, dt)
            tag = "" if verify else "_noverify"
            res[f"{store}{tag}_samples_per_s"] = round(n / best, 1)
            res[f"{store}{tag}_tokens_per_s"] = round(T / best, 1)
        shutil.rmtree(d, ignore_errors=True)
    return res


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="midsize,tiny", help="comma-separated: midsize,tiny (default both)")
    ap.add_argument("--conversations", type=int, default=160, help="synthetic conversations (default 160)")
    ap.add_argument("--shard-size", type=int, default=80, help="rows per input shard (default 80)")
    ap.add_argument("--reps-midsize", type=int, default=3, help="timing repetitions on the mid-size teacher")
    ap.add_argument("--reps-tiny", type=int, default=3, help="timing repetitions on the tiny teacher")
    ap.add_argument("--read-samples", type=int, default=4000, help="samples in the read-rate stores")
    ap.add_argument("--out", default=None, help="also write the JSON result to this file")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed afterwards)")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m.strip()]
    if not models or any(m not in ("midsize", "tiny") for m in models):
        ap.error("--models takes midsize and/or tiny")

    t_start = time.perf_counter()
    machine = machine_info()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="llavadi-bench-cache-teacher-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"benchmark": "cache_teacher", "target_ratio": TARGET_RATIO}
    try:
        run, image_root, kinds = make_run(work, args.conversations, args.shard_size)
        result["data"] = {**kinds, "shard_size": args.shard_size}
        log(f"data: {kinds}")
        read_src = None
        runs, dtypes = [], []
        for name in models:
            t = time.perf_counter()
            model_dir = build_model(work, name)
            log(f"{name}: built in {time.perf_counter() - t:.1f}s")
            reps = args.reps_midsize if name == "midsize" else args.reps_tiny
            fig, samples, forcer = bench_model(name, model_dir, run, image_root, max(1, reps))
            log(f"{name}: bare {fig['bare_forward_s']}s, stage {fig['stage_s']}s, ratio {fig['ratio']}, "
                f"estimate {fig['ratio_estimate']}")
            result[f"{name}_bare_forward_s"] = fig["bare_forward_s"]
            result[f"{name}_stage_s"] = fig["stage_s"]
            result[f"{name}_ratio"] = fig["ratio"]
            result[f"{name}_meets_target"] = fig["meets_target"]
            result[f"{name}_ratio_pair_median"] = fig["ratio_pair_median"]
            result[f"{name}_ratio_estimate"] = fig["ratio_estimate"]
            runs.append(fig)
            t = time.perf_counter()
            dtypes += dtype_study(work, name, samples, forcer, forcer.k)
            log(f"{name}: dtype study {time.perf_counter() - t:.1f}s")
            if read_src is None:
                read_src = (samples, forcer.hidden_size, forcer.k, name)
            del forcer
            shutil.rmtree(model_dir, ignore_errors=True)
        t = time.perf_counter()
        rr = read_rate(work, read_src[0], read_src[1], read_src[2], args.read_samples)
        rr["source_model"] = read_src[3]
        log(f"read rate {time.perf_counter() - t:.1f}s")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    head = next((r for r in dtypes if r["model"] == models[0]), None)
    if head is not None:
        for r in dtypes:
            if r["model"] == models[0]:
                key = f"{r['hidden_dtype']}_{r['logprob_dtype']}"
                result[f"bytes_per_token_{key}"] = r["bytes_per_token_zarr"]
                result[f"hidden_max_abs_err_{r['hidden_dtype']}"] = r["hidden_max_abs_err"]
                result[f"topk_logprobs_max_abs_err_{key}"] = r["topk_logprobs_max_abs_err"]
    for store in ("zarr", "webdataset"):
        result[f"read_{store}_samples_per_s"] = rr[f"{store}_samples_per_s"]
        result[f"read_{store}_tokens_per_s"] = rr[f"{store}_tokens_per_s"]
    result["runs"] = runs
    result["dtypes"] = dtypes
    result["read"] = rr
    result["machine"] = machine
    try:
        result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    result["bench_wall_s"] = round(time.perf_counter() - t_start, 1)

    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
