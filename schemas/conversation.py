"""LLaVA turns ↔ chat messages, rendered with the model's *own* chat template (design §4).

Used by regenerate (prompt for turn t, conditioned on the teacher's earlier answers), by
cache-teacher and train-student (where the answer tokens of a whole conversation are).
"""
from __future__ import annotations

import hashlib
from typing import Sequence

ROLE = {"human": "user", "gpt": "assistant"}


def to_messages(turns: Sequence[dict]) -> list[dict]:
    """``[{"from": "human"|"gpt", "value"}]`` → ``[{"role": "user"|"assistant", "content"}]``.
    ``<image>`` stays inline in the text: the processor / vLLM expands it to image tokens."""
    return [{"role": ROLE[t["from"]], "content": t["value"]} for t in turns]


def render_prompt(tokenizer, turns: Sequence[dict]) -> str:
    """Prompt text for the next assistant answer after ``turns`` (which end with a human turn)."""
    return tokenizer.apply_chat_template(to_messages(turns), tokenize=False, add_generation_prompt=True)


def n_human_turns(turns: Sequence[dict]) -> int:
    return sum(t["from"] == "human" for t in turns)


def template_hash(tokenizer) -> str:
    return hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()[:16]


def tokenizer_hash(tokenizer) -> str:
    """Identity of a vocabulary: token → id map plus special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    h = hashlib.sha256(repr(vocab).encode())
    h.update(repr(sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())).encode())
    return h.hexdigest()[:16]


def expand_image_tokens(ids: Sequence[int], image_token_id: int, n: int) -> list[int]:
    """Replace each image placeholder id by ``n`` copies (what the processor / vLLM do)."""
    out: list[int] = []
    for t in ids:
        if t == image_token_id:
            out.extend([image_token_id] * n)
        else:
            out.append(t)
    return out


def tokenize_conversation(tokenizer, turns: Sequence[dict], image_token_id: int, image_seq_len: int
                          ) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the whole conversation (image placeholder expanded to ``image_seq_len``
    tokens, one BOS) and the ``[start, end)`` span of every assistant answer in them.

    The answer of turn t is ``ids(render(turns[:2t+2]))[len(ids(prompt_t)):]`` — its text plus the
    template's end-of-turn token (``</s>`` for Vicuna). Raises ``Reject("token_mismatch")`` when
    the prompt's ids are not a prefix of prompt+answer ids, or a turn's ids are not a prefix of
    the whole conversation's (a tokenizer merging across the boundary) — the answer tokens
    would then be ill-defined.
    """
    from .samples import Reject

    def ids(text: str) -> list[int]:
        return expand_image_tokens(tokenizer(text, add_special_tokens=True)["input_ids"], image_token_id, image_seq_len)

    msgs = to_messages(turns)
    full = ids(tokenizer.apply_chat_template(msgs, tokenize=False))
    spans = []
    for t in range(len(turns) // 2):
        p = ids(tokenizer.apply_chat_template(msgs[: 2 * t + 1], tokenize=False, add_generation_prompt=True))
        pa = ids(tokenizer.apply_chat_template(msgs[: 2 * t + 2], tokenize=False))
        if pa[: len(p)] != p:
            raise Reject("token_mismatch", f"turn {t}: prompt ids are not a prefix of prompt+answer ids")
        if full[: len(pa)] != pa:
            raise Reject("token_mismatch", f"turn {t}: prompt+answer ids are not a prefix of the conversation's ids")
        if len(pa) == len(p):
            raise Reject("token_mismatch", f"turn {t}: the answer has no tokens")
        spans.append((len(p), len(pa)))
    return full, spans


def answer_positions(spans: Sequence[tuple[int, int]]) -> list[int]:
    """Positions whose *next-token* logits predict the answer tokens: ``p - 1`` for each answer
    token at position ``p``."""
    return [p - 1 for a, b in spans for p in range(a, b)]
