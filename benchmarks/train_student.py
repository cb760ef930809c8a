"""Benchmark ``llavadi train-student`` against design §7, as ratios measured within one run.

The claims under test (design §7, issue #21):

(a) **KD step cost**: a training step with KD ≤ 1.05 × a CE-only step, for top-k and exact KD; with
    all-token KD + all-token features ≤ 1.10. Arms (``ARMS``: ``train_student`` settings on top of the
    defaults, each turned into the trainer's own terms by ``terms.build_terms``):
    ``ce_only`` (``kd_weight=0 feature_weight=0``: CE at the answer rows); ``full_kd_topk`` (the default
    recipe: CE + top-k KD + feature loss, all at the answer rows); ``full_kd_exact`` (``kd.source=exact``:
    full-vocabulary KD from the cached hidden + teacher head); ``all_kd_topk`` / ``all_kd_exact``
    (``kd.positions=all feature.positions=all``: KD and FEAT at every row — image, prompt and answer —
    CE still at the answer rows). And the parts of the all-token arms, to say where their extra time
    goes (``--no-parts`` skips them): ``all_kd_topk_nofeat`` / ``all_kd_exact_nofeat`` (CE + all-token KD,
    no feature term) and ``all_feat_nokd`` (CE + all-token FEAT, no KD). Ratio = arm step ÷ ``ce_only``
    step on the same batch. For the tiny student (``STUDENT``, 8.7M) and a ≈107M-parameter student
    (``MIDSIZE`` with fewer layers, ``--mid-layers``); the cache's teacher is the tiny ``TEACHER`` (same
    32064-token vocabulary). The headline all-token target is on the ≈107M student.
(b) **Loader vs trainer**: samples/s of ``StepDataset`` iterated alone (collate with the recipe's
    ``CollatePlan`` included, a new dataset + ``DataLoader`` per epoch as ``loop.train`` does,
    ``num_workers`` 0 and 2) ÷ samples/s of the tiny student's ``full_kd_topk`` step; target ≥ 5. The
    same for the all-token recipe (``all_kd_topk``'s plan on the ``positions=all`` cache ÷ its step;
    ``num_workers`` 0), reported.
(c) **KD loss peak memory**: exact KD ≤ 0.25 × the naive full-logits loss, all-token too.
    *Synthetic* (today's figure): N ``--kd-mem-n`` rows, hidden H both sides, vocabulary V, float32;
    ``losses.fused_head_loss`` (KD only, blocks of ``chunk`` rows, gradients taken in forward; the
    headline) and ``losses.chunked_exact_kd_loss`` (checkpointed chunks) ÷ naive (student logits
    ``h @ W_s.T`` [N,V] with grad + teacher logits [N,V] + ``losses.dense_kd_loss``, forward + backward),
    at each of ``--kd-mem-chunks``. *All-token* (issue #21): one real micro-batch of ``--kd-all-batch``
    samples collated from the ``positions=all`` cache with the plan of CE + exact KD at every row
    (``N`` = all its rows: thousands), the ≈107M student's LM head (the tiny one's with ``--no-mid``) and
    the cached teacher head; ``fused_all`` = the loop's own head path, ``Objective._head`` (row selection,
    per-row weights from ``late.gate``'s counts, CE on the answer rows and KD on all rows in one
    ``fused_head_loss`` pass, the loop's block size for the device: ``objective.block_rows``) ÷
    ``naive_all`` = the same rows, weights and loss through full logits (``[N, V]`` student logits with
    grad, ``[N, V]`` teacher logits, ``F.cross_entropy`` + ``losses.dense_kd_loss`` per row, weighted sum),
    forward + backward; the student's final hidden states at every position are a random ``[B·L, Hs]``
    leaf with grad (the body's activations are not the loss's memory). The two losses must agree
    (``loss_rel_diff``).
(d) **Gradient checkpointing peak memory** (``train_student.gradient_checkpointing``): the peak of one
    training step's forward + backward with checkpointing ÷ the same step without it, on the ≈107M
    student (the tiny one with ``--no-mid``), same batch, same weights, default recipe; and the bytes the
    forward keeps for backward (the activations), with ÷ without. Reported (activations are what it saves:
    the larger the batch × sequence against the parameter count, the lower the peak ratio).
(e) **Peak memory flat as the cache grows**: peak RSS of ``llavadi train-student RUN --executor local``
    (tiny student, all-token KD + features on a ``positions=all`` cache, one epoch) on 10× the cached
    samples ÷ on 1×; target ≤ 1.1.

How it is measured
------------------
Setup (not timed): synthetic VQA data (``stages/demo/synthetic_vqa``) whose answers get
``--answer-words`` seeded filler words appended (so there are tens of answer tokens per sample —
KD's cost grows with answer tokens × V, and the synthetic 1–2-word answers would hide it), ingested
twice with ``llavadi ingest`` and cached twice with ``llavadi cache-teacher`` (``source=data``, default
top-k 64, float16 hidden): ``positions=answer`` (the default; (b), (d)) and ``positions=all`` (rows at
every position; (a), the all-token loader of (b) and (c)), via the CLI, as ``tests/test_train_student.py``
does. The answer rows of the two caches hold the same values, and (a) times collated batches, so the
answer-row arms read the ``positions=all`` cache too: every arm of (a) runs on the same samples.

(a) calls the trainer's own pieces, not ``loop.train``: the student is set up by ``setup.build`` (float32
weights, frozen groups, the feature projector seeded, the teacher head, AdamW + the schedule) with the
terms of the arm that needs the most (exact KD + feature); every arm's step is ``step.run_step`` with that
arm's terms (``late.gate``'s counts, each micro-batch's forward through ``objective.Objective`` — every
term — and ``backward``, clipping, the finiteness check, optimizer and scheduler step, ``zero_grad``), the
objective's ``terms`` set to the arm's. Left out: metrics.jsonl / TensorBoard writes and checkpoints (I/O,
not compute). Each arm's micro-batches are collated once before timing, by ``StepDataset`` with that arm's
``CollatePlan`` (``terms.row_sets``), the same samples for every arm (checked), and moved to the device,
so loading is not in the step time. The arms share one student, projector and optimizer (the weights
move a little between arms; that does not change the cost of a step). They are interleaved per batch: in
each round, for each batch, every arm runs that batch (order rotated), so the arms' steps on one batch are
adjacent in time; round 0 is warm-up and dropped. The ratio of an arm is the median over (round, batch)
pairs of its wall time ÷ the CE-only wall time on the same batch in the same round (paired, so drift in
the machine's load cancels); ``step_ms`` is the median step time. The same from process CPU time is
reported beside it (``cpu_ratio``: less sensitive to other processes taking the cores).

(b) times whole epochs of ``StepDataset`` through a ``DataLoader(batch_size=None)``, each epoch a
fresh dataset (new shuffle seed) as the loop does. ``samples_per_s`` counts from the start of
the epoch (worker start-up and shard reads included); ``steady_samples_per_s`` from the first
step received. The trainer rate is the tiny student's step from (a): global batch ÷ step
time. The headline ratio uses the loader's whole-epoch rate.

(c) runs each arm in a fresh subprocess (teacher side without grad, student hidden and head weight with
grad; inputs — and for the all-token arms the student, the batch and the teacher head — allocated
before measuring). The synthetic arms run while the untimed setup runs, the all-token ones right after
it (they need its cache); all are finished before anything is timed. Peak = the highest sum of live
bytes allocated *during* forward + backward, from the allocator events of ``torch.profiler``
(``profile_memory=True``: every CPU allocation and free, with its size and time; exact bytes, like
tracemalloc for tensors). The head weight's gradient ``[V, Hs]`` is allocated inside the measured region
in every arm and counted. Cross-check: the process's ``ru_maxrss`` high-water mark minus its RSS
just before the loss (page-granular; glibc serves these large buffers with mmap and returns
them on free; it also counts memory that is not tensors — BLAS packing buffers, the profiler's
own — so its ratio is higher). The allocator events come from the profiler's result object
(``prof.profiler.kineto_results``, not a documented API); where that is missing the RSS figures
are the only ones (``method`` says which). Always on the CPU.

(d) runs each arm (``off``, ``on``) in a fresh subprocess after the setup, one after the other: the
student set up by ``setup.build`` with the default recipe (``on``: ``gradient_checkpointing=true``, which
``build`` applies as the loop does), one batch of ``--gc-batch`` samples from ``StepDataset`` (the same in
both arms), one untimed warm-up step, ``--gc-steps`` timed forward + backward passes of the objective
(median: ``fwd_bwd_ms``; the ratio of the arms' medians is the recompute cost), then one measured
forward + backward, forward and backward profiled apart: the bytes still allocated after the
forward (what it keeps for backward) and the step's peak = max(forward's peak, those + the
backward's peak), from the profiler's allocator events as in (c) (on CUDA:
``torch.cuda.memory_allocated`` / ``max_memory_allocated`` minus the bytes allocated before). The
parameter gradients are allocated inside the measured region in both arms and counted (the
weights and the batch are not). Each arm reports its loss and gradient norm:
they must agree (checkpointing recomputes the same ops; ``loss_rel_diff``, ``grad_norm_rel_diff``).

(e) after everything else: ``--rss-samples`` synthetic conversations (``benchmarks/cache_teacher.make_run``:
short answers, image and text-only rows) and 10× as many, ingested in shards of ``--rss-shard-size``
rows, cached by the tiny teacher with ``positions=all``, then ``python -m llavadi.cli train-student RUN
--student TINY --executor local`` with ``epochs=1`` (so the 10× run streams its whole cache once, 10× the
steps), ``kd.positions=all feature.positions=all``, batch ``--rss-batch``, ``shuffle_buffer``
``--rss-shuffle-buffer`` (below the 1× sample count: the buffer is memory bounded by design, what is
tested is that nothing else grows with the cache), ``num_workers=0``, checkpoints only at the end.
Peak RSS of each child = its own ``VmHWM`` at exit (``_common.run_cli_peak``; not ``os.wait4``'s
``ru_maxrss``, which carries this process's high-water mark across fork + execve), the process tree's
RSS polled beside it. ``rss_ratio_10x`` = 10× ÷ 1×, and the growth in MB.

Timings use torch's default thread count unless ``--threads`` is given, with
``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it (spinning OpenMP threads make steps
~10x slower when other processes share the cores); the load average is recorded (other processes
distort absolute times more than the interleaved ratios). On a CUDA machine (a), (b) and (d) run on the
GPU as the loop would (bf16 autocast); (c) stays on the CPU.

Prints ONE JSON object on stdout's last line (``--out FILE`` also writes it).

Usage: ``.venv/bin/python benchmarks/train_student.py [--out FILE] [--no-mid] [--no-parts] [--no-mem]
[--no-gc] [--no-rss] [--threads N] ...``
"""
from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
from _common import emit, machine_info, run_cli_peak  # noqa: E402

import os

# Before torch loads: OpenMP threads that spin while waiting collapse (10x slower steps) when other
# processes share the cores; passive waiting keeps the arms' timings comparable. Recorded in the JSON.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import functools
import json
import re
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

# (a)'s arms: train_student settings over the defaults (dotted keys under train_student)
ALL = {"kd.positions": "all", "feature.positions": "all"}
ARMS = {
    "ce_only": {"kd_weight": 0.0, "feature_weight": 0.0},
    "full_kd_topk": {},
    "full_kd_exact": {"kd.source": "exact"},
    "all_kd_topk": ALL,
    "all_kd_exact": {**ALL, "kd.source": "exact"},
    # the parts of the all-token arms
    "all_kd_topk_nofeat": {"kd.positions": "all", "feature_weight": 0.0},
    "all_kd_exact_nofeat": {"kd.positions": "all", "kd.source": "exact", "feature_weight": 0.0},
    "all_feat_nokd": {"feature.positions": "all", "kd_weight": 0.0},
}
# The CE-only step as transformers computes it (``student(**inputs, labels=labels).loss``: logits at every
# position, ``[B, L, V]``, then CE over the labelled ones), which is what LLaVA's train.py and the study's code
# pay per step; llavadi's ``ce_only`` runs the head at the answer rows only. Not a recipe of ours: a baseline.
HF_CE = "ce_hf_full_logits"
ARMS[HF_CE] = {"kd_weight": 0.0, "feature_weight": 0.0}
MAIN_ARMS = ("ce_only", HF_CE, "full_kd_topk", "full_kd_exact", "all_kd_topk", "all_kd_exact")
TARGETS = {"kd_step_ratio": "<= 1.05", "all_token_step_ratio": "<= 1.10", "loader_over_trainer": ">= 5",
           "kd_mem_ratio": "<= 0.25", "rss_ratio_10x": "<= 1.1", "gc_mem_ratio": "reported"}
SCHEDULE_STEPS = 10_000  # the schedule's length for (a) and (d) (a few steps of warm-up: the lr does not change the cost)


# --------------------------------------------------------------------------- machine

def loadavg() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def log(msg: str) -> None:
    print(f"[bench train-student] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- setup

def _env() -> dict:
    env = dict(os.environ)
    env.pop("LLAVADI_PROGRESS", None)  # no progress bar
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def cli(*args) -> str:
    p = subprocess.run([sys.executable, "-m", "llavadi.cli", *map(str, args)], capture_output=True, text=True,
                       env=_env())
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
    teacher = build_tiny_llava(work / "teacher", TEACHER)
    student = build_tiny_llava(work / "student", STUDENT)
    mid = build_tiny_llava(work / "mid", mid_spec(args.mid_layers)) if not args.no_mid else None
    runs = {}
    for positions in ("answer", "all"):
        run = runs[positions] = work / f"run-{positions}"
        cli("ingest", run, "--input", js, "--image-root", work, "--shard-size", max(1, args.samples // 4),
            "--executor", "local")
        out = cli("cache-teacher", run, "--teacher", teacher, "--executor", "local", "cache_teacher.source=data",
                  f"cache_teacher.positions={positions}")
        log(f"cache positions={positions}: {out.strip().splitlines()[-1] if out.strip() else ''}")
    log(f"setup {time.perf_counter() - t0:.1f} s")
    return {"run": runs["answer"], "run_all": runs["all"], "image_root": work, "teacher": teacher,
            "student": student, "mid": mid, "setup_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------- the trainer's pieces

def arm_config(base, arm: str):
    """``base`` (a ``LlavadiConfig``) with arm ``arm``'s ``train_student`` settings."""
    cfg = copy.deepcopy(base)
    for key, value in ARMS[arm].items():
        *path, last = key.split(".")
        setattr(functools.reduce(getattr, path, cfg.train_student), last, value)
    return cfg


def base_config(student: Path, batch: int, micro: int):
    from llavadi.pipeline.config import LlavadiConfig

    cfg = LlavadiConfig()
    c = cfg.train_student
    c.student, c.batch_size, c.micro_batch_size = str(student), batch, micro
    return cfg


def arm_terms(cfg, run: Path) -> list:
    """The trainer's terms for ``cfg`` on ``run``'s cache (``terms.build_terms``)."""
    from llavadi.schemas.teacher_cache import CacheReader
    from llavadi.stages.train_student.terms import build_terms

    return build_terms(cfg.train_student, CacheReader(Path(run) / "cache_teacher", verify=False).meta)


def collate_plan(terms: list):
    """What ``loop.train`` collates for ``terms``: every row set the terms read, the affinity blocks."""
    from llavadi.stages.train_student.batch import CollatePlan
    from llavadi.stages.train_student.terms import row_sets

    return CollatePlan(tuple(row_sets(terms).items()), affinity=any(t.name == "aff" for t in terms))


def collect_batches(run: Path, student: Path, image_root: Path, plan, batch: int, micro: int, n: int,
                    shuffle_buffer: int) -> list:
    """The first ``n`` steps' micro-batches of epoch 0 (seed 0), collated with ``plan``."""
    from llavadi.stages.train_student.data import StepDataset, student_tokens

    ds = StepDataset(run, student_tokens(str(student)), str(image_root), batch_size=batch, micro_batch_size=micro,
                     rank=0, world=1, seed=0, epoch=0, shuffle_buffer=shuffle_buffer, max_steps=n, plan=plan)
    return [item["micro_batches"] for item in ds]


class Trainer:
    """The student as ``loop.train`` sets it up (``setup.build``) and one step of an arm (``step.run_step``).

    ``cfgs``: arm → config. ``build`` gets the terms of the arm that needs the most (the teacher head for
    exact KD, then the most terms: the feature projector); every arm's feature term is the single
    ``feat`` pair, so the arms share that projector. ``step(arm, mbs)`` sets the objective's terms to the
    arm's and runs ``run_step`` (one process)."""

    def __init__(self, student_dir: Path, run: Path, cfgs: dict):
        import torch

        from llavadi.stages.train_student.data import load_adapter
        from llavadi.stages.train_student.objective import projector_key
        from llavadi.stages.train_student.setup import build

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.terms = {a: arm_terms(cfg, run) for a, cfg in cfgs.items()}
        self.plans = {a: collate_plan(t) for a, t in self.terms.items()}
        widest = max(cfgs, key=lambda a: (any(t.params.get("source") == "exact" for t in self.terms[a]),
                                          len(self.terms[a])))
        self.cfg = cfgs[widest]
        self.b = build(Path(run), self.cfg, load_adapter(str(student_dir)), self.terms[widest], None, SCHEDULE_STEPS,
                       "benchmark", 0, 1, self.device)
        self.model = self.b.model
        need = {projector_key(t) for ts in self.terms.values() for t in ts if t.name.startswith("feat")}
        assert need <= set(self.model.projector), f"arms need projectors {need}, built {set(self.model.projector)}"
        self.student = self.model.student
        self.n_params = sum(p.numel() for p in self.student.parameters())
        self.state = dict(self.b.state)
        self.model.train()

    def batches(self, arm: str, run: Path, student: Path, image_root: Path, batch: int, micro: int, n: int,
                shuffle_buffer: int) -> list:
        from llavadi.stages.train_student.batch import to_device

        return [[to_device(mb, self.device) for mb in mbs]
                for mbs in collect_batches(run, student, image_root, self.plans[arm], batch, micro, n, shuffle_buffer)]

    def use(self, arm: str) -> list:
        self.model.terms = self.terms[arm]
        return self.terms[arm]

    def step(self, arm: str, mbs: list) -> dict:
        from llavadi.stages.train_student.step import run_step

        if arm == HF_CE:
            return self.hf_ce_step(mbs)
        terms = self.use(arm)
        b = self.b
        return run_step(self.model, mbs, terms, b.opt, b.sched, b.params, self.cfg.train_student, self.state, 1,
                        self.device)

    def hf_ce_step(self, mbs: list) -> dict:
        """``HF_CE``: the same answer rows and targets as ``ce_only``, through the student's own ``labels=`` loss
        (logits at every position, float32 cross-entropy with ``ignore_index=-100``), then the same update."""
        import torch

        from llavadi.schemas.teacher_cache.fields import KIND_ANSWER
        from llavadi.stages.train_student.step import apply_update

        sets = [next(iter(mb["sets"].values())) for mb in mbs]
        answer = [s["kind"] == KIND_ANSWER for s in sets]
        n_total = sum(int(a.sum()) for a in answer)
        total = 0.0
        for mb, s, a in zip(mbs, sets, answer):
            ids = mb["inputs"]["input_ids"]
            labels = torch.full_like(ids, -100)
            # row r (flat b·L + t) predicts the token at t + 1: transformers shifts labels by one inside the loss
            labels.view(-1)[s["rows"][a] + 1] = s["token_ids"][a].to(labels.dtype)
            with self.model.autocast():
                loss = self.student(**mb["inputs"], labels=labels).loss  # mean over this micro-batch's labels
            (loss * (int(a.sum()) / max(n_total, 1))).backward()
            total += float(loss.detach())
        return apply_update(self.b.opt, self.b.sched, self.b.params, self.cfg.train_student, self.state,
                            {"ce": total}, True, [], 1)

    def sync(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()


# --------------------------------------------------------------------------- (b) loader

def loader_rate(run: Path, student: Path, image_root: Path, plan, batch: int, workers: int, epochs: int,
                shuffle_buffer: int, memo_mb: int = 0) -> dict:
    import torch

    from llavadi.stages.train_student.data import StepDataset, student_tokens
    from llavadi.stages.train_student.memo import MEMO

    st = student_tokens(str(student))
    MEMO.configure(memo_mb << 20)  # train() sizes it so for a run of more than one epoch (memo.py); 0 = off
    n = 0
    total = steady = 0.0
    n_steady = 0
    for e in range(epochs):
        t0 = time.perf_counter()
        ds = StepDataset(run, st, str(image_root), batch_size=batch, micro_batch_size=batch, rank=0, world=1, seed=0,
                         epoch=e, shuffle_buffer=shuffle_buffer, plan=plan)
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
    MEMO.configure(0)
    return {"num_workers": workers, "epochs": epochs, "samples": n, "wall_s": round(total, 3), "memo_mb": memo_mb,
            "samples_per_s": round(n / total, 1),
            "steady_samples_per_s": round(n_steady / steady, 1) if steady else None}


# --------------------------------------------------------------------------- (a) trainer

def time_arms(step, arms: list, n_batches: int, rounds: int, sync) -> list:
    """Interleaved per batch: for every round and batch, each arm runs that batch (order rotated
    by round and batch), so arms on the same batch are adjacent in time. Round 0 is warm-up.
    Returns ``[(round, batch, arm, wall s, process CPU s)]``."""
    rows = []
    for r in range(rounds):
        for i in range(n_batches):
            k = (r + i) % len(arms)
            for a in arms[k:] + arms[:k]:
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                step(a, i)
                sync()
                rows.append((r, i, a, time.perf_counter() - t0, time.process_time() - c0))
    return rows


def summarise(rows: list) -> dict:
    """Per arm: median step time over the measured rounds; ratio = median over (round, batch) of
    arm time ÷ CE-only time on the same batch in the same round (paired: drift cancels); ``ratio_vs_hf_ce``
    the same ÷ ``HF_CE`` (the CE step with logits at every position)."""
    meas = [x for x in rows if x[0] > 0] or rows
    arms = sorted({x[2] for x in meas}, key=list(ARMS).index)
    t = {(x[0], x[1], x[2]): (x[3], x[4]) for x in meas}
    pairs = sorted({(x[0], x[1]) for x in meas})
    out = {"step_ms": {}, "cpu_ms": {}, "ratio": {}, "cpu_ratio": {}, "ratio_vs_hf_ce": {}, "pairs": len(pairs)}
    for a in arms:
        out["step_ms"][a] = round(1000 * statistics.median(t[k + (a,)][0] for k in pairs), 1)
        out["cpu_ms"][a] = round(1000 * statistics.median(t[k + (a,)][1] for k in pairs), 1)
        if a != "ce_only":
            out["ratio"][a] = round(statistics.median(t[k + (a,)][0] / t[k + ("ce_only",)][0] for k in pairs), 3)
            out["cpu_ratio"][a] = round(statistics.median(t[k + (a,)][1] / t[k + ("ce_only",)][1] for k in pairs), 3)
        if a not in (HF_CE, "ce_only") and HF_CE in arms:
            out["ratio_vs_hf_ce"][a] = round(statistics.median(t[k + (a,)][0] / t[k + (HF_CE,)][0] for k in pairs), 3)
    return out


def bench_student(name: str, student_dir: Path, info: dict, args, batch: int, micro: int, n_batches: int,
                  rounds: int) -> dict:
    """(a) for one student: every arm on the same ``n_batches`` batches of the ``positions=all`` cache."""
    t0 = time.perf_counter()
    arms = [a for a in ARMS if a in MAIN_ARMS or not args.no_parts]
    base = base_config(student_dir, batch, micro)
    tr = Trainer(student_dir, info["run_all"], {a: arm_config(base, a) for a in arms})
    by_plan: dict = {}  # arms with the same plan train on the same collated batches
    for a in arms:
        if tr.plans[a] not in by_plan:
            by_plan[tr.plans[a]] = tr.batches(a, info["run_all"], student_dir, info["image_root"], batch, micro,
                                              n_batches, args.shuffle_buffer)
    batches = {a: by_plan[tr.plans[a]] for a in arms}
    ids = {a: [[i for mb in mbs for i in mb["sample_ids"]] for mbs in bs] for a, bs in batches.items()}
    assert all(v == ids["ce_only"] for v in ids.values()), "the arms' batches hold different samples"
    n_batches = len(batches["ce_only"])

    def rows(arm: str) -> list:  # per step: the rows of the arm's (one) row set
        return [sum(int(next(iter(mb["sets"].values()))["rows"].numel()) for mb in mbs) for mbs in batches[arm]]

    toks, all_rows = rows("ce_only"), rows("all_kd_topk")
    seq = [sum(int(mb["inputs"]["attention_mask"].sum()) for mb in mbs) for mbs in batches["ce_only"]]
    res = summarise(time_arms(lambda a, i: tr.step(a, batches[a][i]), arms, n_batches, rounds, tr.sync))
    out = {"student": name, "params_m": round(tr.n_params / 1e6, 1), "batch_size": batch, "micro_batch_size": micro,
           "batches": n_batches, "rounds": rounds, "warmup_rounds": 1,
           "answer_tokens_per_step": round(sum(toks) / len(toks), 1),
           "all_rows_per_step": round(sum(all_rows) / len(all_rows), 1),
           "seq_tokens_per_step": round(sum(seq) / len(seq), 1), **res}
    out["trainer_samples_per_s"] = {a: round(batch / (ms / 1000), 2) for a, ms in res["step_ms"].items()}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    log(f"{name}: {out['params_m']}M params, {out['answer_tokens_per_step']} answer tokens and "
        f"{out['all_rows_per_step']} rows/step, step ms {out['step_ms']}, ratios {out['ratio']} "
        f"(CPU-time ratios {out['cpu_ratio']})")
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


def measure_loss(arm: str, fn) -> dict:
    """Run ``fn`` (a loss forward + backward returning the loss value) under the profiler: its peak of
    allocated bytes (``alloc_peak``), the RSS high-water-mark delta, wall time and the loss."""
    from torch.profiler import ProfilerActivity, profile

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


def kd_mem_arm(arm: str, n: int, h: int, v: int, chunk: int) -> dict:
    """One synthetic arm of (c), in this (fresh) process. Returns bytes."""
    import torch

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

    return measure_loss(arm, {"naive": naive, "chunked": chunked, "fused": fused}[arm])


def kd_all_mem_arm(arm: str, student: str, run: str, image_root: str, batch: int, shuffle_buffer: int) -> dict:
    """One all-token arm of (c) (``fused_all`` / ``naive_all``), in this (fresh) process: CE at the answer
    rows + exact KD at every row of one real micro-batch. Returns bytes and the batch's sizes."""
    import contextlib

    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from llavadi.schemas.teacher_cache import CacheReader
    from llavadi.schemas.teacher_cache.fields import KIND_ANSWER
    from llavadi.stages.train_student import late, losses
    from llavadi.stages.train_student.batch import row_key
    from llavadi.stages.train_student.objective import Objective, block_rows, row_weights

    run = Path(run)
    cfg = arm_config(base_config(Path(student), batch, batch), "all_kd_exact_nofeat")
    terms = arm_terms(cfg, run)
    mb = collect_batches(run, Path(student), Path(image_root), collate_plan(terms), batch, batch, 1, shuffle_buffer)[0][0]
    norms = late.gate([mb], terms, 1, "cpu").norms  # the step's row counts: the row weights' normalisers
    model = AutoModelForImageTextToText.from_pretrained(student, dtype=torch.float32)
    head_t = load_file(run / "cache_teacher" / "teacher_head.safetensors")
    obj = Objective(model, terms, {}, head_t, contextlib.nullcontext, cfg.train_student.reduction)
    head = model.get_output_embeddings()
    kd, ce = next(t for t in terms if t.name == "kd"), next(t for t in terms if t.name == "ce")
    s = mb["sets"][row_key(kd.kinds)]
    B, L = mb["inputs"]["input_ids"].shape
    torch.manual_seed(0)
    # the body's final hidden states at every position (a leaf with grad: the loss's memory, not the body's)
    h_all = torch.randn(B * L, head.weight.shape[1]).mul_(0.5).requires_grad_(True)

    def fused_all():  # the loop's head path: CE + KD in one fused pass over KD's rows
        loss = obj._head([ce, kd], h_all, mb, norms)[0]
        loss.backward()
        return loss.item()

    def naive_all():  # the same rows, weights and loss through full [N, V] logits
        zs = F.linear(h_all[s["rows"]], head.weight, head.bias)
        with torch.no_grad():
            zt = F.linear(s["hidden"], head_t["weight"], head_t.get("bias"))
        w_ce = row_weights(s["sample"], s["kind"] == KIND_ANSWER, *norms["ce"], obj.reduction).float()
        w_kd = row_weights(s["sample"], torch.ones_like(s["sample"], dtype=torch.bool), *norms["kd"],
                           obj.reduction).float()
        p = kd.params
        kd_rows = losses.dense_kd_loss(zs, zt, kind=p["kind"], beta=p["beta"], temperature=p["temperature"],
                                       standardize=p["standardize"], reduction="none")
        loss = (ce.weight * (F.cross_entropy(zs, s["token_ids"], reduction="none") * w_ce).sum()
                + kd.weight * (kd_rows * w_kd).sum())
        loss.backward()
        return loss.item()

    out = measure_loss(arm, {"fused_all": fused_all, "naive_all": naive_all}[arm])
    v, hs = head.weight.shape
    out.update(N=int(s["rows"].numel()), answer_rows=int((s["kind"] == KIND_ANSWER).sum()), samples=int(B),
               V=int(v), Hs=int(hs), Ht=int(CacheReader(run / "cache_teacher", verify=False).spec.hidden_size),
               block_rows=block_rows(int(v), kd.params["chunk_size"], torch.device("cpu")))
    return out


def _arm_cmd(*args) -> list[str]:
    """This script run as one internal arm (its own process: the arm's memory is the process's)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *map(str, args)]
    return cmd


def _finish(procs: dict) -> dict:
    """Wait for the arm processes; their JSON results by name."""
    arms = {}
    for name, p in procs.items():
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"memory arm {name} exited {p.returncode}:\n{err[-4000:]}")
        arms[name] = json.loads(out.strip().splitlines()[-1])
    return arms


def _start(cmd: list, args) -> subprocess.Popen:
    if args.threads:
        cmd = cmd + ["--threads", str(args.threads)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _mib(b):
    return None if b is None else round(b / 2**20, 1)


def kd_memory_start(args) -> dict:
    """Start every synthetic arm of (c), each in its own fresh process (run during the untimed setup: the
    measured bytes are per process, their times are not used)."""
    procs = {}
    arms = [("naive", args.kd_mem_chunks[0])] + [(a, c) for c in args.kd_mem_chunks for a in ("fused", "chunked")]
    for arm, chunk in arms:
        procs[arm if arm == "naive" else f"{arm}_{chunk}"] = _start(_arm_cmd(
            "--kd-mem-arm", arm, "--kd-mem-n", args.kd_mem_n, "--kd-mem-h", args.kd_mem_h, "--kd-mem-v", args.kd_mem_v,
            "--kd-mem-chunk", chunk), args)
    return procs


def kd_memory_collect(args, procs: dict) -> dict:
    arms = _finish(procs)
    n, h, v = args.kd_mem_n, args.kd_mem_h, args.kd_mem_v
    nv = n * v * 4
    a = arms["naive"]
    alloc = all(x["peak_alloc_bytes"] for x in arms.values())
    key = "peak_alloc_bytes" if alloc else "rss_peak_delta_bytes"
    out = {"N": n, "H": h, "V": v, "dtype": "float32", "one_NxV_fp32_mib": _mib(nv),
           "method": "torch.profiler allocator events" if alloc else "ru_maxrss delta (profiler events unavailable)",
           "naive_peak_mib": _mib(a[key]), "naive_peak_in_NxV": round(a[key] / nv, 2) if a[key] else None,
           "rss_naive_peak_delta_mib": _mib(a["rss_peak_delta_bytes"]), "fused": {}, "chunked": {},
           "wall_s": {"naive": a["wall_s"]}}
    for name, b in arms.items():
        if name == "naive":
            continue
        arm, chunk = name.split("_")[0], int(name.split("_")[1])
        rss = (round(b["rss_peak_delta_bytes"] / a["rss_peak_delta_bytes"], 3)
               if a["rss_peak_delta_bytes"] and b["rss_peak_delta_bytes"] else None)
        r = {"chunk_size": chunk, "peak_mib": _mib(b[key]), "peak_in_NxV": round(b[key] / nv, 2) if b[key] else None,
             "ratio": round(b[key] / a[key], 3) if a[key] and b[key] else None,
             "rss_peak_delta_mib": _mib(b["rss_peak_delta_bytes"]), "rss_ratio": rss,
             "loss_rel_diff_vs_naive": abs(a["loss"] - b["loss"]) / max(1e-12, abs(a["loss"]))}
        out[arm][str(chunk)] = r
        out["wall_s"][name] = b["wall_s"]
        log(f"KD memory N={n} H={h} V={v}: naive {out['naive_peak_mib']} MiB, {arm} {chunk}: {r['peak_mib']} MiB, "
            f"ratio {r['ratio']} (RSS ratio {rss})")
    return out


def kd_all_memory(info: dict, args) -> dict:
    """(c), all-token: ``fused_all`` ÷ ``naive_all`` on one micro-batch of the ``positions=all`` cache."""
    student = info["mid"] or info["student"]
    procs = {arm: _start(_arm_cmd("--kd-all-arm", arm, "--kd-all-student", student, "--kd-all-run", info["run_all"],
                                  "--kd-all-image-root", info["image_root"], "--kd-all-batch", args.kd_all_batch,
                                  "--shuffle-buffer", args.shuffle_buffer), args)
             for arm in ("naive_all", "fused_all")}
    arms = _finish(procs)
    a, b = arms["naive_all"], arms["fused_all"]
    alloc = bool(a["peak_alloc_bytes"] and b["peak_alloc_bytes"])
    key = "peak_alloc_bytes" if alloc else "rss_peak_delta_bytes"
    nv = a["N"] * a["V"] * 4
    out = {k: a[k] for k in ("N", "answer_rows", "samples", "V", "Hs", "Ht")}
    out.update({"student": "mid" if info["mid"] else "tiny", "dtype": "float32", "block_rows": b["block_rows"],
                "terms": "ce (answer rows) + kd exact fkl (every row)", "one_NxV_fp32_mib": _mib(nv),
                "method": "torch.profiler allocator events" if alloc else "ru_maxrss delta (profiler events unavailable)",
                "naive_peak_mib": _mib(a[key]), "fused_peak_mib": _mib(b[key]),
                "naive_peak_in_NxV": round(a[key] / nv, 2) if a[key] else None,
                "fused_peak_in_NxV": round(b[key] / nv, 3) if b[key] else None,
                "ratio": round(b[key] / a[key], 3) if a[key] and b[key] else None,
                "rss_ratio": (round(b["rss_peak_delta_bytes"] / a["rss_peak_delta_bytes"], 3)
                              if a["rss_peak_delta_bytes"] and b["rss_peak_delta_bytes"] else None),
                "loss_rel_diff": abs(a["loss"] - b["loss"]) / max(1e-12, abs(a["loss"])),
                "wall_s": {"naive_all": a["wall_s"], "fused_all": b["wall_s"]}})
    log(f"all-token KD memory, {out['student']} student, N={out['N']} rows ({out['answer_rows']} answer) V={out['V']}: "
        f"naive {out['naive_peak_mib']} MiB, fused {out['fused_peak_mib']} MiB (blocks of {out['block_rows']} rows), "
        f"ratio {out['ratio']}, loss rel diff {out['loss_rel_diff']:.1e}")
    return out


# --------------------------------------------------------------------------- (d) gradient checkpointing

def gc_mem_arm(arm: str, student: str, run: str, image_root: str, batch: int, shuffle_buffer: int, steps: int) -> dict:
    """One arm of (d) (``off`` / ``on``), in this (fresh) process. Returns bytes and ms."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from llavadi.stages.train_student import late

    cfg = base_config(Path(student), batch, batch)
    cfg.train_student.gradient_checkpointing = arm == "on"  # setup.build applies it, as in the loop
    tr = Trainer(Path(student), Path(run), {"full_kd_topk": cfg})
    mbs = tr.batches("full_kd_topk", Path(run), Path(student), Path(image_root), batch, batch, 1, shuffle_buffer)[0]
    assert len(mbs) == 1, "(d) measures one micro-batch"
    g = late.gate(mbs, tr.use("full_kd_topk"), 1, tr.device)
    mb = dict(mbs[0], norms=g.norms)

    def fwd_bwd() -> float:
        loss, _ = tr.model(mb)
        loss.backward()
        return float(loss)

    fwd_bwd()  # warm-up: lazy initialisation, allocator
    tr.b.opt.zero_grad(set_to_none=True)
    times = []
    for _ in range(steps):
        tr.sync()
        t0 = time.perf_counter()
        fwd_bwd()
        tr.sync()
        times.append(time.perf_counter() - t0)
        tr.b.opt.zero_grad(set_to_none=True)
    # the measured pass, forward and backward apart: bytes still live after forward are what the
    # forward keeps for backward (the activations checkpointing drops); the step's peak is the higher
    # of the forward's peak and that plus the backward's own peak
    if tr.device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss, _ = tr.model(mb)
        torch.cuda.synchronize()
        fwd_peak, fwd_live = torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        torch.cuda.synchronize()
        bwd_peak = torch.cuda.max_memory_allocated() - base - fwd_live
        method = "torch.cuda.max_memory_allocated"
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss, _ = tr.model(mb)
        fwd_peak, fwd_live, _ = alloc_peak(prof)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss.backward()
        bwd_peak = alloc_peak(prof)[0]
        method = "torch.profiler allocator events"
    peak = None if None in (fwd_peak, fwd_live, bwd_peak) else max(fwd_peak, fwd_live + bwd_peak)
    params = tr.b.params
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    gnorm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
    return {"arm": arm, "peak_alloc_bytes": peak, "after_forward_bytes": fwd_live, "param_grad_bytes": grad_bytes,
            "method": method, "fwd_bwd_ms": round(1000 * statistics.median(times), 1),
            "loss": float(loss), "grad_norm": gnorm, "params_m": round(tr.n_params / 1e6, 1), "batch_size": batch,
            "answer_tokens": int(g.tokens), "seq_tokens": int(mb["inputs"]["attention_mask"].sum()),
            "padded_seq_len": int(mb["inputs"]["input_ids"].shape[1])}


def gc_memory(info: dict, args) -> dict:
    """(d): both arms, one after the other, each in a fresh process; ratios on ÷ off."""
    student = info["mid"] or info["student"]
    arms = {}
    for arm in ("off", "on"):
        arms.update(_finish({arm: _start(_arm_cmd(
            "--gc-mem-arm", arm, "--gc-student", student, "--gc-run", info["run"], "--gc-image-root", info["image_root"],
            "--gc-batch", args.gc_batch, "--gc-steps", args.gc_steps, "--shuffle-buffer", args.shuffle_buffer), args)}))
    off, on = arms["off"], arms["on"]
    out = {"student": "mid" if info["mid"] else "tiny", "params_m": off["params_m"], "batch_size": off["batch_size"],
           "answer_tokens": off["answer_tokens"], "seq_tokens": off["seq_tokens"],
           "padded_seq_len": off["padded_seq_len"], "method": off["method"],
           "peak_mib_off": _mib(off["peak_alloc_bytes"]), "peak_mib_on": _mib(on["peak_alloc_bytes"]),
           "ratio": (round(on["peak_alloc_bytes"] / off["peak_alloc_bytes"], 3)
                     if on["peak_alloc_bytes"] and off["peak_alloc_bytes"] else None),
           # what the forward keeps for backward (activations), and the gradients' share of the peak
           "after_forward_mib_off": _mib(off["after_forward_bytes"]), "after_forward_mib_on": _mib(on["after_forward_bytes"]),
           "after_forward_ratio": (round(on["after_forward_bytes"] / off["after_forward_bytes"], 3)
                                   if on["after_forward_bytes"] and off["after_forward_bytes"] else None),
           "param_grad_mib": _mib(off["param_grad_bytes"]),
           "fwd_bwd_ms_off": off["fwd_bwd_ms"], "fwd_bwd_ms_on": on["fwd_bwd_ms"],
           "time_ratio": round(on["fwd_bwd_ms"] / off["fwd_bwd_ms"], 3),
           "loss_rel_diff": abs(on["loss"] - off["loss"]) / max(1e-12, abs(off["loss"])),
           "grad_norm_rel_diff": abs(on["grad_norm"] - off["grad_norm"]) / max(1e-12, abs(off["grad_norm"]))}
    log(f"gradient checkpointing, {out['student']} student ({out['params_m']}M), batch {out['batch_size']}: peak "
        f"{out['peak_mib_off']} -> {out['peak_mib_on']} MiB (ratio {out['ratio']}), kept after forward "
        f"{out['after_forward_mib_off']} -> {out['after_forward_mib_on']} MiB, fwd+bwd {out['fwd_bwd_ms_off']} -> "
        f"{out['fwd_bwd_ms_on']} ms, loss rel diff {out['loss_rel_diff']:.1e}")
    return out


# --------------------------------------------------------------------------- (e) peak RSS as the cache grows

SUMMARY = re.compile(r"train-student: (\d+) steps; .*samples used (\d+), rejected (\d+)")


def rss_study(work: Path, info: dict, args) -> dict:
    """(e): ``llavadi train-student`` in a child process on a cache of ``--rss-samples`` samples and of 10×;
    the child's own peak RSS (``_common.run_cli_peak``)."""
    from cache_teacher import make_run  # benchmarks/cache_teacher.py

    flags = ["train_student.epochs=1", f"train_student.batch_size={args.rss_batch}",
             f"train_student.micro_batch_size={args.rss_batch}", f"train_student.shuffle_buffer={args.rss_shuffle_buffer}",
             "train_student.num_workers=0", "train_student.save_every_steps=1000000",
             *(f"train_student.{k}={v}" for k, v in ALL.items())]
    res = {"cache_positions": "all", "shard_size": args.rss_shard_size, "student": "tiny", "flags": flags}
    for mult in (1, 10):
        d = work / f"rss-{mult}x"
        run, _root, kinds = make_run(d, args.rss_samples * mult, args.rss_shard_size)
        cli("cache-teacher", run, "--teacher", info["teacher"], "--executor", "local", "cache_teacher.source=data",
            "cache_teacher.positions=all")
        r = run_cli_peak(["train-student", run, "--student", info["student"], "--executor", "local", *flags], d, _env())
        m = SUMMARY.search(r["stdout"])
        if not m:
            raise RuntimeError(f"could not read train-student's summary line:\n{r['stdout'][-2000:]}")
        steps, used, rejected = map(int, m.groups())
        res[f"{mult}x"] = {"conversations": kinds["conversations"], "samples_used": used, "rejected": rejected,
                           "steps": steps, "wall_s": round(r["wall_s"], 1), "peak_rss_mb": round(r["peak_rss_mb"], 1),
                           "tree_rss_polled_mb": round(r["tree_rss_polled_mb"], 1)}
        log(f"train-student rss {mult}x: {res[f'{mult}x']}")
        shutil.rmtree(d, ignore_errors=True)
    lo, hi = res["1x"]["peak_rss_mb"], res["10x"]["peak_rss_mb"]
    res.update(rss_ratio_10x=round(hi / lo, 3), rss_growth_mb_10x=round(hi - lo, 1))
    return res


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
    ap.add_argument("--no-mid", action="store_true", help="skip the ≈107M-parameter student")
    ap.add_argument("--mid-layers", type=int, default=6, help="MIDSIZE with this many LM layers (default 6: ≈107M)")
    ap.add_argument("--mid-batch", type=int, default=4)
    ap.add_argument("--mid-batches", type=int, default=2)
    ap.add_argument("--mid-rounds", type=int, default=3)
    ap.add_argument("--no-parts", action="store_true", help="(a): skip the all-token arms' parts")
    ap.add_argument("--no-mem", action="store_true", help="skip (c)")
    ap.add_argument("--kd-mem-n", type=int, default=4096)
    ap.add_argument("--kd-mem-h", type=int, default=1024)
    ap.add_argument("--kd-mem-v", type=int, default=32000)
    ap.add_argument("--kd-mem-chunks", default="512",
                    help="comma-separated chunk sizes of the fused and chunked arms, the first is the headline (default "
                         "512 = train_student.kd.chunk_size); each adds two ~1-2 min processes")
    ap.add_argument("--kd-all-batch", type=int, default=48,
                    help="(c) all-token: samples in the micro-batch (default 48: some 4000 rows)")
    ap.add_argument("--no-gc", action="store_true", help="skip (d)")
    ap.add_argument("--gc-batch", type=int, default=16, help="(d): samples in the measured step (default 16)")
    ap.add_argument("--gc-steps", type=int, default=1, help="(d): timed forward + backward passes per arm (default 1)")
    ap.add_argument("--no-rss", action="store_true", help="skip (e)")
    ap.add_argument("--rss-samples", type=int, default=64, help="(e): conversations of the 1x cache (default 64)")
    ap.add_argument("--rss-shard-size", type=int, default=16, help="(e): rows per input shard (default 16)")
    ap.add_argument("--rss-batch", type=int, default=8, help="(e): train_student.batch_size (default 8)")
    ap.add_argument("--rss-shuffle-buffer", type=int, default=32, help="(e): train_student.shuffle_buffer (default 32)")
    # internal: one arm of (c) or (d) in its own process
    ap.add_argument("--kd-mem-chunk", type=int, default=1024, help=argparse.SUPPRESS)
    ap.add_argument("--kd-mem-arm", choices=("naive", "chunked", "fused"), help=argparse.SUPPRESS)
    ap.add_argument("--kd-all-arm", choices=("naive_all", "fused_all"), help=argparse.SUPPRESS)
    for internal in ("--kd-all-student", "--kd-all-run", "--kd-all-image-root",
                     "--gc-mem-arm", "--gc-student", "--gc-run", "--gc-image-root"):
        ap.add_argument(internal, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.kd_mem_chunks = [int(c) for c in args.kd_mem_chunks.split(",") if c.strip()]

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kd_mem_arm:
        print(json.dumps(kd_mem_arm(args.kd_mem_arm, args.kd_mem_n, args.kd_mem_h, args.kd_mem_v, args.kd_mem_chunk)))
        return 0
    if args.kd_all_arm:
        print(json.dumps(kd_all_mem_arm(args.kd_all_arm, args.kd_all_student, args.kd_all_run, args.kd_all_image_root,
                                        args.kd_all_batch, args.shuffle_buffer)))
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
    mem = mem_all = gc = rss = mid = None
    loads = [load0[0]] if load0 else []
    try:
        mem_procs = {} if args.no_mem else kd_memory_start(args)
        info = setup(work, args)
        if mem_procs:  # done before anything is timed
            mem = kd_memory_collect(args, mem_procs)
            mem_all = kd_all_memory(info, args)
        # (b) loader alone, before any model is in memory: the default recipe on the default cache, and the
        # all-token recipe on the positions=all cache
        plans = {name: collate_plan(arm_terms(arm_config(base_config(info["student"], args.batch, args.batch), name),
                                              info[run]))
                 for name, run in (("full_kd_topk", "run"), ("all_kd_topk", "run_all"))}
        loaders = []
        # the last arm with the prepared-sample memo on (train_student.sample_memo_mb's default, as train() sets it
        # for a run of more than one epoch): epochs after the first reuse the rendered and processed samples
        for name, run, w, memo in (("full_kd_topk", "run", 0, 0), ("full_kd_topk", "run", 2, 0),
                                   ("all_kd_topk", "run_all", 0, 0), ("full_kd_topk", "run", 0, 1024)):
            r = loader_rate(info[run], info["student"], info["image_root"], plans[name], args.batch, w,
                            args.loader_epochs, args.shuffle_buffer, memo)
            r["plan"] = name
            loaders.append(r)
            log(f"loader ({name}'s plan) num_workers={w}: {r['samples_per_s']} samples/s "
                f"({r['steady_samples_per_s']} after the first step)")
        # (a) tiny student, then the ≈107M one
        tiny = bench_student("tiny", info["student"], info, args, args.batch, args.batch, args.batches, args.rounds)
        loads += loadavg()[:1]
        if info["mid"] is not None:
            mid = bench_student(f"mid{args.mid_layers}L", info["mid"], info, args, args.mid_batch, args.mid_batch,
                                args.mid_batches, args.mid_rounds)
            loads += loadavg()[:1]
        # (d) gradient checkpointing: peak memory with ÷ without, same batch
        gc = None if args.no_gc else gc_memory(info, args)
        # (e) train-student's peak RSS on 10x the cache ÷ 1x
        rss = None if args.no_rss else rss_study(work, info, args)
    finally:
        for p in mem_procs.values():
            if p.poll() is None:
                p.kill()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    result["kd_mem_headline_chunk_size"] = args.kd_mem_chunks[0] if mem else None
    for student, r in (("tiny", tiny), ("mid", mid)):
        if r is None:
            continue
        for arm, key in (("full_kd_topk", "topk"), ("full_kd_exact", "exact"), ("all_kd_topk", "all_topk"),
                         ("all_kd_exact", "all_exact")):
            result[f"kd_step_ratio_{student}_{key}"] = r["ratio"][arm]
            if arm.startswith("all_"):
                result[f"kd_step_ratio_{student}_{key}_vs_hf_ce"] = r["ratio_vs_hf_ce"][arm]
    for r in loaders:
        trainer = tiny["trainer_samples_per_s"][r["plan"]]
        r["trainer_samples_per_s"] = trainer
        suffix = "" if r["plan"] == "full_kd_topk" else "_all"
        memo = "_memo" if r["memo_mb"] else ""
        result[f"loader_over_trainer{suffix}_w{r['num_workers']}{memo}"] = round(r["samples_per_s"] / trainer, 2)
    if mem:
        result["kd_mem_ratio_fused_over_naive"] = mem["fused"][str(args.kd_mem_chunks[0])]["ratio"]
        result["kd_mem_ratio_chunked_over_naive"] = mem["chunked"][str(args.kd_mem_chunks[0])]["ratio"]
        for c in args.kd_mem_chunks[1:]:
            result[f"kd_mem_ratio_fused_chunk{c}"] = mem["fused"][str(c)]["ratio"]
            result[f"kd_mem_ratio_chunk{c}"] = mem["chunked"][str(c)]["ratio"]
    if mem_all:
        result["kd_mem_ratio_all_exact_over_naive"] = mem_all["ratio"]
        result["kd_mem_all_rows"] = mem_all["N"]
    if gc:
        result["gc_mem_ratio"] = gc["ratio"]
        result["gc_after_forward_ratio"] = gc["after_forward_ratio"]
        result["gc_time_ratio"] = gc["time_ratio"]
    if rss:
        result["rss_ratio_10x"] = rss["rss_ratio_10x"]
        result["rss_growth_mb_10x"] = rss["rss_growth_mb_10x"]
    result["targets"] = TARGETS
    result.update({
        "data": {"samples": args.samples, "answer_words_appended": args.answer_words, "cache_top_k": 64,
                 "cache_hidden_dtype": "float16", "teacher": "tiny TEACHER (hidden 256, V 32064)",
                 "cache_positions": {"a_and_c_all_token": "all", "b_and_d": "answer (and all for the all-token loader)"}},
        "arms": ARMS, "train_tiny": tiny, "train_mid": mid, "loader": loaders,
        "trainer_samples_per_s_tiny_full_kd": tiny["trainer_samples_per_s"]["full_kd_topk"],
        "kd_memory": mem, "kd_memory_all_token": mem_all, "gc_memory": gc, "rss": rss,
        "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "loadavg_start": load0, "loadavg_end": loadavg(), "max_loadavg_1m": max(loads + loadavg()[:1], default=None),
        "setup_s": round(info["setup_s"], 1), "machine": machine_info(),
        "bench_wall_s": round(time.perf_counter() - t_start, 1),
    })
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
