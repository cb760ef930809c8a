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
