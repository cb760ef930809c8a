"""Vocabulary identity shared by producer (cache-teacher) and consumer (train-student).

Prompt rendering and answer spans live in ``models/`` (``models.prompts``, ``models.adapter``)."""
from __future__ import annotations

import hashlib


def tokenizer_hash(tokenizer) -> str:
    """Identity of a vocabulary: token → id map plus special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    h = hashlib.sha256(repr(vocab).encode())
    h.update(repr(sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())).encode())
    return h.hexdigest()[:16]
