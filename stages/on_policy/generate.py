"""An on-policy round's generate part (issue #24): the round's student answers its prompts, every human turn in
order, and the **sampled token ids** are kept.

A shard stage (``pipeline.runner``: ``_done`` markers, rejects, fingerprint, lock, resume): shard i reads the
base cache's source shard i (``regenerate/`` or ``data/``) and keeps the rows of the round's re-answered
prompts (``plan.select_prompts``). Per block of rows, turn-synchronously (as ``regenerate``): turn t's prompt
is the conversation so far in the *student's* prompt format with its own earlier answers spliced in as their
ids (``models.answer_ids.turn_prompt``), so the student answers turn t after exactly the tokens it produced.
Request seeds derive from (round seed, sample id, turn): a shard generated twice — after a kill — is
byte-identical. Generation: transformers ``generate`` (``on_policy.engine=hf``: the forward inputs of the spliced ids) or
vLLM (``vllm``: the same prompt as text-level ids, ``prompt_token_ids`` with the image; vLLM expands the
placeholder), the student served with the teacher's engine settings (``teacher.*``: dtype, context, prefix cache).

Output ``part-NNNNN.parquet``: the sample columns (``conversations``: the human turns and the decoded answers),
plus

| column                 | type                      | meaning |
|------------------------|---------------------------|---------|
| answer_token_ids       | list<list<int32>>         | per assistant turn, the sampled ids (with the stop token that ended it, if one did) |
| original_conversations | list<struct<from, value>> | the turns of the source row |
| generator              | string (JSON)             | {"model", "weights_sha256", "prompt_format", "round"} |
| sampling               | string (JSON)             | engine, temperature, max_new_tokens, round seed |
| turn_finish_reasons    | list<string>              | stop or length |
| turn_num_tokens        | list<int32>               | sampled ids per turn |

Rejects: ``missing_image`` / ``image_changed`` / ``undecodable_image``, ``image_placement``, ``processor_error``,
``prompt_too_long`` (prompt + ``max_new_tokens`` past the teacher's or the student's context), ``model_error``, and an answer the prompt format cannot
hold (``models.answer_ids``: ``empty_generation``, ``token_out_of_vocab``, ``special_token_in_answer``,
``special_token_in_text``, ``token_mismatch``).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa

from ...models.answer_ids import answer_conversation, answer_text, prompt_problem, turn_prompt
from ...pipeline import atomic
from ...pipeline.config import LlavadiConfig, SamplingConfig
from ...pipeline.stage import ShardOutput, ShardTask, StageContext, engine_installed, plan_from_upstream
from ...schemas.samples import SAMPLE_SCHEMA, TURN_TYPE, Reject, iter_samples, sample_image, write_samples
from ..regenerate import blocks, generate_isolating_failures
from .plan import RoundStart, digest, part_dir, rel_path

GENERATE_SCHEMA = pa.schema(list(SAMPLE_SCHEMA) + [
    pa.field("answer_token_ids", pa.list_(pa.list_(pa.int32()))),
    pa.field("original_conversations", pa.list_(TURN_TYPE)),
    pa.field("generator", pa.string()),
    pa.field("sampling", pa.string()),
    pa.field("turn_finish_reasons", pa.list_(pa.string())),
    pa.field("turn_num_tokens", pa.list_(pa.int32())),
])
BLOCK = 256  # samples per turn-synchronous step: vLLM batches them (the HF engine answers one at a time anyway)


def sampling(cfg: LlavadiConfig) -> SamplingConfig:
    """The student's sampling: ``on_policy.temperature`` and ``max_new_tokens``; no top-p/top-k, no stop
    strings (a stop string cuts text, and the ids are what is kept)."""
    op = cfg.on_policy
    return SamplingConfig(temperature=op.temperature, top_p=1.0, top_k=0, max_new_tokens=op.max_new_tokens,
                          min_new_tokens=0, stop=[])


class GenerateStage:
    """Round ``start.r``'s generate part; ``on_ids``: the ids the student re-answers."""

    name = "on-policy-generate"
    ext = "parquet"

    def __init__(self, start: RoundStart, seed: int, upstream: str, on_ids: list[str], generator_sha256: str):
        self.start, self.seed, self.upstream = start, seed, upstream
        self.dir_name = part_dir(start.r, "generate")
        self.on_ids = frozenset(on_ids)
        self.prompts_sha256 = digest(sorted(on_ids))
        self.generator_sha256 = generator_sha256

    def generator(self, cfg: LlavadiConfig, run_dir: Path) -> dict:
        """The generator's identity: its full weights hash; its path relative to the run directory when it lies
        inside (a checkpoint of this run: a moved or copied run keeps its fingerprints)."""
        return {"model": rel_path(self.start.generator, run_dir), "weights_sha256": self.generator_sha256,
                "prompt_format": cfg.train_student.prompt_format, "round": self.start.r}

    def preflight(self, cfg: LlavadiConfig, run_dir: Path) -> list[str]:
        from ...models.adapter import vllm_support

        p = engine_installed(cfg.on_policy.engine, "on_policy.engine")
        if not p and cfg.on_policy.engine == "vllm" and (why := vllm_support(self.start.generator)):
            p.append(f"on_policy.engine=vllm: the student's family cannot run on vLLM here: {why}; set "
                     f"on_policy.engine=hf")
        return p

    def material(self, cfg: LlavadiConfig, run_dir: Path) -> dict:
        op = asdict(cfg.on_policy)
        for k in ("rounds", "mix", "lr"):  # how many rounds, and how they train, do not change this round's answers
            op.pop(k)
        return {"on_policy": op, "round": self.start.r, "round_seed": self.seed, "generator": self.generator(cfg, run_dir),
                "previous": self.start.previous, "prompts_sha256": self.prompts_sha256,
                "max_model_len": cfg.teacher.max_model_len, "dtype": cfg.teacher.dtype, "image_root": cfg.ingest.image_root}

    def resources(self, cfg: LlavadiConfig) -> dict:
        t = cfg.teacher  # the student is served like the teacher: one engine per actor
        return {"num_workers": 1, "num_cpus": t.cpus_per_actor, "num_gpus": t.gpus_per_actor}

    def plan(self, ctx: StageContext, is_done: Callable[[int], bool]) -> Iterator[ShardTask | int]:
        return plan_from_upstream(ctx, is_done)

    def setup(self, ctx: StageContext):
        from ...models.engines.generate import make_engine

        # the student is served as regenerate serves the teacher (its dtype, context, vLLM settings)
        return make_engine(ctx.cfg.on_policy.engine, replace(ctx.cfg.teacher, model=str(self.start.generator),
                                                             prompt_format=ctx.cfg.train_student.prompt_format))

    def process(self, ctx: StageContext, engine, task: ShardTask) -> ShardOutput:
        engine.reset_cache()  # a shard's answers must not depend on the shards this engine served before
        rows_out, rejects, reasons = [], [], {}
        n_in = gen_tokens = 0
        t0 = time.time()
        gen = json.dumps(self.generator(ctx.cfg, ctx.run_dir), sort_keys=True)
        samp = json.dumps({"engine": ctx.cfg.on_policy.engine, **asdict(sampling(ctx.cfg)), "seed": self.seed},
                          sort_keys=True)

        def run_block(block):
            nonlocal gen_tokens
            for row, res in zip(block, self._answer_block(ctx, engine, block)):
                if "reject" in res:
                    reason, detail = res["reject"]
                    reasons[reason] = reasons.get(reason, 0) + 1
                    rejects.append({"id": row["id"], "source": row.get("source"), "reason": reason, "detail": detail})
                    continue
                gen_tokens += sum(len(a) for a in res["answers"])
                rows_out.append({**{k: row.get(k) for k in ("id", "image", "image_sha256", "source")},
                                 "conversations": res["turns"], "answer_token_ids": res["answers"],
                                 "original_conversations": row["conversations"], "generator": gen, "sampling": samp,
                                 "turn_finish_reasons": res["reasons"],
                                 "turn_num_tokens": [len(a) for a in res["answers"]]})

        for block in blocks((row for row in iter_samples(task.payload) if row["id"] in self.on_ids), BLOCK):
            n_in += len(block)
            run_block(block)
        out = ctx.stage.data_file(task.index)
        tmp = atomic.tmp_name(out)
        try:
            for row, err in write_samples(rows_out, tmp, GENERATE_SCHEMA):  # never happens for ids; kept as regenerate
                reasons["unwritable_record"] = reasons.get("unwritable_record", 0) + 1
                rejects.append({"id": row["id"], "source": row.get("source"), "reason": "unwritable_record",
                                "detail": err})
            atomic.commit(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        atomic.write_jsonl(ctx.stage.rejects_file(task.index), rejects)
        secs = time.time() - t0
        n_out = n_in - sum(reasons.values())
        stats = {"generated_tokens": gen_tokens, "generate_seconds": round(secs, 3),
                 "generated_tokens_per_s": round(gen_tokens / secs, 1) if secs > 0 else None}
        return ShardOutput(out, {"in": n_in, "out": n_out, "rejected": dict(sorted(reasons.items()))}, stats)

    def cleanup(self, ctx: StageContext, task: ShardTask) -> None:
        pass

    def _answer_block(self, ctx: StageContext, engine, block: list[dict]) -> list[dict]:
        """Per row ``{"turns", "answers", "reasons"}`` or ``{"reject": (reason, detail)}``."""
        from ...models.engines.common import max_model_len, request_seed
        from ...models.engines.generate import GenRequest

        adapter, s = engine.adapter, sampling(ctx.cfg)
        # the whole answer must fit both contexts: the teacher's (the round cache) and the student's
        limit = min(max_model_len(ctx.cfg.teacher),
                    max_model_len(replace(ctx.cfg.teacher, model=str(self.start.generator), max_model_len=None)))
        state = []
        for row in block:
            st = {"img": None, "turns": [], "answers": [], "prompts": [], "reasons": [], "fail": None}
            try:
                st["img"] = sample_image(ctx.cfg.ingest.image_root, row, run_dir=ctx.run_dir)
            except Reject as r:
                st["fail"] = (r.reason, r.detail)
            state.append(st)
        for t in range(max(len(r["conversations"]) // 2 for r in block)):
            reqs, who = [], []
            for j, (row, st) in enumerate(zip(block, state)):
                conv = row["conversations"]
                if st["fail"] or 2 * t >= len(conv):
                    continue
                try:
                    ids, inputs = turn_prompt(adapter, st["turns"] + [conv[2 * t]], st["answers"], st["img"])
                except Reject as r:
                    st["fail"] = (r.reason, f"turn {t}: {r.detail}")
                    continue
                n = int(inputs["input_ids"].shape[-1])
                if n + s.max_new_tokens > limit:
                    st["fail"] = ("prompt_too_long", f"turn {t}: {n} prompt tokens + on_policy.max_new_tokens="
                                                     f"{s.max_new_tokens} > {limit} (the teacher's and the student's "
                                                     f"context)")
                    continue
                st["prompts"].append(ids)
                reqs.append(GenRequest("", st["img"], request_seed(self.seed, row["id"], t), inputs=inputs,
                                       prompt_ids=ids))
                who.append(j)
            for j, res in zip(who, generate_isolating_failures(engine, reqs, s, state, who)):
                if res is None:
                    continue
                st, human = state[j], block[j]["conversations"][2 * t]
                ids = list(res.token_ids) + ([res.stop_token_id] if res.stop_token_id is not None else [])
                try:
                    text = answer_text(adapter, ids)
                except Reject as r:
                    st["fail"] = (r.reason, f"turn {t}: {r.detail}")
                    continue
                st["turns"] += [human, {"from": "gpt", "value": text}]
                st["answers"].append(ids)
                st["reasons"].append(res.finish_reason)
        out = []
        for row, st in zip(block, state):
            if not st["fail"]:
                try:  # the sequence the teacher will score holds every prompt the student answered, as it was
                    conv = answer_conversation(adapter, st["turns"], st["answers"], st["img"] is not None)
                    problem = prompt_problem(conv, st["prompts"])
                    if problem:
                        st["fail"] = ("token_mismatch", problem)
                except Reject as r:
                    st["fail"] = (r.reason, r.detail)
            out.append({"reject": st["fail"]} if st["fail"] else
                       {"turns": st["turns"], "answers": st["answers"], "reasons": st["reasons"]})
        return out
