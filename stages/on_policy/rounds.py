"""``llavadi on-policy RUN --rounds N`` (issue #24): rounds of (a) the student answers, (b) the teacher scores
exactly those tokens, (c) the student continues training — each part the stage it is, resumable like it.

Round r (``plan.py`` for its directories, seed, prompts and start):

(a) ``generate/`` — ``generate.GenerateStage`` through the shard runner: round r−1's final student answers the
    round's re-answered prompts, keeping the sampled ids;
(b) ``cache_teacher/`` — ``RoundCacheStage``: cache-teacher's own stage (the same fields, codecs, image rows,
    ``index.json``, teacher head) over ``generate/``, whose rows carry ``answer_token_ids``: the teacher-forced
    sequence holds exactly those ids (``models.answer_ids``);
(c) ``train_student/`` — ``train()`` continuing round r−1's full state
    (``stages/train_student/continuation.py``) on ``on_policy.mix`` of the round cache and the base cache's other prompts,
    one pass, at the constant ``on_policy.lr``.

Fingerprints chain: (a) holds round r−1's train fingerprint and the generator's full weights hash, (b) chains
(a) through the runner, (c) chains (b). A changed key is refused by the part it changes, naming it, as the
stages do; ``--force`` redoes every part of every round this launch runs. A kill anywhere followed by the same
command finishes each part as its stage does: done shards skipped, training resumed from its newest checkpoint.
The student's answers are at most one round old: round r's are those of the student round r−1 produced.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from ...pipeline import atomic
from ...pipeline.config import LlavadiConfig, changed_keys
from ...pipeline.runner import StageError, run_stage
from ...pipeline.rundir import StageDir
from ...pipeline.stage import engine_installed
from ..cache_teacher import CacheTeacherStage
from ..regenerate import teacher_preflight
from .generate import GenerateStage
from .plan import (PARTS, RoundStart, base_source, done_rounds, part_dir, rel_path, round_dir, round_seed, round_start,
                   select_prompts)


# the vLLM forcer sends each conversation as its text's tokens (models/engines/forcing.py), not the sampled ids
VLLM_CACHE = ("cache_teacher.engine=vllm cannot score a round's answers yet (the vLLM forcer sends the rendered text, "
              "whose tokens may differ from the student's sampled ids): set cache_teacher.engine=hf for on-policy "
              "rounds (the base cache may have been made with vLLM)")


class RoundCacheStage(CacheTeacherStage):
    """cache-teacher over round ``r``'s ``generate/`` into its ``cache_teacher/``."""

    def __init__(self, r: int):
        self.dir_name = part_dir(r, "cache_teacher")
        self.upstream = part_dir(r, "generate")

    def upstream_for(self, cfg: LlavadiConfig) -> str:
        return self.upstream

    def preflight(self, cfg: LlavadiConfig, run_dir: Path) -> list[str]:
        # no disk-space estimate: pipeline/estimate.py sizes the base cache's source, not a round's answers
        c = cfg.cache_teacher
        if c.engine == "vllm":
            return [VLLM_CACHE]
        return engine_installed(c.engine, "cache_teacher.engine") or teacher_preflight(cfg, c.engine)


def tokenizer_problems(cfg: LlavadiConfig, generator: Path) -> list[str]:
    """The student answers in token ids the teacher scores as they are: both must have one tokenizer
    (``schemas.conversation.tokenizer_hash``), refused otherwise naming both."""
    from ...models.adapter import ModelAdapter
    from ...schemas.conversation import tokenizer_hash

    try:
        s = tokenizer_hash(ModelAdapter(generator, cfg.train_student.prompt_format).tokenizer)
        t = tokenizer_hash(ModelAdapter(cfg.teacher.model, cfg.teacher.prompt_format).tokenizer)
    except (OSError, ValueError) as e:
        return [f"on-policy: cannot load the student's or the teacher's tokenizer: {e}"]
    if s != t:
        return [f"on-policy needs one tokenizer for student and teacher (the teacher scores the student's sampled "
                f"ids): the student {generator} has tokenizer {s}, the teacher {cfg.teacher.model} has {t}"]
    return []


def round_config(cfg: LlavadiConfig, seed: int) -> LlavadiConfig:
    """The config of a round's train part: one pass over the round's samples (``max_steps=0, epochs=1``), the
    constant learning rate, the round's seed (its shuffle)."""
    out = copy.deepcopy(cfg)
    c = out.train_student
    c.max_steps, c.epochs, c.schedule, c.warmup_ratio, c.seed = 0, 1, "constant", 0.0, seed
    c.lr = cfg.on_policy.lr or cfg.train_student.lr
    return out


def train_round(run_dir: Path, cfg: LlavadiConfig, start: RoundStart, seed: int, base_ids: list[str],
                force: bool, progress: bool) -> dict:
    """Part (c): ``train()`` into ``round_<r>/train_student`` continuing ``start.init`` (module doc)."""
    from ..train_student.continuation import Continuation
    from ..train_student.data import Source
    from ..train_student.loop import train
    from .plan import digest

    r = start.r
    cache = StageDir(run_dir, part_dir(r, "cache_teacher")).read_manifest() or {}
    sources = (Source(part_dir(r, "cache_teacher")),)
    if cfg.on_policy.mix == "shuffle" and base_ids:
        sources += (Source("cache_teacher", frozenset(base_ids)),)
    rcfg = round_config(cfg, seed)
    cont = Continuation(sources, start.init, cache["fingerprint"], rcfg.train_student.lr,
                        {"round": r, "mix": cfg.on_policy.mix, "base_prompts_sha256": digest(sorted(base_ids)),
                         "init": rel_path(start.init, run_dir) if start.init else None, "previous": start.previous})
    return train(run_dir, rcfg, force=force, progress=progress, out_dir=run_dir / part_dir(r, "train_student"),
                 cont=cont)


def run_round(run_dir: Path, cfg: LlavadiConfig, r: int, *, force: bool = False, progress: bool = True) -> dict:
    """Round ``r``'s three parts (each skipped where finished with this config); writes ``round.json``."""
    from ...models.engines.common import weights_sha256

    run_dir = Path(run_dir)
    start = round_start(run_dir, cfg, r)
    problems = tokenizer_problems(cfg, start.generator)
    base = StageDir(run_dir, "cache_teacher").read_manifest() or {}
    # the engine changes the values by float noise only, not the fields (a vLLM-made base cache is fine)
    diff = [k for k in changed_keys(base.get("material", {}), RoundCacheStage(r).material(cfg, run_dir))
            if k != "cache_teacher.engine"]
    if diff:  # one stream, one set of fields: a round cache made otherwise could not be batched with the base cache
        problems.append(f"on-policy: the teacher cache settings differ from those of the base cache "
                        f"{run_dir / 'cache_teacher'} (changed: {', '.join(diff)}): a round's cache must hold the same "
                        f"fields; revert them, or redo the base cache")
    if problems:
        raise StageError("\n".join(problems))
    seed = round_seed(cfg.on_policy.seed, r)
    on_ids, base_ids = select_prompts(run_dir, cfg, r)
    atomic.write_json(run_dir / round_dir(r) / "prompts.json",
                      {"round": r, "seed": seed, "on_policy": on_ids, "base": base_ids})
    gen_sha = weights_sha256(start.generator)
    run_stage(GenerateStage(start, seed, base_source(run_dir), on_ids, gen_sha), run_dir, cfg, force=force,
              progress=progress)
    run_stage(RoundCacheStage(r), run_dir, cfg, force=force, progress=progress)
    res = train_round(run_dir, cfg, start, seed, base_ids, force, progress)
    info = {"round": r, "seed": seed, "generator": {"model": str(start.generator), "weights_sha256": gen_sha},
            "init": str(start.init) if start.init else None, "previous": start.previous,
            "prompts": {"on_policy": len(on_ids), "base": len(base_ids) if cfg.on_policy.mix == "shuffle" else 0},
            "steps": res["steps"], "samples": res["scan"]["valid"], "final_checkpoint": res["final_checkpoint"],
            "fingerprints": {p: (StageDir(run_dir, part_dir(r, p)).read_manifest() or {}).get("fingerprint")
                             for p in PARTS}}
    atomic.write_json(run_dir / round_dir(r) / "round.json", info)
    return info


def run_on_policy(run_dir: Path | str, cfg: LlavadiConfig, *, force: bool = False, progress: bool = True) -> list[dict]:
    """Rounds 1..``on_policy.rounds`` in order (finished ones are checked against this config and skipped:
    their parts are no-ops); returns every round's ``round.json``."""
    run_dir = Path(run_dir)
    if not cfg.teacher.model:
        raise StageError("on-policy: no teacher: set teacher.model=DIR (the teacher that made the base cache)")
    if cfg.cache_teacher.engine == "vllm":
        raise StageError(VLLM_CACHE)
    out = []
    for r in range(1, cfg.on_policy.rounds + 1):
        if progress:
            print(f"[on-policy] round {r}/{cfg.on_policy.rounds}", file=sys.stderr, flush=True)
        out.append(run_round(run_dir, cfg, r, force=force, progress=progress))
    later = [r for r in done_rounds(run_dir) if r > cfg.on_policy.rounds]
    if later and progress:
        print(f"[on-policy] note: round(s) {later} finished earlier are kept (they were made after round "
              f"{cfg.on_policy.rounds})", file=sys.stderr)
    return out


def round_info(run_dir: Path, r: int) -> dict:
    p = Path(run_dir) / round_dir(r) / "round.json"
    return json.loads(p.read_text()) if p.exists() else {}
