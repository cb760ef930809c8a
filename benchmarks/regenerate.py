"""Benchmark the regenerate engine: generated tokens/s of llavadi's vLLM engine vs HF ``generate``.

The claim under test: on a teacher big enough that the forward pass dominates, llavadi's vLLM
engine (continuous batching, paged KV cache, prefix caching) generates >= 3x the tokens/s of transformers'
batched ``generate`` at its best batch size, on the same prompts, teacher and forced answer
lengths. Both sides are measured in this one run, on this machine.

Workloads (teachers built locally with ``stages.demo.tiny_models.build_tiny_llava``, random
weights, fp32, greedy):

- ``midsize`` (headline): ``MIDSIZE`` (164M parameters with the vision tower, LM hidden 768, 12 layers, head_dim 64);
  64 prompts; forced answer lengths spread evenly over 8..128 tokens (``8 + 120*i/63`` rounded,
  shuffled with a fixed seed), one length per request;
- ``tiny``: ``TEACHER`` (tiny, per-step overhead dominates); 32 prompts x 16 forced tokens.
  HF batched ``generate`` is *expected to win* here; it is reported as measured.

Prompts are text-only (no image rows; ``text_only: true`` in the output): questions rendered
with the teacher's own chat template by ``models.ModelAdapter.prompt``, as the
regenerate stage renders them. Text-only keeps the comparison on the LM generate loop, which
is where the engines differ.

What each side generates (both: exactly ``sum(L_i)`` answer tokens are returned and counted):

- vLLM: ``llavadi.models.engines.generate.VLLMEngine`` constructs the engine with llavadi's own
  settings (in-process; ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``VLLM_CPU_KVCACHE_SPACE=2``), in
  the modes of ``VLLM_MODES``: ``default`` (the headline: what ``llavadi regenerate`` runs with no
  teacher.* overrides; on CPU eager, prefix cache on in 32-token blocks), ``compiled``
  (``teacher.enforce_eager=false``: torch.compile) and ``no_prefix_cache``
  (``teacher.prefix_caching=false``: the plain engine), so what each setting contributes is
  visible; ``tiny`` runs ``default`` only.
  The prefix cache is emptied before every run, as the stage empties it at every shard's start, so
  a run reuses only prefixes it computed itself (here: the system prompt the 64 requests share;
  in the stage also each turn's conversation inside the next turn's prompt); the cached prompt
  tokens are reported. ``VLLMEngine.generate`` takes one ``SamplingConfig`` (one
  ``max_new_tokens`` for all requests), so the benchmark calls ``engine.llm.generate`` directly
  with one ``SamplingParams`` per request built as ``VLLMEngine.generate`` builds them
  (``temperature=0``, ``detokenize=False``) plus ``min_tokens=max_tokens=L_i``: all requests
  submitted in one call, the engine batches them continuously. Each output's token count is
  checked to be exactly ``L_i``.
- HF: the teacher loaded by llavadi's ``HFEngine`` (``AutoModelForImageTextToText``, fp32),
  ``model.generate`` on left-padded batches, greedy, ``torch.inference_mode``. One ``generate``
  call cannot force different lengths per row, so each batch is forced to its longest row
  (``min_new_tokens=max_new_tokens=max L_i in the batch``) and every row is cut to its own
  ``L_i``; the rows past their ``L_i`` are decoded and discarded (the cost of static batching,
  reported as ``hf_*_computed_tokens``). Batches are formed in request order: a static batcher
  cannot group by answer length, which is unknown until generated. Batch sizes 16 and 64 (capped
  at the prompt count) are measured; the best is the comparison (``hf_best``). As an oracle bound
  that no real HF pipeline reaches, batch 16 is also run on requests sorted by forced length, so
  each batch holds similar lengths and the discarded work is the least possible
  (``hf_b16_sorted``, ``hf_oracle_best``, ``ratio_*_vs_hf_oracle_sorted``): reported beside the
  headline, not hidden. Throughput = answer tokens kept (= vLLM's count) / seconds.

Timed region per side: prompt tokenisation + generation of all requests. Model load / engine
init and one small warm-up call (2 prompts x 4 tokens) are outside it; init times are reported.
Then each side runs the whole workload once untimed (vLLM: every mode; HF: its largest batch), so
the timed runs measure the steady state a stage is in after its first shard (a process's first
full run was seen 10-40 % slower); those warm-up figures are reported too.
Each side is its own persistent subprocess (vLLM's CPU backend binds OpenMP threads and disables
``torch.set_num_threads`` in the process it runs in, so HF must not share it); all load first,
then the driver alternates their timed runs in two rounds, the second in reverse order: each
vLLM mode, HF b64, HF b16, HF b16 sorted, then back. Only one side computes at a time (the idle
sides' CPU use is measured: ``idle_peer_cpu_s``), so each gets the machine's cores; each
configuration's two runs bracket the others', so a drift in machine load hits every side alike,
and each figure is from the mean of its two run times. Thread
counts, the 1-min load average around each run and ``cpu_util`` (process CPU s / wall s of the
timed region) are reported; ``machine_contended`` is true when the load average went above
nproc + 1, i.e. other processes competed for the cores and the absolute figures are depressed
(the ratio less so).
``greedy_rows_identical_vllm_hf`` compares each request's tokens between vLLM and HF's best
batch (random weights: near-ties may flip a few rows under left padding; a sanity check that
both sides do the same work, not the claim).

Prints ONE JSON object on stdout's last line (``--out FILE`` also writes it).

Usage: ``.venv/bin/python benchmarks/regenerate.py [--out FILE] [--workloads midsize,tiny]``
"""
from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
from _common import PipeWorker, emit, machine_info  # noqa: E402

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

TARGET_RATIO = 3.0  # vLLM / HF-best tokens/s on the midsize workload
HF_BATCHES = (16, 64)
WARMUP_PROMPTS, WARMUP_TOKENS = 2, 4

TOPICS = ["the water cycle", "how bridges carry weight", "photosynthesis", "the history of the printing press",
          "how a compiler works", "why the sky is blue", "the rules of chess", "how vaccines work",
          "the life of honeybees", "how rainbows form", "plate tectonics", "the causes of tides",
          "how airplanes stay aloft", "the structure of an atom", "how a bicycle gear works",
          "the migration of birds", "how coffee is grown", "the phases of the moon", "how glass is made",
          "the difference between weather and climate", "how a refrigerator works", "the Roman aqueducts",
          "how trees communicate", "the invention of the telephone", "how coral reefs form",
          "the role of enzymes", "how a lighthouse works", "the Silk Road", "how volcanoes erupt",
          "why leaves change color", "how sound travels", "the making of paper"]
FORMS = ["Explain {} to a curious child.", "Describe {} in a few sentences, with one concrete example."]


# --------------------------------------------------------------------------- workloads

def questions(n: int) -> list[str]:
    out = []
    for i in range(n):
        out.append(FORMS[(i // len(TOPICS)) % len(FORMS)].format(TOPICS[i % len(TOPICS)]))
    return out


def midsize_lengths(n: int = 64, lo: int = 8, hi: int = 128, seed: int = 0) -> list[int]:
    lens = [int(round(lo + (hi - lo) * i / (n - 1))) for i in range(n)]
    random.Random(seed).shuffle(lens)
    return lens


WORKLOADS = {
    # vllm: the VLLM_MODES measured, the first is the headline
    "midsize": {"spec": "MIDSIZE", "n_prompts": 64, "lengths": "8..128 spread, per request",
                "vllm": ("default", "compiled", "no_prefix_cache")},
    "tiny": {"spec": "TEACHER", "n_prompts": 32, "lengths": "16 each", "vllm": ("default",)},
    # benchmarks/gpu_check.sh --smoke (its CPU test): the code path, not a figure
    "smoke": {"spec": "TEACHER", "n_prompts": 8, "lengths": "4 each", "vllm": ("default",)},
}


def workload_requests(name: str) -> tuple[list[str], list[int]]:
    w = WORKLOADS[name]
    qs = questions(w["n_prompts"])
    lens = midsize_lengths(w["n_prompts"]) if name == "midsize" else [int(w["lengths"].split()[0])] * w["n_prompts"]
    return qs, lens


def render(adapter, qs: list[str]) -> list[str]:
    """Single-turn text prompts in the teacher's prompt format (``models.ModelAdapter.prompt``)."""
    return [adapter.prompt([{"from": "human", "value": q}], False) for q in qs]


# --------------------------------------------------------------------------- workers (subprocesses)
#
# Each side is a persistent subprocess: it loads the teacher, warms up, reports "ready" and then
# does one timed run per command read from stdin ("run" for vLLM, "run B" for HF at batch B),
# answering one JSON line on a dedicated pipe (the engines' logs go to a log file). The driver
# alternates the sides' runs, so both are measured under the same machine conditions.

class HFSide:
    def __init__(self, model_dir: str, qs: list[str], lens: list[int], dtype: str = "float32"):
        import torch

        from llavadi.pipeline.config import TeacherConfig
        from llavadi.models.engines.generate import HFEngine

        self.torch = torch
        t0 = time.perf_counter()
        eng = HFEngine(TeacherConfig(model=model_dir, dtype=dtype))
        self.init_s = time.perf_counter() - t0
        self.model, self.tok = eng.model, eng.tokenizer
        self.tok.padding_side = "left"
        self.prompts, self.lens = render(eng.adapter, qs), lens
        # "input": batches in request order (answer lengths are unknown before generating, so this
        # is what a static batcher can do); "sorted": an oracle best case, batches of similar forced length
        self.orders = {"input": list(range(len(qs))), "sorted": sorted(range(len(qs)), key=lambda i: -lens[i])}
        t0 = time.perf_counter()
        self._batch(list(range(WARMUP_PROMPTS)), WARMUP_TOKENS)
        self.warmup_s = time.perf_counter() - t0

    def ready(self) -> dict:
        return {"init_s": self.init_s, "warmup_s": self.warmup_s, "torch_threads": self.torch.get_num_threads(),
                "prompt_tokens": sum(len(self.tok(p)["input_ids"]) for p in self.prompts)}

    def _batch(self, idx: list[int], force: int) -> list[list[int]]:
        with self.torch.inference_mode():
            inp = self.tok([self.prompts[i] for i in idx], padding=True, return_tensors="pt").to(self.model.device)
            gen = self.model.generate(**inp, do_sample=False, max_new_tokens=force, min_new_tokens=force,
                                      pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id)
            return gen[:, inp["input_ids"].shape[1]:].tolist()

    def run(self, arg: str) -> dict:
        b, order_name = arg.split(":")
        b, order = int(b), self.orders[order_name]
        toks: dict[int, list[int]] = {}
        computed = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for s in range(0, len(order), b):
            idx = order[s:s + b]
            force = max(self.lens[i] for i in idx)
            for i, row in zip(idx, self._batch(idx, force)):
                if len(row) != force:
                    raise RuntimeError(f"HF generated {len(row)} tokens for a batch forced to {force}")
                toks[i] = row[:self.lens[i]]
            computed += force * len(idx)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"batch": b, "wall_s": wall, "cpu_s": cpu, "tokens": sum(len(t) for t in toks.values()),
                "computed_tokens": computed, "n_batches": -(-len(order) // b), "order": order_name,
                "tokens_by_request": [toks[i] for i in range(len(self.prompts))]}


# vLLM settings measured (TeacherConfig fields over llavadi's defaults); "default" is the headline
VLLM_MODES = {
    "default": {},  # what `llavadi regenerate` runs: on CPU eager, prefix cache on (32-token blocks)
    "compiled": {"enforce_eager": False},  # + torch.compile (~1 min more start-up)
    "no_prefix_cache": {"prefix_caching": False},  # the plain engine
}


class VLLMSide:
    def __init__(self, model_dir: str, qs: list[str], lens: list[int], mode: str = "default", dtype: str = "float32",
                 teacher_kw: dict | None = None):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = "2"
        import torch

        from llavadi.pipeline.config import TeacherConfig
        from llavadi.models.engines.common import vllm_engine_kwargs
        from llavadi.models.engines.generate import VLLMEngine

        self.torch = torch
        teacher = TeacherConfig(model=model_dir, dtype=dtype, **{**VLLM_MODES[mode], **(teacher_kw or {})})
        kw = vllm_engine_kwargs(teacher, torch.cuda.is_available())
        self.settings = {k: kw.get(k) for k in ("enforce_eager", "enable_prefix_caching", "block_size")}
        t0 = time.perf_counter()
        self.eng = VLLMEngine(teacher)
        self.init_s = time.perf_counter() - t0
        self.prompts, self.lens = render(self.eng.adapter, qs), lens
        t0 = time.perf_counter()
        self._gen(self.prompts[:WARMUP_PROMPTS], [WARMUP_TOKENS] * WARMUP_PROMPTS)
        self.warmup_s = time.perf_counter() - t0

    def ready(self) -> dict:
        return {"init_s": self.init_s, "warmup_s": self.warmup_s, "torch_threads": self.torch.get_num_threads(),
                "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"), "settings": self.settings}

    def _gen(self, prompts: list[str], lens: list[int]) -> tuple[list[list[int]], int]:
        """(tokens per request, prompt tokens served from the prefix cache)."""
        from vllm import SamplingParams

        # as the stage starts each shard: nothing cached from the previous run helps this one
        self.eng.reset_cache()
        # built as VLLMEngine.generate builds them (greedy here), with the length forced per request
        params = [SamplingParams(n=1, temperature=0.0, top_p=1.0, top_k=0, max_tokens=n, min_tokens=n, seed=i,
                                 detokenize=False) for i, n in enumerate(lens)]
        outs = self.eng.llm.generate([{"prompt": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs], sum(int(o.num_cached_tokens or 0) for o in outs)

    def run(self, arg: str) -> dict:
        t0, c0 = time.perf_counter(), time.process_time()
        toks, cached = self._gen(self.prompts, self.lens)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        for t, n in zip(toks, self.lens):
            if len(t) != n:
                raise RuntimeError(f"vLLM generated {len(t)} tokens for a request forced to {n}")
        return {"wall_s": wall, "cpu_s": cpu, "tokens": sum(len(t) for t in toks), "tokens_by_request": toks,
                "prompt_tokens_cached": cached}


def worker_main(kind: str, spec_path: str, fd: int) -> int:
    spec = json.loads(Path(spec_path).read_text())
    out = os.fdopen(fd, "w", buffering=1)
    dtype = spec.get("dtype", "float32")
    if kind == "hf":
        side = HFSide(spec["model"], spec["questions"], spec["lengths"], dtype=dtype)
    else:
        side = VLLMSide(spec["model"], spec["questions"], spec["lengths"], mode=kind.split(":", 1)[1], dtype=dtype,
                        teacher_kw=spec.get("teacher"))
    out.write(json.dumps({"event": "ready", **side.ready()}) + "\n")
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "quit":
            break
        out.write(json.dumps({"event": "result", **side.run(arg)}) + "\n")
    return 0


class Worker(PipeWorker):
    """Driver-side handle of one persistent worker subprocess."""

    def __init__(self, kind: str, work: Path, name: str, model_dir: Path, qs: list[str], lens: list[int],
                 dtype: str = "float32", teacher_kw: dict | None = None):
        self.kind = kind
        tag = kind.replace(":", "-")
        spec = work / f"{tag}-{name}.in.json"
        spec.write_text(json.dumps({"model": str(model_dir), "questions": qs, "lengths": lens, "dtype": dtype,
                                    "teacher": teacher_kw or {}}))
        env = dict(os.environ)
        if kind.startswith("vllm:"):
            env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="2")
        super().__init__(kind, [Path(__file__).resolve(), "--worker", kind, "--spec", spec], work / f"{tag}-{name}.log",
                         env)
        self.ready = self.read()


# --------------------------------------------------------------------------- driver

def bench_workload(work: Path, name: str, model_dir: Path | None = None, dtype: str = "float32",
                   teacher_kw: dict | None = None, vllm_modes: tuple | None = None) -> dict:
    """One workload of ``WORKLOADS`` (its requests). The teacher: built from the workload's spec, or
    ``model_dir`` when given (``benchmarks/_gpu_check.py``: a wider teacher built on the GPU);
    ``dtype`` for both engines (float32 here; bfloat16 on a GPU), ``teacher_kw`` extra
    ``TeacherConfig`` fields for vLLM (e.g. ``gpu_memory_utilization``), ``vllm_modes`` a subset of
    the workload's modes."""
    from llavadi.stages.demo import tiny_models

    w = dict(WORKLOADS[name])
    if vllm_modes:
        w["vllm"] = tuple(vllm_modes)
    t0 = time.perf_counter()
    if model_dir is None:
        model_dir = tiny_models.build_tiny_llava(work / f"teacher-{name}", getattr(tiny_models, w["spec"]))
    else:
        w["spec"] = Path(model_dir).name
    build_s = time.perf_counter() - t0
    n_params = param_count(model_dir)
    qs, lens = workload_requests(name)
    total = sum(lens)
    batches = sorted({min(b, len(qs)) for b in HF_BATCHES}, reverse=True)
    log = lambda m: print(f"[bench regenerate] {name}: {m}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"teacher {w['spec']} built in {build_s:.1f} s; {len(qs)} prompts, {total} forced answer tokens")
    hf, vls = None, {}
    try:
        t0 = time.perf_counter()
        hf = Worker("hf", work, name, model_dir, qs, lens, dtype=dtype)
        hf_start = time.perf_counter() - t0
        vl_start = {}
        for mode in w["vllm"]:
            t0 = time.perf_counter()
            vls[mode] = Worker(f"vllm:{mode}", work, name, model_dir, qs, lens, dtype=dtype, teacher_kw=teacher_kw)
            vl_start[mode] = time.perf_counter() - t0
        # one untimed run of the whole workload per side first: the timed runs measure the steady
        # state a stage reaches after its first shard (first-run costs: allocator growth, new shapes)
        every = [*vls.values(), hf]
        warm = {f"vllm_{m}": vw.run(peers=every) for m, vw in vls.items()}
        warm[f"hf_b{max(batches)}"] = hf.run(f"{max(batches)}:input", peers=every)
        for k, r in warm.items():
            log(f"warm-up run {k}: {total / r['wall_s']:.1f} tok/s")
        hf_cfgs = [(f"b{b}" if order == "input" else f"b{b}_sorted", f"{b}:{order}") for b in batches
                   for order in (("input", "sorted") if b < len(qs) else ("input",))]  # one batch: order is moot
        # two rounds, the second in reverse order, so each configuration's two runs bracket the others
        # and a slow drift in machine load hits every side alike; a figure is from the mean of its two runs
        steps = [("vllm", m) for m in vls] + [("hf", c) for c in hf_cfgs]
        runs: dict[str, list] = {}
        for rnd, order in ((1, steps), (2, steps[::-1])):
            for side, what in order:
                if side == "vllm":
                    key, r = f"vllm_{what}", vls[what].run(peers=every)
                else:
                    key, r = f"hf_{what[0]}", hf.run(what[1], peers=every)
                runs.setdefault(key, []).append(r)
                extra = f" ({r['tokens']} kept / {r['computed_tokens']} decoded)" if side == "hf" else ""
                log(f"{key} run {rnd}: {total / r['wall_s']:.1f} tok/s{extra}")
    finally:
        for wk in [*vls.values(), hf]:
            if wk is not None:
                wk.close()

    for r in [x for rs in runs.values() for x in rs]:
        if r["tokens"] != total:
            raise RuntimeError(f"token count {r['tokens']} != forced total {total}")
    tps = {k: total / (sum(r["wall_s"] for r in rs) / len(rs)) for k, rs in runs.items()}
    head = w["vllm"][0]
    vl_head = tps[f"vllm_{head}"]
    out: dict = {"teacher": w["spec"], "teacher_params": n_params, "dtype": dtype, "n_prompts": len(qs), "text_only": True,
                 "answer_lengths": w["lengths"], "min_len": min(lens), "max_len": max(lens),
                 "total_generated_tokens": total, "prompt_tokens": hf.ready["prompt_tokens"],
                 "vllm_headline_mode": head, "vllm_tok_s": round(vl_head, 1)}
    for k, rs in runs.items():
        out[f"{k}_tok_s"] = round(tps[k], 1)
        out[f"{k}_runs_tok_s"] = [round(total / r["wall_s"], 1) for r in rs]
        out[f"{k}_cpu_util"] = [round(r["cpu_s"] / r["wall_s"], 2) for r in rs]
        out[f"{k}_runs_identical"] = rs[0]["tokens_by_request"] == rs[1]["tokens_by_request"]
    for m in vls:
        out[f"vllm_{m}_prompt_tokens_cached"] = [r["prompt_tokens_cached"] for r in runs[f"vllm_{m}"]]
        out[f"vllm_{m}_settings"] = vls[m].ready["settings"]
    hf_keys = [f"hf_{c}" for c, _ in hf_cfgs]
    for k in hf_keys:
        out[f"{k}_computed_tokens"] = runs[k][0]["computed_tokens"]
    # best: HF batches in request order (what a real pipeline can do); oracle: any, sorted included
    best = max((k for k in hf_keys if runs[k][0]["order"] == "input"), key=lambda k: tps[k])
    oracle = max(hf_keys, key=lambda k: tps[k])
    out["hf_best_batch"] = best[len("hf_"):]
    out["hf_best_tok_s"] = round(tps[best], 1)
    out["hf_oracle_best_batch"] = oracle[len("hf_"):]
    out["hf_oracle_best_tok_s"] = round(tps[oracle], 1)
    out["ratio_vllm_over_hf_best"] = round(vl_head / tps[best], 3)
    out["ratio_vllm_over_hf_oracle_best"] = round(vl_head / tps[oracle], 3)
    for m in vls:
        out[f"ratio_vllm_{m}_over_hf_best"] = round(tps[f"vllm_{m}"] / tps[best], 3)
        out[f"ratio_vllm_{m}_over_hf_oracle_best"] = round(tps[f"vllm_{m}"] / tps[oracle], 3)
    same = sum(a == c for a, c in zip(runs[f"vllm_{head}"][0]["tokens_by_request"],
                                      runs[best][0]["tokens_by_request"]))
    out["greedy_rows_identical_vllm_hf"] = f"{same}/{len(qs)}"
    out["warmup_run_tok_s"] = {k: round(total / r["wall_s"], 1) for k, r in warm.items()}
    out["timed_s"] = {k: [round(x["wall_s"], 2) for x in rs] for k, rs in runs.items()}
    out["init_s"] = {"build_teacher": round(build_s, 1), "hf_load": round(hf.ready["init_s"], 1),
                     "hf_warmup": round(hf.ready["warmup_s"], 2), "hf_worker_start": round(hf_start, 1),
                     **{f"vllm_{m}_engine_init": round(vw.ready["init_s"], 1) for m, vw in vls.items()},
                     **{f"vllm_{m}_warmup": round(vw.ready["warmup_s"], 2) for m, vw in vls.items()},
                     **{f"vllm_{m}_worker_start": round(vl_start[m], 1) for m in vls}}
    vw = vls[head]
    out["threads"] = {"hf_torch": hf.ready["torch_threads"], "vllm_torch": vw.ready["torch_threads"],
                      "vllm_omp_threads_bind": vw.ready["omp_threads_bind"]}
    # Machine conditions: 1-min load average before/after each timed run (others' processes on
    # the machine slow both sides), CPU used by the idle side meanwhile (should be ~0), and
    # cpu_util above (process CPU s / wall s; ~nproc when a side had the cores to itself).
    out["loadavg_1m"] = {k: [x["loadavg_1m"] for x in rs] for k, rs in runs.items()}
    out["idle_peer_cpu_s"] = {k: [x["idle_peer_cpu_s"] for x in rs] for k, rs in runs.items()}
    return out


def param_count(model_dir: Path) -> int:
    """Parameters in the teacher's safetensors, from the headers (no weights loaded)."""
    from safetensors import safe_open

    from llavadi.models.engines.common import safetensors_files

    n = 0
    for f in safetensors_files(model_dir):
        with safe_open(model_dir / f, "pt") as sf:
            for k in sf.keys():
                size = 1
                for dim in sf.get_slice(k).get_shape():
                    size *= int(dim)
                n += size
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also write the JSON result to this file")
    ap.add_argument("--workloads", default="midsize,tiny", help="comma-separated: midsize,tiny (default both)")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed afterwards)")
    ap.add_argument("--worker", choices=["hf", *(f"vllm:{m}" for m in VLLM_MODES)], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.spec, args.fd)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    bad = [n for n in names if n not in WORKLOADS]
    if bad or not names:
        ap.error(f"--workloads: unknown {bad}; choose from {sorted(WORKLOADS)}")

    t_start = time.perf_counter()
    machine = machine_info()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="llavadi-bench-regenerate-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = {n: bench_workload(work, n) for n in names}
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    result: dict = {"benchmark": "regenerate", "target_ratio_midsize": TARGET_RATIO}
    if "midsize" in results:
        m = results["midsize"]
        result["ratio_midsize"] = m["ratio_vllm_over_hf_best"]
        result["target_met"] = m["ratio_vllm_over_hf_best"] >= TARGET_RATIO
        result["vllm_tok_s_midsize"] = m["vllm_tok_s"]
        result["hf_best_tok_s_midsize"] = m["hf_best_tok_s"]
        result["ratio_midsize_vs_hf_oracle_sorted"] = m["ratio_vllm_over_hf_oracle_best"]
        result["vllm_mode_midsize"] = m["vllm_headline_mode"]
        for mode in WORKLOADS["midsize"]["vllm"][1:]:
            result[f"ratio_midsize_vllm_{mode}"] = m[f"ratio_vllm_{mode}_over_hf_best"]
        result["vllm_settings_midsize"] = m[f"vllm_{m['vllm_headline_mode']}_settings"]
        result["vllm_engine_init_s_midsize"] = {k: v for k, v in m["init_s"].items() if k.endswith("engine_init")}
    if "tiny" in results:
        t = results["tiny"]
        result["ratio_tiny"] = t["ratio_vllm_over_hf_best"]
        result["vllm_tok_s_tiny"] = t["vllm_tok_s"]
        result["hf_best_tok_s_tiny"] = t["hf_best_tok_s"]
        winner = "vLLM" if t["ratio_vllm_over_hf_best"] >= 1 else "HF batched generate"
        result["tiny_note"] = (f"tiny teacher, where per-step overhead dominates and HF batched generate was "
                               f"expected to win; measured: {winner} faster")
    result["workloads"] = results
    result["method"] = ("same prompts (text-only, teacher chat template), same teacher, greedy fp32; vLLM: "
                        "VLLMEngine-built LLM, engine.llm.generate with per-request SamplingParams "
                        "min_tokens=max_tokens=L_i, one call; HF: HFEngine-loaded model, model.generate on "
                        "left-padded batches in request order (hf_best: answer lengths are unknown before generating) "
                        "and, as an oracle bound, sorted by L_i (hf_oracle_best), each batch forced to its max L_i, "
                        "rows cut to L_i (decoded-but-discarded tokens in hf_b*_computed_tokens); tok/s = sum(L_i) "
                        "/ timed seconds (tokenisation + generation; load/init/warm-up excluded); each side in its "
                        "own persistent subprocess, runs alternated in two rounds (vLLM modes, HF b64, HF b16, HF b16 "
                        "sorted, then reversed; each figure from the mean of its two runs), after one untimed run of the whole workload per "
                        "side; vLLM modes: default (the headline: llavadi's settings, eager + prefix cache on CPU), and on "
                        "midsize compiled (teacher.enforce_eager=false) and no_prefix_cache (teacher.prefix_caching=false); "
                        "prefix cache emptied before every run")
    loads = [x for r in results.values() for runs in r["loadavg_1m"].values() for pair in runs for x in pair]
    result["max_loadavg_1m"] = max(loads)
    # our own side accounts for ~nproc of the load average; well above that, others competed for the cores
    result["machine_contended"] = max(loads) > machine["nproc"] + 1
    result["machine"] = machine
    result["bench_wall_s"] = round(time.perf_counter() - t_start, 1)

    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
