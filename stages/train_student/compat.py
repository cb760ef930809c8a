"""What must agree before ``llavadi train-student`` does any work (``preflight``), and where the cache's
sample images are (``image_root``).

**Vocabulary** (issue #22 class 4). The cache can hold two kinds of ids: answer tokens (``token_ids``:
ids of the tokenizer) and the teacher's top-k ids (rows of the teacher's head, ``index.json``
``vocab_size``, which a padded head makes larger than the tokenizer: llava-1.5-hf has 32064 rows for
32002 tokens). Decided here from those ranges and the heads' shapes, on a meta-device student:

- same tokenizer (hash of its token → id map): else refused;
- every tokenizer id must be a row of the student's head (``student rows ≥ max id + 1``): else refused,
  naming both sizes — an answer token the student has no logit for cannot be trained on;
- top-k path (``kd.exact=false``): a teacher head with more rows than the student's is accepted; a
  cached top-k id the student lacks is no bucket, its teacher mass joins the tail bucket
  (``divergences._out_of_range``: the divergence stays exact between the two distributions coarsened to
  {each in-range top-k id, everything else});
- exact path (``kd.exact=true``): the student's head ``[V, Hs]`` and ``teacher_head.safetensors``'s
  ``[V', Ht]`` must have ``V == V'`` (the full distributions are compared id by id): else refused,
  naming both shapes.

**Image root** (issue #22 class 8): ``pipeline.remote.samples_image_root`` — ``train_student.cache_image_root``
if set, else with ``train_student.cache_from`` the ``ingest.image_root`` of that run (its samples were
made from those images), else this run's ``ingest.image_root``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ...pipeline.config import LlavadiConfig
from ...pipeline.rundir import StageDir
from ...schemas.conversation import tokenizer_hash
from ...schemas.teacher_cache import CacheReader, CacheVersionError
from . import head, lora

ROOT_HINT = "wrong image folder? set train_student.cache_image_root=DIR (the folder holding the cache's sample images)"


def image_root(cfg: LlavadiConfig) -> tuple[Optional[str], str]:
    """(folder of the training samples' images, where that came from): module docstring."""
    from ...pipeline.remote import samples_image_root

    c = cfg.train_student
    return samples_image_root(c.cache_image_root, "train_student.cache_image_root", c.cache_from, cfg.ingest.image_root)


def preflight(run_dir: Path, cfg: LlavadiConfig) -> tuple[list[str], Optional[str]]:
    """(problems found before any model loads, the cache's fingerprint): cache present and complete, student
    path, family and freeze/LoRA settings, vocabulary and head sizes (module docstring), image root."""
    p = []
    c = cfg.train_student
    up = StageDir(run_dir, "cache_teacher")
    m = up.read_manifest()
    up_fp = m.get("fingerprint") if m else None
    if m is None or not (up.path / "index.json").exists() or not m.get("complete"):
        p.append(f"train-student reads the teacher cache {up.path}, which is missing or incomplete: "
                 f"run `llavadi cache-teacher {run_dir}` first")
    if not c.student or not os.path.exists(os.path.join(c.student, "config.json")):
        p.append(f"train_student.student={c.student!r} is not a model directory: pass --student DIR "
                 f"(a save_pretrained model of a supported family, with its processor)")
    if p:
        return p, up_fp
    try:
        model = meta_student(c.student)
    except Exception as e:  # noqa: BLE001 - a config transformers cannot build: say so, no traceback
        return [f"train_student.student={c.student}: transformers cannot build the model from its config.json "
                f"({type(e).__name__}: {e})"], up_fp
    p += student_problems(c, model)
    if p:
        return p, up_fp
    try:
        meta = CacheReader(up.path, verify=False).meta
    except CacheVersionError as e:  # a cache of an older format: the message names the rebuild command
        return [str(e)], up_fp
    p += vocab_problems(c, meta, up.path, model)
    p += term_problems(cfg, meta, run_dir)
    root, where = image_root(cfg)
    if root and not os.path.isdir(root):
        p.append(f"the cache's sample images are read from {root} (from {where}), which is not a directory: "
                 f"set train_student.cache_image_root=DIR to the folder holding them")
    return p, up_fp


def term_problems(cfg: LlavadiConfig, meta: dict, run_dir: Path) -> list[str]:
    """The declared terms against the cache (``terms.problems``: fields and row kinds, naming the
    ``cache_teacher`` key), then — for terms at prompt or image rows, or the affinity — a probe of the first
    cached samples through the student: when none of them aligns (``rows.align``: another image-token count,
    other prompt tokens), the pair cannot train those terms and is refused, saying which and what still works."""
    from .terms import build_terms, problems

    terms = build_terms(cfg.train_student, meta)
    out = problems(terms, meta, run_dir)
    return out or alignment_problems(cfg, run_dir, terms)


PROBE_SAMPLES = 4


def alignment_problems(cfg: LlavadiConfig, run_dir: Path, terms: list) -> list[str]:
    from ...schemas.samples import sample_image
    from ...schemas.teacher_cache.fields import POSITIONS
    from .batch import CollatePlan, collate
    from .data import load_adapter, stream_samples, student_tokens
    from .terms import row_sets

    sets = tuple((k, ()) for k in row_sets(terms) if k != POSITIONS["answer"])
    aff = any(t.name == "aff" for t in terms)
    if not sets and not aff:
        return []
    c = cfg.train_student
    imaged = aff or any(0 in k for k, _ in sets)
    root = image_root(cfg)[0]
    adapter = load_adapter(c.student, c.prompt_format)
    probe = []
    for it in stream_samples(run_dir, student_tokens(c.student, c.prompt_format), image_root=root):
        if it["row"]["image"] is not None or not imaged:
            probe.append(it)
        if len(probe) == PROBE_SAMPLES:
            break

    def load(row, decode=True):
        return sample_image(root, row, run_dir=run_dir, decode=decode)

    res = collate(adapter, probe, CollatePlan(sets, aff), load)
    aligned = {r["reason"] for r in res["rejects"]} & {"image_token_count", "prompt_mismatch"}
    if not probe or res["sample_ids"] or not aligned:
        return []
    r = next(x for x in res["rejects"] if x["reason"] in aligned)
    readers = [t.name for t in terms if (t.name == "aff" or (0 in t.kinds if r["reason"] == "image_token_count"
                                                                       else 1 in t.kinds))]
    what = ("the image expands into another number of tokens in the student than in the teacher"
            if r["reason"] == "image_token_count" else "the student renders other prompt tokens than the teacher")
    return [f"train_student: {what} ({r['detail']}; none of the first {len(probe)} cached samples aligns): the "
            f"{', '.join(readers)} term(s) cannot train this pair. Keep them at the answer rows "
            f"(train_student.kd.positions=answer, train_student.feature.positions=answer, affinity_weight=0): the "
            f"answer-token losses still apply"]


def meta_student(path: str):
    """The student's model on the meta device (architecture and shapes, no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path))


def student_problems(c, model=None) -> list[str]:
    """The student is of a supported family, its prompt format renders, every ``freeze_*`` that is on matches
    parameters, the LoRA settings hold and the fused head loss can read its LM head (``model``: a meta-device
    student, built when not given; it is wrapped in place by the LoRA check)."""
    from ...models import family_of
    from ...models.adapter import check_model
    from .setup import frozen_parameters

    _, problems = check_model(c.student, c.prompt_format, "train_student.student", "train_student.prompt_format")
    if problems:
        return problems
    model = meta_student(c.student) if model is None else model
    try:
        frozen_parameters(model, family_of(c.student), c)
    except ValueError as e:
        return [f"train_student.freeze_*: {e}"]
    if not c.lora.enabled:
        return [f"train_student.student: {x}" for x in head.problems(model.get_output_embeddings())]
    return lora.problems(model, family_of(c.student), c)


def vocab_problems(c, meta: dict, cache_dir: Path, model) -> list[str]:
    """Tokenizer, head rows and (``kd.exact``) head shapes of the student (``model``, meta device) against the
    cache (``meta``: its ``index.json``): module docstring. Each problem names both sizes."""
    from transformers import AutoTokenizer

    p = []
    tok = AutoTokenizer.from_pretrained(c.student)
    if tokenizer_hash(tok) != meta["tokenizer_sha256"]:
        return [f"the student's vocabulary ({c.student}) differs from the teacher's "
                f"(tokenizer hash {tokenizer_hash(tok)} vs the cache's {meta['tokenizer_sha256']}): "
                f"distillation needs the same tokenizer; pick a student built on the teacher's vocabulary"]
    rows, hs = (int(x) for x in model.get_output_embeddings().weight.shape)
    ids = max(tok.get_vocab().values()) + 1
    if rows < ids:
        p.append(f"the student's LM head has {rows} rows but the tokenizer it shares with the teacher has ids up to "
                 f"{ids - 1} ({ids} ids): cached answer tokens ≥ {rows} have no student logit; use a student whose "
                 f"head covers the tokenizer (transformers' resize_token_embeddings({ids}))")
    if c.kd_weight > 0 and c.kd.exact:
        from safetensors import safe_open

        with safe_open(str(Path(cache_dir) / meta.get("head_file", "teacher_head.safetensors")), "pt") as f:
            t_rows, t_h = f.get_slice("weight").get_shape()
        if rows != t_rows:
            p.append(f"train_student.kd.exact compares the full distributions id by id and needs heads with the same "
                     f"rows: student head [{rows}, {hs}], teacher head [{t_rows}, {t_h}] "
                     f"({Path(cache_dir) / meta.get('head_file', 'teacher_head.safetensors')}); use kd.exact=false "
                     f"(top-k + tail: teacher rows the student lacks join the tail bucket) or a student with "
                     f"{t_rows} head rows")
    return p
