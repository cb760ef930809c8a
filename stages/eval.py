"""``llavadi eval``: score a model (the teacher or any student checkpoint).

1. **Answers** on held-out questions (``eval.data``, ``--data``): a LLaVA conversation file
   (.json list / .jsonl / .parquet; every human turn is asked with the *reference* history before
   it) or a LLaVA eval question file (JSONL of ``question_id``/``image``/``text``[/``category``],
   as read by LLaVA's ``model_vqa.py``; references in ``answer`` or VQA-style ``answers``). Rows are
   read by ingest's reader and validated by ingest's record validator: a bad row (malformed turns,
   a ``system`` turn, a missing image, …) is a reject with ingest's reason, written to
   ``eval/<name>.rejects.jsonl`` and counted; the rest are answered greedily (HF or vLLM engine).
   ``accuracy`` = VQA-style match after the standard answer normalisation (lower-case,
   punctuation, number words → digits, articles, contractions); ``exact_match`` = identical
   strings after stripping whitespace. Questions without a reference are answered, not scored.
   Every answer goes to ``eval/<name>.answers.jsonl`` (LLaVA's answers-file format). Images are
   read from ``eval.image_root`` (``--image-root``), else this run's ``ingest.image_root``.
2. **KL to the teacher and perplexity** on a held-out teacher cache (``eval.cache``): at every
   cached answer token, KL(teacher ‖ model) on the teacher's top-k + tail bucket and the
   model's cross-entropy; ``perplexity = exp(mean CE)``. The cache's sample images are read from
   ``eval.cache_image_root`` (``--cache-image-root``), else the image root of the run the cache
   belongs to (its ``config.yaml``).

Never a score over nothing: no valid question → ``EvalError`` (exit 2) before any model work; a
cache with no scorable sample → no KL/perplexity and a line in ``problems`` (exit 1).
Writes ``RUN/eval/<name>.json`` (name defaults to the model directory's name).
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..pipeline import atomic
from ..pipeline.config import LlavadiConfig, TeacherConfig

# --------------------------------------------------------------------------- normalisation
# After the official VQA evaluation script (Antol et al. 2015; VQA v2 eval code).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "im": "i'm", "isnt": "isn't", "itd": "it'd",
    "itll": "it'll", "ive": "i've", "shouldnt": "shouldn't", "thats": "that's", "theres": "there's",
    "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "werent": "weren't", "whats": "what's",
    "wont": "won't", "wouldnt": "wouldn't", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _punct(text: str) -> str:
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _digits_articles(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = NUMBER_WORDS.get(w, w)
        if w not in ARTICLES:
            words.append(CONTRACTIONS.get(w, w))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """VQA answer normalisation: ``" The Two dogs."`` → ``"2 dogs"``."""
    t = text.replace("\n", " ").replace("\t", " ").strip().lower()
    return _digits_articles(_punct(t))


def vqa_accuracy(pred: str, refs: list[str]) -> float:
    """VQA accuracy: min(#matching references / 3, 1); with one reference it is 0 or 1."""
    p = normalize_answer(pred)
    matches = sum(p == normalize_answer(r) for r in refs)
    return min(1.0, matches / 3.0) if len(refs) >= 3 else float(matches > 0)


# --------------------------------------------------------------------------- held-out questions
# Read through ingest's reader (``read_raw``) and record validator (``validate_record``): a
# held-out row passes exactly when ingest would take it, and a bad one is a reject with ingest's
# reason (``schemas.samples.REASONS``) plus these eval-only ones.
EVAL_REASONS = {
    "bad_question": "a LLaVA question-file record whose 'text' is not a non-empty string",
    "bad_answer": "'answer' / 'answers' is not a string / a list of strings (or of {'answer': string})",
}
ROOT_HINT = "wrong image folder? pass --cache-image-root DIR (eval.cache_image_root)"
NO_REFERENCE = "(no reference answer)"  # gpt turn of a question record without one (validation only)


class EvalError(RuntimeError):
    """Nothing to score (e.g. every held-out record rejected): the message says why and where."""

    def __init__(self, msg: str, exit_code: int = 2):
        super().__init__(msg)
        self.exit_code = exit_code


@dataclass
class Question:
    """One human turn to answer: the reference history before it ends with that turn."""

    question_id: Any  # the question file's question_id, or "<id>#<k>" (k-th human turn of a conversation)
    id: str  # record id
    image: Optional[str]
    history: list[dict]  # [{"from", "value"}], ending with the human turn
    refs: Optional[list[str]]  # reference answers; None = no reference (answered, not scored)
    category: Optional[str] = None


def is_question_record(rec) -> bool:
    """LLaVA's eval question-file format (``llava/eval/model_vqa*.py``): one JSON object per line
    with ``question_id``, ``image``, ``text`` (+ optional ``category``), no ``conversations``."""
    return isinstance(rec, dict) and "question_id" in rec and "conversations" not in rec


def _references(rec: dict) -> Optional[list[str]]:
    """Reference answers of a question record: ``answer`` (a string) or ``answers`` (VQA style:
    strings or ``{"answer": string}``); None when it has neither."""
    from ..schemas.samples import Reject

    def one(v):
        if isinstance(v, dict):
            v = v.get("answer")
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str) or not v.strip():
            raise Reject("bad_answer", f"reference {v!r:.80} is not a non-empty string")
        return v

    if "answer" in rec:
        return [one(rec["answer"])]
    if "answers" in rec:
        if not isinstance(rec["answers"], list) or not rec["answers"]:
            raise Reject("bad_answer", f"'answers' is {type(rec['answers']).__name__}, not a non-empty list")
        return [one(v) for v in rec["answers"]]
    return None


def question_to_record(rec: dict) -> tuple[dict, Optional[list[str]]]:
    """A question-file record → (a LLaVA conversation record for ingest's validator, references).
    As LLaVA's ``model_vqa.py`` does, ``<image>\\n`` is put before the text when an image is given."""
    from ..schemas.samples import IMAGE_TOKEN, Reject

    text = rec.get("text")
    if not isinstance(text, str) or not text.strip():
        raise Reject("bad_question", f"'text' is {text!r:.80}")
    refs = _references(rec)
    image = rec.get("image")
    human = text if image is None or IMAGE_TOKEN in text else f"{IMAGE_TOKEN}\n{text}"
    conv = [{"from": "human", "value": human}, {"from": "gpt", "value": refs[0] if refs else NO_REFERENCE}]
    return {"id": rec["question_id"], "image": image, "conversations": conv}, refs


def read_questions(data: str, image_root: Optional[str], max_chars: int, check_images: bool = True,
                   limit: int = 0) -> tuple[list[Question], list[dict], int]:
    """(questions, rejects, records read) of a held-out file: a LLaVA conversation file (.json
    list / .jsonl / .parquet: one question per human turn, the next gpt turn is the reference) or a
    LLaVA question file. Every record goes through ingest's validator; duplicate ids: the first
    one wins (as in ingest). ``limit`` > 0 stops after that many questions."""
    from ..schemas.samples import GPT, HUMAN, Reject, reject_entry, validate_record
    from .ingest_reader import _id_key, read_raw

    root = Path(image_root) if image_root else None
    qs: list[Question] = []
    rejects: list[dict] = []
    seen: set[str] = set()
    n = 0
    for item in read_raw(data):
        if limit and len(qs) >= limit:
            break
        n += 1
        rec = item.get("record")
        qrec = is_question_record(rec)
        try:
            if "reject" in item:
                raise Reject(item["reject"], item.get("detail", ""))
            refs = None
            if qrec:
                rec, refs = question_to_record(rec)
            key = _id_key(rec)
            if key is not None:
                if key in seen:
                    raise Reject("duplicate_id", f"id {key!r} already seen")
                seen.add(key)
            row = validate_record(rec, root, max_chars, check_images)
        except Reject as r:
            rejects.append(reject_entry(item["source"], _id_key(rec) if rec is not None else None, r.reason, r.detail,
                                        item.get("raw")))
            continue
        conv = row["conversations"]
        k = 0
        for i in range(len(conv) - 1):  # by role, not by parity: whatever turns ingest accepts
            if conv[i]["from"] == HUMAN and conv[i + 1]["from"] == GPT:
                qs.append(Question(
                    item["record"]["question_id"] if qrec else f"{row['id']}#{k}", row["id"], row["image"],
                    conv[: i + 1], refs if qrec else [conv[i + 1]["value"]],
                    item["record"].get("category") if qrec else None))
                k += 1
    if limit:
        qs = qs[:limit]
    return qs, rejects, n


def data_image_root(cfg: LlavadiConfig) -> Optional[str]:
    """Image folder of ``--data``: ``eval.image_root`` (``--image-root``), else this run's
    ``ingest.image_root``."""
    return cfg.eval.image_root or cfg.ingest.image_root


def cache_image_root(cfg: LlavadiConfig) -> tuple[Optional[str], str]:
    """(image folder of ``--cache``'s samples, where it came from): ``eval.cache_image_root``
    (``--cache-image-root``), else the ``ingest.image_root`` of the run the cache belongs to (the
    folder its images were read from when it was made): ``pipeline.remote.samples_image_root``, the
    rule train-student's ``cache_from`` follows too."""
    from ..pipeline.remote import samples_image_root

    return samples_image_root(cfg.eval.cache_image_root, "eval.cache_image_root", str(Path(cfg.eval.cache).parent),
                              None)


def _reason_counts(rejects: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rejects:
        out[r["reason"]] = out.get(r["reason"], 0) + 1
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- model side


def eval_prompt_format(cfg: LlavadiConfig) -> str:
    """The evaluated model's prompt format: ``eval.prompt_format``, else ``train_student.prompt_format``."""
    return cfg.eval.prompt_format or cfg.train_student.prompt_format


def generate_answers(model_dir: str, cfg: LlavadiConfig, qs: list[Question]
                     ) -> tuple[list[Question], list[str], float, list[dict]]:
    """Greedy answers to ``qs`` (reference history before each turn): (the questions answered, their
    answers, generate seconds, rejects). A question the model cannot take — its prompt, image or
    processor (``image_placement``, ``special_token_in_text``, ``processor_error``, ``image_error``) or the
    engine on that question alone (``model_error``) — is a reject; the others are answered."""
    from ..models.engines.generate import GenRequest, make_engine
    from ..pipeline.config import SamplingConfig
    from ..schemas.samples import Reject
    from .regenerate import load_image

    e = cfg.eval
    root = data_image_root(cfg)
    engine = make_engine(e.engine, TeacherConfig(model=model_dir, prompt_format=eval_prompt_format(cfg)))
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=e.max_new_tokens)
    rejects: list[dict] = []

    def reject(q: Question, reason: str, detail: str) -> None:
        rejects.append({"id": q.id, "question_id": q.question_id, "reason": reason, "detail": detail[:500]})

    kept, reqs = [], []
    for q in qs:
        try:
            image = None
            if q.image:
                try:
                    image = load_image(root, q.image)
                except Exception as ex:  # noqa: BLE001
                    raise Reject("image_error", f"{q.image}: {type(ex).__name__}: {ex}") from None
            prompt = engine.adapter.prompt(q.history, image is not None)
            engine.adapter.prompt_inputs(prompt, image)  # the processor takes it (else processor_error)
        except Reject as r:
            reject(q, r.reason, r.detail)
            continue
        kept.append(q)
        reqs.append(GenRequest(prompt, image, 0))
    t0 = time.time()
    try:
        res = engine.generate(reqs, sampling) if reqs else []
    except Exception:  # noqa: BLE001 - find the question(s) the engine cannot take
        res = []
        for q, r in zip(list(kept), reqs):
            try:
                res.append(engine.generate([r], sampling)[0])
            except Exception as ex:  # noqa: BLE001
                reject(q, "model_error", f"{type(ex).__name__}: {ex}")
                res.append(None)
        kept = [q for q, r in zip(kept, res) if r is not None]
        res = [r for r in res if r is not None]
    secs = time.time() - t0
    preds = [engine.tokenizer.decode(r.token_ids, skip_special_tokens=True).strip() for r in res]
    return kept, preds, secs, rejects


def score_answers(qs: list[Question], preds: list[str]) -> dict:
    """``accuracy`` (VQA) and ``exact_match`` over the questions that have references; none
    when no question has one (an answers file is all such a file can give)."""
    scored = [(q, p) for q, p in zip(qs, preds) if q.refs is not None]
    out: dict = {"questions": len(qs), "scored": len(scored)}
    if scored:
        out["accuracy"] = sum(vqa_accuracy(p, q.refs) for q, p in scored) / len(scored)
        out["exact_match"] = sum(any(p.strip() == r.strip() for r in q.refs) for q, p in scored) / len(scored)
    out["examples"] = [{"id": q.question_id, "question": q.history[-1]["value"], "reference": q.refs,
                        "prediction": p} for q, p in list(zip(qs, preds))[:20]]
    return out


def answers_file_rows(qs: list[Question], preds: list[str], model_id: str) -> list[dict]:
    """LLaVA's answers-file rows (``model_vqa.py``): question_id, prompt, text, answer_id,
    model_id, metadata (references, category, record id / turn where known)."""
    from ..schemas.samples import IMAGE_TOKEN

    rows = []
    for q, p in zip(qs, preds):
        meta = {"id": q.id}
        if q.refs is not None:
            meta["references"] = q.refs
        if q.category is not None:
            meta["category"] = q.category
        aid = hashlib.sha256(f"{model_id}\0{q.question_id}".encode()).hexdigest()[:22]
        rows.append({"question_id": q.question_id, "prompt": q.history[-1]["value"].replace(IMAGE_TOKEN, "").strip(),
                     "text": p, "answer_id": aid, "model_id": model_id, "metadata": meta})
    return rows


def cache_scores(model_dir: str, cache_dir: str, image_root: Optional[str], rejects: Optional[list] = None,
                 prompt_format: str = "auto") -> dict:
    """KL(teacher‖model) on top-k + tail and perplexity over a held-out cache's answer tokens.
    ``image_root``: the folder of the cache's sample images; a sample whose image is missing there
    (or is not the image the cache was made from) is a reject, appended to ``rejects``."""
    import torch
    from transformers import AutoModelForImageTextToText

    from ..schemas.teacher_cache import read_index
    from ..schemas.teacher_cache.fields import POSITIONS
    from .train_student import losses
    from .train_student.batch import CollatePlan, row_key
    from .train_student.data import StepDataset, stream_samples, student_tokens

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    st = student_tokens(model_dir, prompt_format)
    run_dir = Path(cache_dir).parent
    have = {f["name"] for f in read_index(cache_dir)["meta"].get("fields", [])}
    teacher = ("topk_ids", "topk_logprobs") if "topk_ids" in have else ("hidden",) if "hidden" in have else ()
    answer = POSITIONS["answer"]  # KL and perplexity at the answer tokens, whatever rows the cache keeps
    ds = StepDataset(run_dir, st, image_root, batch_size=1, micro_batch_size=1, rank=0, world=1, seed=0, epoch=0,
                     shuffle_buffer=1, plan=CollatePlan(((answer, ("kind", "token_ids") + teacher),)))
    kl = ce = 0.0
    n = samples = 0
    rejects = [] if rejects is None else rejects
    batch: list = []
    head_t = _teacher_head(cache_dir)
    kl_from = None  # "topk" (top-k + tail bucket) or "exact" (the cached final hidden states + teacher head)

    def run(items):
        nonlocal kl, ce, n, samples, kl_from
        mb = ds.collate(items, root_hint=ROOT_HINT)
        rejects.extend(mb["rejects"])
        samples += len(mb["sample_ids"])
        if not mb["sample_ids"]:
            return
        s = mb["sets"][row_key(answer)]
        with torch.inference_mode():
            out = model.model(**mb["inputs"])
            h = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])[s["rows"]]
            logits = model.get_output_embeddings()(h).float()
            ce += float(torch.nn.functional.cross_entropy(logits, s["token_ids"], reduction="sum"))
            if "topk_ids" in s:
                kl_from = "topk"
                kl += float(losses.topk_kd_loss(logits, s["topk_ids"], s["topk_logprobs"], reduction="sum"))
            elif "hidden" in s and head_t is not None and head_t["weight"].shape[0] == logits.shape[1]:
                kl_from = "exact"
                t = s["hidden"].float() @ head_t["weight"].float().T
                if head_t.get("bias") is not None:
                    t = t + head_t["bias"].float()
                kl += float(torch.nn.functional.kl_div(torch.log_softmax(logits, -1), torch.log_softmax(t, -1),
                                                       log_target=True, reduction="sum"))
        n += len(s["token_ids"])

    # images checked against their recorded sha256 here, once; collate reads them again (and drops a
    # sample whose image changed since: run() adds its reject)
    for it in stream_samples(run_dir, st, rejects, image_root=image_root, root_hint=ROOT_HINT):
        batch.append(it)
        if len(batch) == 16:
            run(batch)
            batch = []
    if batch:
        run(batch)
    out = {"cache": str(cache_dir), "cache_samples": samples, "answer_tokens": n,
           "cache_rejected": len(rejects), "cache_rejects": _reason_counts(rejects)}
    if n:  # never a score over nothing
        out["perplexity"] = math.exp(ce / n)
        if kl_from:
            out.update(kl_to_teacher=kl / n, kl_from=kl_from)
        else:
            out["kl_unavailable"] = ("the cache holds neither top-k log-probs nor final hidden states the model's "
                                     "vocabulary can use (cache_teacher.logits / hidden_layers)")
    return out


def _teacher_head(cache_dir: str):
    """The cache's ``teacher_head.safetensors`` (``{"weight"[, "bias"]}``) or None."""
    p = Path(cache_dir) / "teacher_head.safetensors"
    if not p.exists():
        return None
    from safetensors.torch import load_file

    return load_file(p)


# --------------------------------------------------------------------------- the command


def evaluate(run_dir: Path | str, cfg: LlavadiConfig, model_dir: str, name: Optional[str] = None) -> dict:
    """Score ``model_dir`` on ``eval.data`` and/or ``eval.cache``; writes ``RUN/eval/<name>.json``
    (+ ``<name>.rejects.jsonl``, ``<name>.answers.jsonl`` for ``--data``, ``<name>.cache_rejects.jsonl``
    for ``--cache``). Raises ``EvalError`` before any model work when ``--data`` has no valid question.
    A part that could score nothing gets no score and a line in ``problems``."""
    run_dir = Path(run_dir)
    name = name or Path(model_dir).name
    out_dir = run_dir / "eval"
    files = {k: out_dir / f"{name}.{k}.jsonl" for k in ("rejects", "answers", "cache_rejects")}
    out: dict = {"model": os.path.abspath(model_dir), "name": name}
    problems: list[str] = []
    t0 = time.time()
    qs: list[Question] = []
    if cfg.eval.data:
        root = data_image_root(cfg)
        qs, rejects, n_read = read_questions(cfg.eval.data, root, cfg.ingest.max_chars, cfg.ingest.check_images,
                                             cfg.eval.max_samples)
        atomic.write_jsonl(files["rejects"], rejects)
        if not qs:
            counts = ", ".join(f"{k} {v}" for k, v in _reason_counts(rejects).items()) or "the file holds no record"
            raise EvalError(f"eval: no question in {cfg.eval.data} can be scored: {n_read} records read, "
                            f"{len(rejects)} rejected ({counts}); see {files['rejects']}"
                            + ("" if root else "; no image root: pass --image-root"))
    for k in ("rejects", "answers") if not cfg.eval.data else ():
        files[k].unlink(missing_ok=True)  # never leave another evaluation's files beside this result
    if not cfg.eval.cache:
        files["cache_rejects"].unlink(missing_ok=True)

    if cfg.eval.data:
        qs, preds, secs, model_rejects = generate_answers(model_dir, cfg, qs)
        if model_rejects:
            rejects += model_rejects
            atomic.write_jsonl(files["rejects"], rejects)
        if not qs:
            raise EvalError(f"eval: no question in {cfg.eval.data} could be answered: {len(rejects)} rejected "
                            f"({', '.join(f'{k} {v}' for k, v in _reason_counts(rejects).items())}); "
                            f"see {files['rejects']}")
        atomic.write_jsonl(files["answers"], answers_file_rows(qs, preds, name))
        a = {"data": str(cfg.eval.data), "image_root": root, **score_answers(qs, preds),
             "rejected": len(rejects), "rejects": _reason_counts(rejects), "rejects_file": str(files["rejects"]),
             "answers_file": str(files["answers"]), "generate_seconds": round(secs, 2)}
        if "accuracy" not in a:
            a["no_score"] = "no question has a reference answer ('answer'/'answers' field): answers written, not scored"
        out["answers"] = a
    if cfg.eval.cache:
        root, where = cache_image_root(cfg)
        crej: list[dict] = []
        c = cache_scores(model_dir, cfg.eval.cache, root, crej, eval_prompt_format(cfg))
        atomic.write_jsonl(files["cache_rejects"], crej)
        c.update(image_root=root, image_root_from=where, rejects_file=str(files["cache_rejects"]))
        if "perplexity" not in c:
            problems.append(f"no sample of the teacher cache {cfg.eval.cache} could be scored "
                            f"({len(crej)} rejected: {', '.join(f'{k} {v}' for k, v in c['cache_rejects'].items())}); "
                            f"see {files['cache_rejects']}")
        out["teacher_cache"] = c
    if problems:
        out["problems"] = problems
    out["seconds"] = round(time.time() - t0, 2)
    atomic.write_json(out_dir / f"{name}.json", out)
    return out


def summary(res: dict, run_dir: Path | str) -> str:
    """What ``llavadi eval`` prints: only the metrics it has, and what was rejected."""

    def rej(d: dict, n: int, path: str) -> str:
        return f"{n} rejected" + (f" ({', '.join(f'{k} {v}' for k, v in d.items())}) → {path}" if n else "")

    lines = [f"eval {res['name']} → {Path(run_dir) / 'eval' / (res['name'] + '.json')}"]
    a, c = res.get("answers"), res.get("teacher_cache")
    if a:
        if "accuracy" in a:
            of = f" (of {a['questions']} answered)" if a["scored"] != a["questions"] else ""
            head = f"accuracy {a['accuracy']:.3f}, exact match {a['exact_match']:.3f} on {a['scored']} questions{of}"
        else:
            head = f"{a['questions']} questions answered, no score: the file has no reference answers"
        lines.append(f"  answers: {head}; {rej(a['rejects'], a['rejected'], a['rejects_file'])}; "
                     f"answers → {a['answers_file']}")
    if c:
        kl = f"KL to teacher {c['kl_to_teacher']:.4f}, " if "kl_to_teacher" in c else ""
        head = (f"{kl}perplexity {c['perplexity']:.3f} over {c['answer_tokens']} answer tokens of "
                f"{c['cache_samples']} samples" + (f" (no KL: {c['kl_unavailable']})" if "kl_unavailable" in c else "")
                if "perplexity" in c else "no score: no sample could be scored")
        lines.append(f"  teacher cache: {head}; {rej(c['cache_rejects'], c['cache_rejected'], c['rejects_file'])}")
    for p in res.get("problems", []):
        lines.append(f"  problem: {p}")
    return "\n".join(lines)


def preflight(cfg: LlavadiConfig, model_dir: Optional[str]) -> list[str]:
    from .ingest_reader import _first_byte, _kind

    p = []
    if not model_dir or not os.path.exists(os.path.join(model_dir, "config.json")):
        p.append(f"--model {model_dir!r} is not a model directory (save_pretrained, with its processor)")
    else:
        from ..models.adapter import check_model, vllm_support

        adapter, problems = check_model(model_dir, eval_prompt_format(cfg), "--model", "eval.prompt_format")
        p += problems
        if adapter is not None and cfg.eval.engine == "vllm" and (why := vllm_support(model_dir)):
            p.append(f"--model cannot run on vLLM here: {why}; use --engine hf")
    if not cfg.eval.data and not cfg.eval.cache:
        p.append("nothing to evaluate: pass --data FILE (held-out questions) and/or --cache DIR (a held-out teacher cache)")
    if cfg.eval.data:
        if not os.path.isfile(cfg.eval.data):
            p.append(f"eval.data {cfg.eval.data} does not exist")
        elif _kind(cfg.eval.data) is None:
            p.append(f"eval.data {cfg.eval.data}: unknown type; use a LLaVA .json list, .jsonl or .parquet, or a LLaVA "
                     f"question file (.jsonl of question_id/image/text)")
        elif _kind(cfg.eval.data) == "json" and _first_byte(cfg.eval.data) != b"[":
            p.append(f"eval.data {cfg.eval.data} is not a JSON list of records; for one record per line name it .jsonl")
        root = data_image_root(cfg)
        if root and not os.path.isdir(root):
            p.append(f"image root of --data {root} is not a directory (--image-root / eval.image_root)")
    if cfg.eval.cache:
        if not os.path.exists(os.path.join(cfg.eval.cache, "index.json")):
            p.append(f"eval.cache {cfg.eval.cache} has no index.json: run `llavadi cache-teacher` on the held-out run first")
        else:
            from ..schemas.teacher_cache import CacheVersionError, read_index

            try:
                read_index(cfg.eval.cache)
            except CacheVersionError as e:
                p.append(str(e))
            root, where = cache_image_root(cfg)
            if root and not os.path.isdir(root):
                p.append(f"image root of --cache {root} (from {where}) is not a directory: pass --cache-image-root DIR")
    return p
