"""``llavadi regenerate``: every assistant turn of ``data/`` re-answered by the teacher
(the study's data-driven finding: students learn better from the teacher's own answers).

Per shard, in blocks of ``regenerate.block_size`` samples, turn-synchronously: all first
turns of the block in one ``generate`` call, then all second turns (each prompt holding the
teacher's own earlier answers), and so on — continuous batching stays full. Seeds derive
from (seed, sample id, turn), so a shard regenerated twice is byte-identical.

Output ``regenerate/part-NNNNN.parquet``: the sample columns (``conversations`` now holds the
teacher's answers) plus

| column                   | type                 | meaning |
|--------------------------|----------------------|---------|
| original_conversations   | list<struct<from, value>> | the turns as ingested |
| teacher                  | string (JSON)        | {"model", "name", "weights", "prompt_format"} — path, dir name, weights identity, prompt format |
| sampling                 | string (JSON)        | engine, temperature, top_p, top_k, max/min_new_tokens, stop, seed |
| turn_finish_reasons      | list<string>         | per assistant turn: stop, length, or kept_original |
| turn_num_tokens          | list<int32>          | generated tokens per assistant turn (0 when kept) |

Rejects (``regenerate/rejects/``): ``prompt_too_long`` (prompt ≥ teacher.max_model_len),
``missing_image`` / ``image_changed`` / ``undecodable_image`` (``schemas.samples.sample_image``: the file is
gone, differs from the sha256 ingest recorded, or cannot be decoded), ``image_placement`` (``<image>`` outside a human turn, more than one,
or without an image: ``models.prompts.place_image``), ``processor_error`` (the processor cannot take
the record), ``model_error`` (the engine fails on this record alone), ``empty_generation``,
``truncated`` (hit max_new_tokens with ``reject_truncated=true``). With
``on_failure=keep_original`` the original answer is kept instead (finish reason
``kept_original``).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa

from ..pipeline import atomic
from ..pipeline.config import LlavadiConfig
from ..pipeline.stage import (ShardOutput, ShardTask, StageContext, engine_installed, plan_from_upstream,
                              teacher_resources)
from ..models.engines.common import max_model_len, request_seed, weights_identity
from ..models.engines.generate import GenRequest, make_engine
from ..schemas.samples import SAMPLE_SCHEMA, TURN_TYPE, Reject, iter_samples, sample_image, write_samples

REGEN_SCHEMA = pa.schema(list(SAMPLE_SCHEMA) + [
    pa.field("original_conversations", pa.list_(TURN_TYPE)),
    pa.field("teacher", pa.string()),
    pa.field("sampling", pa.string()),
    pa.field("turn_finish_reasons", pa.list_(pa.string())),
    pa.field("turn_num_tokens", pa.list_(pa.int32())),
])


def teacher_preflight(cfg: LlavadiConfig, engine: str = "hf") -> list[str]:
    """Before any work: the teacher is a model directory of a supported family, its prompt format
    can be rendered, and (``engine="vllm"``) vLLM's build here serves that family."""
    from ..models.adapter import check_model, vllm_support

    t = cfg.teacher.model
    if not t:
        return ["no teacher: set teacher.model=DIR (a save_pretrained model directory with its processor)"]
    if not os.path.isdir(t) or not os.path.exists(os.path.join(t, "config.json")):
        return [f"teacher.model {t} is not a model directory (no config.json)"]
    adapter, problems = check_model(t, cfg.teacher.prompt_format, "teacher.model", "teacher.prompt_format")
    if problems:
        return problems
    if engine == "vllm" and (why := vllm_support(t)):
        return [f"the teacher's family ({adapter.family.name}) cannot run on vLLM here: {why}; use the HF engine "
                f"(regenerate.engine=hf / cache_teacher.engine=hf)"]
    return []


def teacher_identity(cfg: LlavadiConfig) -> dict:
    m = cfg.teacher.model
    return {"model": os.path.abspath(m), "name": Path(m).name, "weights": weights_identity(m),
            "prompt_format": cfg.teacher.prompt_format}


def load_image(image_root: str | None, rel: str, run_dir: Path | None = None):
    """The sample's image as 8-bit RGB (``schemas.images.load_rgb``: the one conversion every stage
    uses); a store reference (an image that came embedded in the input) resolves under ``run_dir``."""
    from ..schemas.images import load_rgb

    return load_rgb(image_root, rel, run_dir)


class RegenerateStage:
    name = "regenerate"
    dir_name = "regenerate"
    ext = "parquet"
    upstream = "data"

    def preflight(self, cfg: LlavadiConfig, run_dir: Path) -> list[str]:
        return (engine_installed(cfg.regenerate.engine, "regenerate.engine")
                or teacher_preflight(cfg, cfg.regenerate.engine))

    def material(self, cfg: LlavadiConfig, run_dir: Path) -> dict:
        t = asdict(cfg.teacher)
        # how many replicas serve the teacher does not change the output
        for k in ("num_actors", "gpus_per_actor", "cpus_per_actor", "gpu_memory_utilization"):
            t.pop(k)
        return {"regenerate": asdict(cfg.regenerate), "teacher": t, "teacher_identity": teacher_identity(cfg),
                "image_root": cfg.ingest.image_root}

    def resources(self, cfg: LlavadiConfig) -> dict:
        return teacher_resources(cfg)

    def plan(self, ctx: StageContext, is_done: Callable[[int], bool]) -> Iterator[ShardTask | int]:
        return plan_from_upstream(ctx, is_done)

    def setup(self, ctx: StageContext):
        return make_engine(ctx.cfg.regenerate.engine, ctx.cfg.teacher)

    def process(self, ctx: StageContext, engine, task: ShardTask) -> ShardOutput:
        c = ctx.cfg.regenerate
        # a shard's answers must not depend on the shards this engine served before (a resumed run
        # serves a different sequence): start from an empty prefix cache
        engine.reset_cache()
        rows_out, rejects = [], []
        reasons: dict[str, int] = {}
        n_in = gen_tokens = 0
        cached = {"prompt_tokens": 0}  # prompt tokens the engine took from its prefix cache
        t0 = time.time()
        ident = json.dumps(teacher_identity(ctx.cfg), sort_keys=True)
        sampling = json.dumps({"engine": c.engine, **asdict(c.sampling), "seed": c.seed}, sort_keys=True)
        finish_counts: dict[str, int] = {}

        def reject(row, reason, detail):
            reasons[reason] = reasons.get(reason, 0) + 1
            rejects.append({"id": row["id"], "source": row.get("source"), "reason": reason, "detail": detail})

        def run_block(block):
            nonlocal gen_tokens
            for row, res in zip(block, self._regenerate_block(ctx, engine, block, cached)):
                if "reject" in res:
                    reject(row, *res["reject"])
                    continue
                turns, reasons_t, ntoks = res["turns"], res["reasons"], res["ntoks"]
                gen_tokens += sum(ntoks)
                for r in reasons_t:
                    finish_counts[r] = finish_counts.get(r, 0) + 1
                rows_out.append({**{k: row[k] for k in ("id", "image", "image_sha256", "source")},
                                 "conversations": turns, "original_conversations": row["conversations"],
                                 "teacher": ident, "sampling": sampling, "turn_finish_reasons": reasons_t,
                                 "turn_num_tokens": ntoks})

        for block in blocks(iter_samples(task.payload), c.block_size):
            n_in += len(block)
            run_block(block)
        out = ctx.stage.data_file(task.index)
        tmp = atomic.tmp_name(out)
        try:
            unwritable = write_samples(rows_out, tmp, REGEN_SCHEMA)  # one row never fails the shard
            for row, err in unwritable:
                reject(row, "unwritable_record", err)
            dropped = {id(row) for row, _ in unwritable}
            rows_out = [r for r in rows_out if id(r) not in dropped]
            atomic.commit(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        atomic.write_jsonl(ctx.stage.rejects_file(task.index), rejects)
        secs = time.time() - t0
        counts = {"in": n_in, "out": len(rows_out), "rejected": dict(sorted(reasons.items()))}
        stats = {"generated_tokens": gen_tokens, "generate_seconds": round(secs, 3),
                 "generated_tokens_per_s": round(gen_tokens / secs, 1) if secs > 0 else None,
                 "finish_reasons": finish_counts, "prompt_tokens_cached": cached["prompt_tokens"]}
        print(f"[regenerate] shard {task.index:05d}: {len(rows_out)}/{n_in} samples, {gen_tokens} tokens, "
              f"{stats['generated_tokens_per_s']} tok/s", file=sys.stderr, flush=True)
        return ShardOutput(out, counts, stats)

    def _regenerate_block(self, ctx: StageContext, engine, block: list[dict], cached: dict) -> list:
        """Per sample: ``{"turns", "reasons", "ntoks"}`` or ``{"reject": (reason, detail)}``;
        adds the prompt tokens served from the engine's prefix cache to ``cached["prompt_tokens"]``."""
        c = ctx.cfg.regenerate
        keep = c.on_failure == "keep_original"
        adapter = engine.adapter
        tok = engine.tokenizer
        limit = max_model_len(ctx.cfg.teacher)
        state = []  # per sample: dict(img, new_turns, reasons, ntoks, failed)
        for row in block:
            st = {"img": None, "turns": [], "reasons": [], "ntoks": [], "fail": None}
            try:  # checked against the sha256 ingest recorded: a missing or changed image is this record's problem
                st["img"] = sample_image(ctx.cfg.ingest.image_root, row, run_dir=ctx.run_dir)
            except Reject as r:
                st["fail"] = (r.reason, r.detail)
            state.append(st)
        n_turns = max(len(r["conversations"]) // 2 for r in block)
        for t in range(n_turns):
            reqs, who = [], []
            for j, (row, st) in enumerate(zip(block, state)):
                conv = row["conversations"]
                if st["fail"] or 2 * t >= len(conv):
                    continue
                history = st["turns"] + [conv[2 * t]]
                try:
                    prompt = adapter.prompt(history, st["img"] is not None)
                    n = int(adapter.prompt_inputs(prompt, st["img"])["input_ids"].shape[-1])
                except Reject as r:  # image placement, or a processor that cannot take this record
                    st["fail"] = (r.reason, f"turn {t}: {r.detail}")
                    continue
                if n >= limit:
                    st["fail"] = ("prompt_too_long", f"turn {t}: {n} prompt tokens >= max_model_len={limit}")
                    continue
                reqs.append(GenRequest(prompt, st["img"], request_seed(c.seed, row["id"], t)))
                who.append(j)
            results = generate_isolating_failures(engine, reqs, c.sampling, state, who)
            cached["prompt_tokens"] += sum(r.cached_prompt_tokens for r in results if r is not None)
            for j, res in zip(who, results):
                if res is None:  # this record failed in the engine (state[j]["fail"] says why)
                    continue
                row, st = block[j], state[j]
                conv = row["conversations"]
                text = tok.decode(res.token_ids, skip_special_tokens=True)
                reason = res.finish_reason
                if reason == "length":  # cut inside a multi-byte character (byte-level BPE): drop its bytes
                    text = text.rstrip("\ufffd")
                for s in c.sampling.stop:
                    if s in text:
                        text, reason = text[: text.index(s)], "stop"
                text = text.strip()
                problem = None
                if not text:
                    problem = ("empty_generation", f"turn {t}: the teacher generated no text")
                elif reason == "length" and c.reject_truncated:
                    problem = ("truncated", f"turn {t}: hit max_new_tokens={c.sampling.max_new_tokens}")
                if problem and not keep:
                    st["fail"] = problem
                    continue
                if problem:
                    text, reason, n_tok = conv[2 * t + 1]["value"], "kept_original", 0
                else:
                    n_tok = len(res.token_ids)
                st["turns"] += [conv[2 * t], {"from": "gpt", "value": text}]
                st["reasons"].append(reason)
                st["ntoks"].append(n_tok)
        out = []
        for row, st in zip(block, state):
            if st["fail"] and keep:
                # sample-level failure (image, prompt length): keep the original answers
                k = len(row["conversations"]) // 2
                out.append({"turns": row["conversations"], "reasons": ["kept_original"] * k, "ntoks": [0] * k})
            elif st["fail"]:
                out.append({"reject": st["fail"]})
            else:
                out.append({"turns": st["turns"], "reasons": st["reasons"], "ntoks": st["ntoks"]})
        return out

    def cleanup(self, ctx: StageContext, task: ShardTask) -> None:
        pass


def blocks(rows, size: int):
    """``rows`` in lists of ``size`` (the last one shorter): the turn-synchronous blocks of regenerate and the
    on-policy rounds (``itertools.batched`` from Python 3.12)."""
    block = []
    for row in rows:
        block.append(row)
        if len(block) == size:
            yield block
            block = []
    if block:
        yield block


def generate_isolating_failures(engine, reqs: list, sampling, state: list, who: list) -> list:
    """``engine.generate`` over ``reqs``; when the batch fails, each request alone, so a record the engine
    cannot take is rejected (``state[j]["fail"] = ("model_error", reason)`` for request ``who[j]``) and the shard
    goes on. Results are those of the same requests (seeded per request), None where one failed. Shared by
    regenerate and the on-policy rounds' generate part."""
    if not reqs:
        return []
    try:
        return engine.generate(reqs, sampling)
    except Exception:  # noqa: BLE001 - find which record(s) the engine refuses
        out = []
        for r, j in zip(reqs, who):
            try:
                out.append(engine.generate([r], sampling)[0])
            except Exception as e:  # noqa: BLE001
                state[j]["fail"] = ("model_error", f"{type(e).__name__}: {e}"[:500])
                out.append(None)
        return out


STAGE = RegenerateStage()
