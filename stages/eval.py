"""``llavadi eval``: score a model (the teacher or any student checkpoint).

1. **Answers** on a held-out LLaVA file (``eval.data``): every human turn is asked with the
   *reference* history before it, the model answers greedily (HF or vLLM engine), and the answer
   is scored against the reference: ``accuracy`` = VQA-style match after the standard answer
   normalisation (lower-case, punctuation, number words → digits, articles, contractions);
   ``exact_match`` = identical strings after stripping whitespace.
2. **KL to the teacher and perplexity** on a held-out teacher cache (``eval.cache``): at every
   cached answer token, KL(teacher ‖ model) on the teacher's top-k + tail bucket and the
   model's cross-entropy; ``perplexity = exp(mean CE)``.

Writes ``RUN/eval/<name>.json`` (name defaults to the model directory's name).
"""
from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Optional

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


# --------------------------------------------------------------------------- evaluation


def _questions(data: str, limit: int):
    """(id, image, history turns ending with the human turn, reference answer) per human turn."""
    from .ingest import read_raw

    n = 0
    for item in read_raw(data):
        rec = item.get("record")
        if not isinstance(rec, dict):
            continue
        conv = rec.get("conversations") or []
        for t in range(0, len(conv) - 1, 2):
            yield rec.get("id"), rec.get("image"), conv[: t + 1], conv[t + 1]["value"]
            n += 1
            if limit and n >= limit:
                return


def answer_scores(model_dir: str, cfg: LlavadiConfig) -> dict:
    from ..pipeline.config import SamplingConfig
    from ..pipeline.teacher_engines import GenRequest, make_engine
    from ..schemas.conversation import render_prompt
    from .regenerate import load_image

    e = cfg.eval
    root = e.image_root or cfg.ingest.image_root
    engine = make_engine(e.engine, TeacherConfig(model=model_dir))
    qs = list(_questions(e.data, e.max_samples))
    reqs = [GenRequest(render_prompt(engine.tokenizer, hist), load_image(root, img) if img else None, 0)
            for _, img, hist, _ in qs]
    t0 = time.time()
    res = engine.generate(reqs, SamplingConfig(temperature=0.0, max_new_tokens=e.max_new_tokens))
    secs = time.time() - t0
    preds = [engine.tokenizer.decode(r.token_ids, skip_special_tokens=True).strip() for r in res]
    acc = [vqa_accuracy(p, [ref]) for p, (_, _, _, ref) in zip(preds, qs)]
    em = [float(p.strip() == ref.strip()) for p, (_, _, _, ref) in zip(preds, qs)]
    return {"questions": len(qs), "accuracy": sum(acc) / max(1, len(acc)), "exact_match": sum(em) / max(1, len(em)),
            "generate_seconds": round(secs, 2),
            "examples": [{"id": i, "question": h[-1]["value"], "reference": ref, "prediction": p}
                         for (i, _, h, ref), p in list(zip(qs, preds))[:20]]}


def cache_scores(model_dir: str, cache_dir: str, image_root: Optional[str]) -> dict:
    """KL(teacher‖model) on top-k + tail and perplexity over a held-out cache's answer tokens."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .train_student import losses
    from .train_student.data import StepDataset, stream_samples, student_tokens

    proc = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    st = student_tokens(proc, model_dir)
    run_dir = Path(cache_dir).parent
    ds = StepDataset(run_dir, st, image_root, batch_size=1, micro_batch_size=1, rank=0, world=1, seed=0, epoch=0,
                     shuffle_buffer=1)
    kl = ce = 0.0
    n = samples = 0
    rejects: list = []
    batch: list = []

    def run(items):
        nonlocal kl, ce, n
        mb = ds.collate(items)
        with torch.inference_mode():
            out = model.model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                              pixel_values=mb["pixel_values"])
            h = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])[mb["rows"]]
            logits = model.get_output_embeddings()(h).float()
            ce += float(torch.nn.functional.cross_entropy(logits, mb["targets"], reduction="sum"))
            kl += float(losses.topk_kd_loss(logits, mb["t_topk_ids"], mb["t_topk_logprobs"], reduction="sum"))
        n += len(mb["targets"])

    ds._processor()
    for it in stream_samples(run_dir, ds._tok, st, rejects):
        batch.append(it)
        samples += 1
        if len(batch) == 16:
            run(batch)
            batch = []
    if batch:
        run(batch)
    return {"cache": str(cache_dir), "cache_samples": samples, "answer_tokens": n,
            "kl_to_teacher": kl / max(1, n), "perplexity": math.exp(ce / max(1, n)), "cache_rejected": len(rejects)}


def evaluate(run_dir: Path | str, cfg: LlavadiConfig, model_dir: str, name: Optional[str] = None) -> dict:
    run_dir = Path(run_dir)
    name = name or Path(model_dir).name
    out = {"model": os.path.abspath(model_dir), "name": name}
    t0 = time.time()
    if cfg.eval.data:
        out["answers"] = answer_scores(model_dir, cfg)
    if cfg.eval.cache:
        out["teacher_cache"] = cache_scores(model_dir, cfg.eval.cache, cfg.eval.image_root or cfg.ingest.image_root)
    out["seconds"] = round(time.time() - t0, 2)
    atomic.write_json(run_dir / "eval" / f"{name}.json", out)
    return out


def preflight(cfg: LlavadiConfig, model_dir: Optional[str]) -> list[str]:
    p = []
    if not model_dir or not os.path.exists(os.path.join(model_dir, "config.json")):
        p.append(f"--model {model_dir!r} is not a model directory (save_pretrained, with its processor)")
    if not cfg.eval.data and not cfg.eval.cache:
        p.append("nothing to evaluate: pass --data FILE (held-out questions) and/or --cache DIR (a held-out teacher cache)")
    if cfg.eval.data and not os.path.isfile(cfg.eval.data):
        p.append(f"eval.data {cfg.eval.data} does not exist")
    if cfg.eval.cache and not os.path.exists(os.path.join(cfg.eval.cache, "index.json")):
        p.append(f"eval.cache {cfg.eval.cache} has no index.json: run `llavadi cache-teacher` on the held-out run first")
    return p
