"""Benchmark ``llavadi train-student`` against design §7, as ratios measured within one run.

(a) **KD step cost**: a training step with full KD (CE + top-k KD + feature loss, the default
    recipe) and with exact KD (``kd.exact=true``: CE + full-vocabulary KD + feature loss)
    ÷ a CE-only step (``kd_weight=0, feature_weight=0``); target ≤ 1.15. For the tiny student
    (``STUDENT``) and a ≈100M-parameter student (``MIDSIZE`` with fewer layers, see ``--mid-layers``);
    the cache's teacher is the tiny ``TEACHER`` (same 32064-token vocabulary).
(b) **Loader vs trainer**: samples/s of ``StepDataset`` iterated alone (collate included, a new
    dataset + ``DataLoader`` per epoch as ``loop.train`` does, ``num_workers`` 0 and 2) ÷ samples/s
    of the tiny student's full-KD training step; target ≥ 5.
(c) **KD loss peak memory**: the exact KD loss forward + backward as the loop runs it
    (``losses.fused_head_loss``: blocks of ``chunk`` rows, gradients taken in forward; the headline)
    and as ``losses.chunked_exact_kd_loss`` (checkpointed chunks) ÷ the naive
    full-logits path (student logits ``h @ W_s.T`` [N,V] with grad + teacher logits [N,V] +
    ``losses.dense_kd_loss``, forward + backward); target ≤ 0.25.
(d) **Gradient checkpointing peak memory** (``train_student.gradient_checkpointing``): the peak of
    one training step's forward + backward with checkpointing ÷ the same step without it, on the
    ≈100M-parameter student (the tiny one with ``--no-mid``), same batch, same weights; and the
    bytes the forward keeps for backward (the activations), with ÷ without. Reported (activations
    are what it saves: the larger the batch × sequence against the parameter count, the lower the
    peak ratio).

How it is measured
------------------
Setup (not timed): synthetic VQA data (``stages/demo/synthetic_vqa``) whose answers get
``--answer-words`` seeded filler words appended (so there are tens of answer tokens per sample —
KD's cost grows with answer tokens × V, and the synthetic 1–2-word answers would hide it), then
``llavadi ingest`` → ``llavadi cache-teacher`` (``source=data``, default top-k 64, float16
hidden) via the CLI, as ``tests/test_train_student.py`` does.

(a) calls the training code directly, not ``loop.train``: the model is set up as
``loop._train_locked`` does (float32 weights, ``loop.Projector`` seeded, vision tower frozen,
``teacher_head.safetensors`` for the exact arm, AdamW + ``loop.lr_lambda`` schedule,
``loop.StudentWithProjector`` whose forward calls ``loop.step_loss``), and one step is the
loop's inner body for one process: per micro-batch forward + ``backward`` of loss / tokens,
the terms read back with ``float``, grad-norm clipping, optimizer and scheduler step,
``zero_grad``. Left out: metrics.jsonl / TensorBoard writes and checkpoints (I/O, not compute).
The micro-batches are collated once from ``StepDataset`` before timing, so every arm runs on the
*same* batches and loading is not in the step time. The arms share one model and optimizer (the
weights move a little between arms; that does not change the cost of a step). They are
interleaved per batch: in each round, for each batch, every arm runs that batch (order rotated),
so the arms' steps on one batch are adjacent in time; round 0 is warm-up and dropped. The ratio
of an arm is the median over (round, batch) pairs of its wall time ÷ the CE-only wall time on the
same batch in the same round (paired, so drift in the machine's load cancels); ``step_ms`` is
the median step time. The same from process CPU time is reported beside it (``cpu_ratio``: less
sensitive to other processes taking the cores). A loss-only timing (``step_loss`` forward +
backward on fixed student hidden states, no LLM body) per arm shows where the extra time goes.

(b) times whole epochs of ``StepDataset`` through a ``DataLoader(batch_size=None)``, each epoch a
fresh dataset (new shuffle seed) as the loop does. ``samples_per_s`` counts from the start of
the epoch (worker start-up and shard reads included); ``steady_samples_per_s`` from the first
step received. The trainer rate is the tiny student's full-KD step from (a): global batch ÷ step
time. The headline ratio uses the loader's whole-epoch rate.

(c) runs each arm in a fresh subprocess (float32, ``N`` answer tokens, hidden ``H`` for both
models, vocabulary ``V``; teacher side without grad, student hidden and head weight with grad;
inputs allocated before measuring); the fused and chunked arms at each of ``--kd-mem-chunks`` (the
first, by default the only one: the config default ``kd.chunk_size`` 512, is the headline). The arms run while the untimed setup runs and are
finished before anything is timed. Peak = the highest sum of live bytes allocated *during*
forward + backward, from the allocator events of ``torch.profiler`` (``profile_memory=True``:
every CPU allocation and free, with its size and time; exact bytes, like tracemalloc for
tensors). The parameter gradient ``W_s.grad`` [V,H] is allocated inside the measured region in
both arms and counted. Cross-check: the process's ``ru_maxrss`` high-water mark minus its RSS
just before the loss (page-granular; glibc serves these large buffers with mmap and returns
them on free; it also counts memory that is not tensors — BLAS packing buffers, the profiler's
own — so its ratio is higher). The allocator events come from the profiler's result object
(``prof.profiler.kineto_results``, not a documented API); where that is missing the RSS figures
are the only ones (``method`` says which).

(d) runs each arm (``off``, ``on``) in a fresh subprocess after the setup, one after the other: the
model set up as in (a) (``Trainer``; ``on``: ``parallel.enable_gradient_checkpointing`` on the
student, as the loop does), one batch of ``--gc-batch`` samples from ``StepDataset`` (the same in
both arms), one untimed warm-up step, ``--gc-steps`` timed forward + backward passes (median:
``fwd_bwd_ms``; the ratio of the arms' medians is the recompute cost), then one measured
forward + backward, forward and backward profiled apart: the bytes still allocated after the
forward (what it keeps for backward) and the step's peak = max(forward's peak, those + the
backward's peak), from the profiler's allocator events as in (c) (on CUDA:
``torch.cuda.memory_allocated`` / ``max_memory_allocated`` minus the bytes allocated before). The
parameter gradients are allocated inside the measured region in both arms and counted (the
weights and the batch are not). Each arm reports its loss and gradient norm:
they must agree (checkpointing recomputes the same ops; ``loss_rel_diff``, ``grad_norm_rel_diff``).

Timings use torch's default thread count unless ``--threads`` is given, with
``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it (spinning OpenMP threads make steps
~10x slower when other processes share the cores); the load average is recorded (other processes
distort absolute times more than the interleaved ratios). On a CUDA machine (a) and (b) run on the
GPU as the loop would (bf16 autocast); (c) stays on the CPU.

Prints ONE JSON object on stdout's last line (``--out FILE`` also writes it).

Usage: ``.venv/bin/python benchmarks/train_student.py [--out FILE] [--no-mid] [--no-gc] [--threads N] ...``
"""
from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
from _common import emit, machine_info  # noqa: E402

import os

# Before torch loads: OpenMP threads that spin while waiting collapse (10x slower steps) when other
# processes share the cores; passive waiting keeps the arms' timings comparable. Recorded in the JSON.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FILLER = ("the shape is drawn in a plain colour on a grey board and it sits inside one cell of the grid "
          "near the middle with a thin border of noise around every edge so it looks slightly blurred").split()


# --------------------------------------------------------------------------- machine

def loadavg() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def log(msg: str) -> None:
    print(f"[bench train-student] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- setup

def llavadi_cmd() -> list[str]:
    return [sys.executable, "-m", "llavadi.cli"]


def cli(*args) -> str:
    env = dict(os.environ)
    env.pop("LLAVADI_PROGRESS", None)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = subprocess.run(llavadi_cmd() + [str(a) for a in args], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"llavadi {' '.join(map(str, args))} exited {p.returncode}\n"
                           f"{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p.stdout


def lengthen_answers(js: Path, words: int, seed: int) -> None:
    """Append ``words`` seeded filler words to every answer (answers stay plain English)."""
    import numpy as np

    if words <= 0:
        return
    rng = np.random.RandomState(seed)
    recs = json.loads(js.read_text())
    for r in recs:
        for t in r["conversations"]:
            if t["from"] == "gpt":
                t["value"] = t["value"] + ". " + " ".join(FILLER[i] for i in rng.randint(len(FILLER), size=words)) + "."
    js.write_text(json.dumps(recs))


def mid_spec(layers: int):
    from dataclasses import replace

    from llavadi.stages.demo.tiny_models import MIDSIZE

    return replace(MIDSIZE, layers=layers)


def setup(work: Path, args) -> dict:
    from llavadi.stages.demo.synthetic_vqa import generate
    from llavadi.stages.demo.tiny_models import STUDENT, TEACHER, build_tiny_llava

    t0 = time.perf_counter()
    js = generate(work, args.samples, seed=11)
    lengthen_answers(js, args.answer_words, seed=5)
    run = work / "run"
    cli("ingest", run, "--input", js, "--image-root", work, "--shard-size", max(1, args.samples // 4),
        "--executor", "local")
    teacher = build_tiny_llava(work / "teacher", TEACHER)
    student = build_tiny_llava(work / "student", STUDENT)
    mid = build_tiny_llava(work / "mid", mid_spec(args.mid_layers)) if not args.no_mid else None
    out = cli("cache-teacher", run, "--teacher", teacher, "--executor", "local", "cache_teacher.source=data")
    log(f"setup {time.perf_counter() - t0:.1f} s: {out.strip().splitlines()[-1] if out.strip() else ''}")
    return {"run": run, "image_root": work, "student": student, "mid": mid, "setup_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------- (b) loader

def loader_rate(run: Path, st, image_root: Path, batch: int, workers: int, epochs: int, shuffle_buffer: int) -> dict:
    import torch

    from llavadi.stages.train_student.data import StepDataset

    n = 0
    total = steady = 0.0
    n_steady = 0
    for e in range(epochs):
        t0 = time.perf_counter()
        ds = StepDataset(run, st, str(image_root), batch_size=batch, micro_batch_size=batch, rank=0, world=1, seed=0,
                         epoch=e, shuffle_buffer=shuffle_buffer)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=False)
        t_first = None
        k = 0
        for item in loader:
            k += sum(len(mb["sample_ids"]) for mb in item["micro_batches"])
            if t_first is None:
                t_first, k_first = time.perf_counter(), k
        t1 = time.perf_counter()
        n += k
        total += t1 - t0
        if t_first is not None:
            steady += t1 - t_first
            n_steady += k - k_first
    return {"num_workers": workers, "epochs": epochs, "samples": n, "wall_s": round(total, 3),
            "samples_per_s": round(n / total, 1),
            "steady_samples_per_s": round(n_steady / steady, 1) if steady else None}


# --------------------------------------------------------------------------- (a) trainer

ARMS = ("ce_only", "full_kd_topk", "full_kd_exact")


def arm_config(base, arm: str):
    cfg = copy.deepcopy(base)
    c = cfg.train_student
    if arm == "ce_only":
        c.kd_weight, c.feature_weight = 0.0, 0.0
    elif arm == "full_kd_exact":
        c.kd.exact = True
    return cfg


class Trainer:
    """The model/optimizer setup of ``loop._train_locked`` and its step body (one process)."""

    def __init__(self, student_dir: Path, run: Path, cfg):
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForImageTextToText

        from llavadi.schemas.teacher_cache import CacheReader
        from llavadi.stages.train_student import loop

        c = cfg.train_student
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        use_bf16 = c.precision == "bf16" or (c.precision == "auto" and self.device == "cuda")
        torch.manual_seed(c.seed)
        self.student = AutoModelForImageTextToText.from_pretrained(student_dir, dtype=torch.float32).to(self.device)
        ht = CacheReader(run / "cache_teacher", verify=False).spec.hidden_size
        torch.manual_seed(c.seed)
        hs = self.student.config.get_text_config().hidden_size
        projector = loop.Projector(hs, ht, c.feature.projector).to(self.device)
        for name, p in self.student.named_parameters():
            p.requires_grad_(not (c.freeze_vision and ".vision_tower." in f".{name}"))
        head_t = {k: v.to(self.device)
                  for k, v in load_file(run / "cache_teacher" / "teacher_head.safetensors").items()}

        def autocast():
            return torch.autocast(device_type=self.device, dtype=torch.bfloat16, enabled=use_bf16)

        self.autocast = autocast
        self.model = loop.StudentWithProjector(self.student, projector, cfg, head_t, autocast)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=c.lr, weight_decay=c.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, loop.lr_lambda(c.schedule, 1, 10_000))
        self.n_params = sum(p.numel() for p in self.student.parameters())
        self.model.train()

    def to_device(self, mbs):
        import torch

        out = [{k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in mb.items()} for mb in mbs]
        for mb in out:  # the student's forward inputs (data.StepDataset.collate: a nested dict)
            mb["inputs"] = {k: v.to(self.device) for k, v in mb["inputs"].items()}
        return out

    def sync(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def step(self, mbs, cfg) -> None:
        import torch

        c = cfg.train_student
        self.model.cfg = cfg
        n_global = float(sum(len(mb["targets"]) for mb in mbs))
        sums: dict = {}
        for mb in mbs:
            loss, terms = self.model(mb)
            (loss * (1 / n_global)).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        if c.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def loss_only(self, mbs, cfg) -> None:
        """``step_loss`` forward + backward on fixed student hidden states (no LLM body)."""
        from llavadi.stages.train_student import loop

        for mb, h in zip(mbs, self._hidden[id(mbs)]):
            h = h.detach().requires_grad_(True)
            with self.autocast():
                proj = self.model.projector(h)
            loss, terms = loop.step_loss(self.student.get_output_embeddings(), h.float(), proj.float(), mb, cfg,
                                         self.model.head_t)
            loss.backward()
            for v in terms.values():
                float(v)
        self.opt.zero_grad(set_to_none=True)

    def precompute_hidden(self, batches) -> None:
        """Student hidden states at answer positions of every micro-batch, for ``loss_only``."""
        import torch

        self._hidden = {}
        with torch.no_grad(), self.autocast():
            for mbs in batches:
                hs = []
                for mb in mbs:
                    out = self.student.model(**mb["inputs"])
                    hid = out.last_hidden_state
                    hs.append(hid.reshape(-1, hid.shape[-1])[mb["rows"]].float())
                self._hidden[id(mbs)] = hs


def time_arms(fn, batches: list, cfgs: dict, rounds: int, sync) -> list:
    """Interleaved per batch: for every round and batch, each arm runs that batch (order rotated
    by round and batch), so arms on the same batch are adjacent in time. Round 0 is warm-up.
    Returns ``[(round, batch, arm, wall s, process CPU s)]``."""
    rows = []
    names = list(cfgs)
    for r in range(rounds):
        for i, mbs in enumerate(batches):
            k = (r + i) % len(names)
            for a in names[k:] + names[:k]:
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                fn(mbs, cfgs[a])
                sync()
                rows.append((r, i, a, time.perf_counter() - t0, time.process_time() - c0))
    return rows


def summarise(rows: list) -> dict:
    """Per arm: median step time over the measured rounds; ratio = median over (round, batch) of
    arm time ÷ CE-only time on the same batch in the same round (paired: drift cancels)."""
    meas = [x for x in rows if x[0] > 0] or rows
    arms = sorted({x[2] for x in meas}, key=lambda a: ARMS.index(a) if a in ARMS else len(ARMS))
    t = {(x[0], x[1], x[2]): (x[3], x[4]) for x in meas}
    pairs = sorted({(x[0], x[1]) for x in meas})
    out = {"step_ms": {}, "cpu_ms": {}, "ratio": {}, "cpu_ratio": {}, "pairs": len(pairs)}
    for a in arms:
        out["step_ms"][a] = round(1000 * statistics.median(t[k + (a,)][0] for k in pairs), 1)
        out["cpu_ms"][a] = round(1000 * statistics.median(t[k + (a,)][1] for k in pairs), 1)
        if a != "ce_only":
            out["ratio"][a] = round(statistics.median(t[k + (a,)][0] / t[k + ("ce_only",)][0] for k in pairs), 3)
            out["cpu_ratio"][a] = round(statistics.median(t[k + (a,)][1] / t[k + ("ce_only",)][1] for k in pairs), 3)
    return out


def collect_batches(run: Path, st, image_root: Path, batch: int, micro: int, n: int, shuffle_buffer: int) -> list:
    from llavadi.stages.train_student.data import StepDataset

    ds = StepDataset(run, st, str(image_root), batch_size=batch, micro_batch_size=micro, rank=0, world=1, seed=0,
                     epoch=0, shuffle_buffer=shuffle_buffer, max_steps=n)
    return [item["micro_batches"] for item in ds]


def bench_student(name: str, student_dir: Path, setup_info: dict, args, batch: int, micro: int, n_batches: int,
                  rounds: int, loss_only: bool) -> dict:
    from llavadi.pipeline.config import LlavadiConfig
    from llavadi.stages.train_student.data import student_tokens

    t0 = time.perf_counter()
    base = LlavadiConfig()
    base.train_student.student = str(student_dir)
    base.train_student.batch_size, base.train_student.micro_batch_size = batch, micro
    st = student_tokens(str(student_dir))
    tr = Trainer(student_dir, setup_info["run"], base)
    batches = [tr.to_device(b) for b in collect_batches(setup_info["run"], st, setup_info["image_root"], batch, micro,
                                                         n_batches, args.shuffle_buffer)]
    cfgs = {a: arm_config(base, a) for a in ARMS}
    toks = [sum(len(mb["targets"]) for mb in b) for b in batches]
    seq = [sum(int(mb["inputs"]["attention_mask"].sum()) for mb in b) for b in batches]
    res = summarise(time_arms(tr.step, batches, cfgs, rounds, tr.sync))
    out = {"student": name, "params_m": round(tr.n_params / 1e6, 1), "batch_size": batch, "micro_batch_size": micro,
           "batches": len(batches), "rounds": rounds, "warmup_rounds": 1,
           "answer_tokens_per_step": round(sum(toks) / len(toks), 1),
           "seq_tokens_per_step": round(sum(seq) / len(seq), 1), **res}
    out["trainer_samples_per_s"] = {a: round(batch / (ms / 1000), 2) for a, ms in res["step_ms"].items()}
    if loss_only:
        tr.precompute_hidden(batches)
        lo = summarise(time_arms(tr.loss_only, batches, cfgs, max(2, rounds - 2), tr.sync))
        out["loss_only_ms"], out["loss_only_cpu_ms"] = lo["step_ms"], lo["cpu_ms"]
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    log(f"{name}: {out['params_m']}M params, {out['answer_tokens_per_step']} answer tokens/step, step ms "
        f"{out['step_ms']}, ratios {out['ratio']} (CPU-time ratios {out['cpu_ratio']})"
        + (f", loss-only ms {out['loss_only_ms']}" if loss_only else ""))
    del tr
    return out


# --------------------------------------------------------------------------- (c) memory

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def alloc_peak(prof) -> tuple:
    """(peak live bytes, live bytes at the end, event count) of the CPU allocations recorded by a
    ``torch.profiler.profile(profile_memory=True)`` run (its allocator events, in time order);
    ``(None, None, 0)`` where the profiler's internals moved (``kineto_results`` is not a documented API)."""
    try:
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    except AttributeError:  # the profiler's internals moved: RSS only
        events = None
    live = peak = 0
    for _, b in events or []:
        live += b
        peak = max(peak, live)
    if not events:
        return None, None, 0
    return peak, live, len(events)


def kd_mem_arm(arm: str, n: int, h: int, v: int, chunk: int) -> dict:
    """One arm of (c), in this (fresh) process. Returns bytes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from llavadi.stages.train_student import losses

    torch.manual_seed(0)
    hs = torch.randn(n, h).mul_(0.5).requires_grad_(True)
    ws = torch.randn(v, h).mul_(0.02).requires_grad_(True)
    ht = torch.randn(n, h).mul_(0.5)
    wt = torch.randn(v, h).mul_(0.02)

    def naive():
        zs = hs @ ws.T  # [N, V] student logits (grad)
        with torch.no_grad():
            zt = ht @ wt.T  # [N, V] teacher logits
        loss = losses.dense_kd_loss(zs, zt, reduction="sum")
        loss.backward()
        return loss.item()

    def chunked():
        loss = losses.chunked_exact_kd_loss(hs, ws, ht, wt, chunk_size=chunk, reduction="sum")
        loss.backward()
        return loss.item()

    def fused():  # the training loop's exact path: KD only here (ce_weight=0), blocks of `chunk` rows
        loss = losses.fused_head_loss(hs, ws, teacher_hidden=ht, teacher_head_weight=wt, ce_weight=0.0,
                                      block_rows=chunk)[0]
        loss.backward()
        return loss.item()

    fn = {"naive": naive, "chunked": chunked, "fused": fused}[arm]
    rss0 = _rss_bytes()
    max0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        value = fn()
    wall = time.perf_counter() - t0
    max1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak, live, n_events = alloc_peak(prof)
    return {"arm": arm, "peak_alloc_bytes": peak, "end_alloc_bytes": live, "alloc_events": n_events,
            # None: the loss never raised the process's high-water mark (then delta <= max0 - rss0)
            "rss_peak_delta_bytes": max1 - rss0 if max1 > max0 else None,
            "rss_before_bytes": rss0, "wall_s": round(wall, 2), "loss": value}


def kd_memory_start(args) -> dict:
    """Start every arm of (c), each in its own fresh process (run during the untimed setup: the
    measured bytes are per process, their times are not used)."""
    procs = {}
    arms = [("naive", args.kd_mem_chunks[0])] + [(a, c) for c in args.kd_mem_chunks for a in ("fused", "chunked")]
    for arm, chunk in arms:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--kd-mem-arm", arm, "--kd-mem-n", str(args.kd_mem_n),
               "--kd-mem-h", str(args.kd_mem_h), "--kd-mem-v", str(args.kd_mem_v), "--kd-mem-chunk", str(chunk)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        procs[arm if arm == "naive" else f"{arm}_{chunk}"] = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return procs


def kd_memory_collect(args, procs: dict) -> dict:
    arms = {}
    for name, p in procs.items():
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"kd memory arm {name} exited {p.returncode}:\n{err[-4000:]}")
        arms[name] = json.loads(out.strip().splitlines()[-1])
    n, h, v = args.kd_mem_n, args.kd_mem_h, args.kd_mem_v
    nv = n * v * 4
    mib = lambda b: None if b is None else round(b / 2**20, 1)  # noqa: E731
    a = arms["naive"]
    alloc = all(x["peak_alloc_bytes"] for x in arms.values())
    key = "peak_alloc_bytes" if alloc else "rss_peak_delta_bytes"
    out = {"N": n, "H": h, "V": v, "dtype": "float32", "one_NxV_fp32_mib": mib(nv),
           "method": "torch.profiler allocator events" if alloc else "ru_maxrss delta (profiler events unavailable)",
           "naive_peak_mib": mib(a[key]), "naive_peak_in_NxV": round(a[key] / nv, 2) if a[key] else None,
           "rss_naive_peak_delta_mib": mib(a["rss_peak_delta_bytes"]), "fused": {}, "chunked": {},
           "wall_s": {"naive": a["wall_s"]}}
    for name, b in arms.items():
        if name == "naive":
            continue
        arm, chunk = name.split("_")[0], int(name.split("_")[1])
        rss = (round(b["rss_peak_delta_bytes"] / a["rss_peak_delta_bytes"], 3)
               if a["rss_peak_delta_bytes"] and b["rss_peak_delta_bytes"] else None)
        r = {"chunk_size": chunk, "peak_mib": mib(b[key]), "peak_in_NxV": round(b[key] / nv, 2) if b[key] else None,
             "ratio": round(b[key] / a[key], 3) if a[key] and b[key] else None,
             "rss_peak_delta_mib": mib(b["rss_peak_delta_bytes"]), "rss_ratio": rss,
             "loss_rel_diff_vs_naive": abs(a["loss"] - b["loss"]) / max(1e-12, abs(a["loss"]))}
        out[arm][str(chunk)] = r
        out["wall_s"][name] = b["wall_s"]
        log(f"KD memory N={n} H={h} V={v}: naive {out['naive_peak_mib']} MiB, {arm} {chunk}: {r['peak_mib']} MiB, "
            f"ratio {r['ratio']} (RSS ratio {rss})")
    return out


# --------------------------------------------------------------------------- (d) gradient checkpointing

def gc_mem_arm(arm: str, student: str, run: str, image_root: str, batch: int, shuffle_buffer: int, steps: int) -> dict:
    """One arm of (d) (``off`` / ``on``), in this (fresh) process. Returns bytes and ms."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from llavadi.pipeline.config import LlavadiConfig
    from llavadi.stages.train_student import parallel
    from llavadi.stages.train_student.data import student_tokens

    cfg = LlavadiConfig()
    cfg.train_student.student = student
    cfg.train_student.batch_size = cfg.train_student.micro_batch_size = batch
    tr = Trainer(Path(student), Path(run), cfg)
    if arm == "on":
        parallel.enable_gradient_checkpointing(tr.student)
    mbs = tr.to_device(collect_batches(Path(run), student_tokens(student), Path(image_root), batch, batch, 1,
                                       shuffle_buffer)[0])
    n_tok = float(sum(len(mb["targets"]) for mb in mbs))

    def fwd_bwd() -> float:
        total = 0.0
        for mb in mbs:
            loss, _ = tr.model(mb)
            (loss / n_tok).backward()
            total += float(loss)
        return total / n_tok

    fwd_bwd()  # warm-up: lazy initialisation, allocator
    tr.opt.zero_grad(set_to_none=True)
    times = []
    for _ in range(steps):
        tr.sync()
        t0 = time.perf_counter()
        fwd_bwd()
        tr.sync()
        times.append(time.perf_counter() - t0)
        tr.opt.zero_grad(set_to_none=True)
    # the measured pass, forward and backward apart: bytes still live after forward are what the
    # forward keeps for backward (the activations checkpointing drops); the step's peak is the higher
    # of the forward's peak and that plus the backward's own peak
    assert len(mbs) == 1, "(d) measures one micro-batch"
    if tr.device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss, _ = tr.model(mbs[0])
        torch.cuda.synchronize()
        fwd_peak, fwd_live = torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        (loss / n_tok).backward()
        torch.cuda.synchronize()
        bwd_peak = torch.cuda.max_memory_allocated() - base - fwd_live
        method = "torch.cuda.max_memory_allocated"
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss, _ = tr.model(mbs[0])
        fwd_peak, fwd_live, _ = alloc_peak(prof)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            (loss / n_tok).backward()
        bwd_peak = alloc_peak(prof)[0]
        method = "torch.profiler allocator events"
    peak = None if None in (fwd_peak, fwd_live, bwd_peak) else max(fwd_peak, fwd_live + bwd_peak)
    loss = float(loss) / n_tok
    grad_bytes = sum(p.numel() * p.element_size() for p in tr.params)
    gnorm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in tr.params if p.grad is not None])))
    return {"arm": arm, "peak_alloc_bytes": peak, "after_forward_bytes": fwd_live, "param_grad_bytes": grad_bytes,
            "method": method, "fwd_bwd_ms": round(1000 * statistics.median(times), 1),
            "loss": loss, "grad_norm": gnorm, "params_m": round(tr.n_params / 1e6, 1), "batch_size": batch,
            "answer_tokens": int(n_tok), "seq_tokens": sum(int(mb["inputs"]["attention_mask"].sum()) for mb in mbs),
            "padded_seq_len": max(int(mb["inputs"]["input_ids"].shape[1]) for mb in mbs)}


def gc_memory(info: dict, args) -> dict:
    """(d): both arms, one after the other, each in a fresh process; ratios on + off."""
    student = info["mid"] or info["student"]
    arms = {}
    for arm in ("off", "on"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--gc-mem-arm", arm, "--gc-student", str(student),
               "--gc-run", str(info["run"]), "--gc-image-root", str(info["image_root"]), "--gc-batch",
               str(args.gc_batch), "--gc-steps", str(args.gc_steps), "--shuffle-buffer", str(args.shuffle_buffer)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"gradient checkpointing arm {arm} exited {p.returncode}:\n{p.stderr[-4000:]}")
        arms[arm] = json.loads(p.stdout.strip().splitlines()[-1])
    off, on = arms["off"], arms["on"]
    mib = lambda b: None if b is None else round(b / 2**20, 1)  # noqa: E731
    out = {"student": "mid" if info["mid"] else "tiny", "params_m": off["params_m"], "batch_size": off["batch_size"],
           "answer_tokens": off["answer_tokens"], "seq_tokens": off["seq_tokens"],
           "padded_seq_len": off["padded_seq_len"], "method": off["method"],
           "peak_mib_off": mib(off["peak_alloc_bytes"]), "peak_mib_on": mib(on["peak_alloc_bytes"]),
           "ratio": (round(on["peak_alloc_bytes"] / off["peak_alloc_bytes"], 3)
                     if on["peak_alloc_bytes"] and off["peak_alloc_bytes"] else None),
           # what the forward keeps for backward (activations), and the gradients' share of the peak
           "after_forward_mib_off": mib(off["after_forward_bytes"]), "after_forward_mib_on": mib(on["after_forward_bytes"]),
           "after_forward_ratio": (round(on["after_forward_bytes"] / off["after_forward_bytes"], 3)
                                   if on["after_forward_bytes"] and off["after_forward_bytes"] else None),
           "param_grad_mib": mib(off["param_grad_bytes"]),
           "fwd_bwd_ms_off": off["fwd_bwd_ms"], "fwd_bwd_ms_on": on["fwd_bwd_ms"],
           "time_ratio": round(on["fwd_bwd_ms"] / off["fwd_bwd_ms"], 3),
           "loss_rel_diff": abs(on["loss"] - off["loss"]) / max(1e-12, abs(off["loss"])),
           "grad_norm_rel_diff": abs(on["grad_norm"] - off["grad_norm"]) / max(1e-12, abs(off["grad_norm"]))}
    log(f"gradient checkpointing, {out['student']} student ({out['params_m']}M), batch {out['batch_size']}: peak "
        f"{out['peak_mib_off']} -> {out['peak_mib_on']} MiB (ratio {out['ratio']}), kept after forward "
        f"{out['after_forward_mib_off']} -> {out['after_forward_mib_on']} MiB, fwd+bwd {out['fwd_bwd_ms_off']} -> "
        f"{out['fwd_bwd_ms_on']} ms, loss rel diff {out['loss_rel_diff']:.1e}")
    return out


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also write the JSON result to this file")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed afterwards)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    ap.add_argument("--samples", type=int, default=128, help="synthetic conversations cached (default 128)")
    ap.add_argument("--answer-words", type=int, default=24, help="filler words appended to every answer (default 24)")
    ap.add_argument("--shuffle-buffer", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="tiny student: global batch = micro-batch (default 8)")
    ap.add_argument("--batches", type=int, default=3, help="tiny student: batches per round (default 3)")
    ap.add_argument("--rounds", type=int, default=5, help="tiny student: rounds incl. 1 warm-up (default 5)")
    ap.add_argument("--loader-epochs", type=int, default=3)
    ap.add_argument("--no-mid", action="store_true", help="skip the ≈100M-parameter student")
    ap.add_argument("--mid-layers", type=int, default=6, help="MIDSIZE with this many LM layers (default 6: ≈107M)")
    ap.add_argument("--mid-batch", type=int, default=4)
    ap.add_argument("--mid-batches", type=int, default=2)
    ap.add_argument("--mid-rounds", type=int, default=3)
    ap.add_argument("--no-mem", action="store_true", help="skip (c)")
    ap.add_argument("--kd-mem-n", type=int, default=4096)
    ap.add_argument("--kd-mem-h", type=int, default=1024)
    ap.add_argument("--kd-mem-v", type=int, default=32000)
    ap.add_argument("--kd-mem-chunks", default="512",
                    help="comma-separated chunk sizes of the fused and chunked arms, the first is the headline (default "
                         "512 = train_student.kd.chunk_size); each adds two ~1-2 min processes")
    ap.add_argument("--kd-mem-chunk", type=int, default=1024, help=argparse.SUPPRESS)  # internal: one arm of (c)
    ap.add_argument("--kd-mem-arm", choices=("naive", "chunked", "fused"), help=argparse.SUPPRESS)  # internal: one arm of (c)
    ap.add_argument("--no-gc", action="store_true", help="skip (d)")
    ap.add_argument("--gc-batch", type=int, default=16, help="(d): samples in the measured step (default 16)")
    ap.add_argument("--gc-steps", type=int, default=1, help="(d): timed forward + backward passes per arm (default 1)")
    for internal in ("--gc-mem-arm", "--gc-student", "--gc-run", "--gc-image-root"):  # internal: one arm of (d)
        ap.add_argument(internal, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.kd_mem_chunks = [int(c) for c in args.kd_mem_chunks.split(",") if c.strip()]

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kd_mem_arm:
        print(json.dumps(kd_mem_arm(args.kd_mem_arm, args.kd_mem_n, args.kd_mem_h, args.kd_mem_v, args.kd_mem_chunk)))
        return 0
    if args.gc_mem_arm:
        print(json.dumps(gc_mem_arm(args.gc_mem_arm, args.gc_student, args.gc_run, args.gc_image_root, args.gc_batch,
                                    args.shuffle_buffer, args.gc_steps)))
        return 0

    t_start = time.perf_counter()
    load0 = loadavg()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="llavadi-bench-train-student-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"benchmark": "train_student"}
    mem_procs = {}
    try:
        mem_procs = {} if args.no_mem else kd_memory_start(args)
        info = setup(work, args)
        mem = kd_memory_collect(args, mem_procs) if mem_procs else None  # done before anything is timed
        from llavadi.stages.train_student.data import student_tokens

        st = student_tokens(str(info["student"]))
        # (b) loader alone, before any model is in memory
        loaders = []
        for w in (0, 2):
            r = loader_rate(info["run"], st, info["image_root"], args.batch, w, args.loader_epochs, args.shuffle_buffer)
            loaders.append(r)
            log(f"loader num_workers={w}: {r['samples_per_s']} samples/s "
                f"({r['steady_samples_per_s']} after the first step)")
        # (a) tiny student, then the ≈100M one
        tiny = bench_student("tiny", info["student"], info, args, args.batch, args.batch, args.batches, args.rounds,
                             loss_only=True)
        mid = None
        if info["mid"] is not None:
            mid = bench_student(f"mid{args.mid_layers}L", info["mid"], info, args, args.mid_batch, args.mid_batch,
                                args.mid_batches, args.mid_rounds, loss_only=False)
        # (d) gradient checkpointing: peak memory with ÷ without, same batch
        gc = None if args.no_gc else gc_memory(info, args)
    finally:
        for p in mem_procs.values():
            if p.poll() is None:
                p.kill()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    trainer_sps = tiny["trainer_samples_per_s"]["full_kd_topk"]
    result.update({
        "kd_mem_headline_chunk_size": args.kd_mem_chunks[0] if mem else None,
        "kd_step_ratio_tiny_topk": tiny["ratio"]["full_kd_topk"],
        "kd_step_ratio_tiny_exact": tiny["ratio"]["full_kd_exact"],
    })
    if mid:
        result.update({"kd_step_ratio_mid_topk": mid["ratio"]["full_kd_topk"],
                       "kd_step_ratio_mid_exact": mid["ratio"]["full_kd_exact"]})
    for r in loaders:
        w = r["num_workers"]
        result[f"loader_over_trainer_w{w}"] = round(r["samples_per_s"] / trainer_sps, 2)
    if mem:
        result["kd_mem_ratio_fused_over_naive"] = mem["fused"][str(args.kd_mem_chunks[0])]["ratio"]
        result["kd_mem_ratio_chunked_over_naive"] = mem["chunked"][str(args.kd_mem_chunks[0])]["ratio"]
        for c in args.kd_mem_chunks[1:]:
            result[f"kd_mem_ratio_fused_chunk{c}"] = mem["fused"][str(c)]["ratio"]
            result[f"kd_mem_ratio_chunk{c}"] = mem["chunked"][str(c)]["ratio"]
    if gc:
        result["gc_mem_ratio"] = gc["ratio"]
        result["gc_after_forward_ratio"] = gc["after_forward_ratio"]
        result["gc_time_ratio"] = gc["time_ratio"]
    result["targets"] = {"kd_step_ratio": "<= 1.15", "loader_over_trainer": ">= 5", "kd_mem_ratio": "<= 0.25",
                         "gc_mem_ratio": "reported"}
    result.update({
        "data": {"samples": args.samples, "answer_words_appended": args.answer_words, "cache_top_k": 64,
                 "cache_hidden_dtype": "float16", "teacher": "tiny TEACHER (hidden 256, V 32064)"},
        "train_tiny": tiny, "train_mid": mid,
        "loader": loaders, "trainer_samples_per_s_tiny_full_kd": trainer_sps,
        "kd_memory": mem, "gc_memory": gc,
        "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "loadavg_start": load0, "loadavg_end": loadavg(),
        "setup_s": round(info["setup_s"], 1), "machine": machine_info(),
        "bench_wall_s": round(time.perf_counter() - t_start, 1),
    })
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
