"""The demo's small vocabulary: a LLaMA-style BPE tokenizer trained with the ``tokenizers`` library
on the demo's own text (LLaVA's system prompt, the Vicuna v1 role words, the synthetic task's
questions and answers) plus every printable ASCII character, so any ASCII text still tokenises.

Why: with LLaMA-2's 32 000-token vocabulary the LM head of a 1M-parameter demo teacher costs ~4×
its transformer layers per token, and its embeddings alone are 16 MB — a demo teacher trained to
≥ 85 % has to ship in ≤ 10 MB and the demo must fit 20 minutes on 2 cores (issue #14). The test
suite keeps its LLaMA-2-vocabulary tiny models, so the 32k paths stay tested.

Layout as LLaMA's ``tokenizer.json`` (transformers' non-legacy ``LlamaConverter``): BPE with
``<unk>``/``<s>``/``</s>`` at ids 0/1/2, a ``▁`` Metaspace pre-tokenizer that prepends ``▁`` to the
first word only, a post-processor that adds ``<s>``; then ``<image>`` and ``<pad>`` as added special
tokens, as llava-1.5-hf adds them. Same input → same file, byte for byte (tested).
"""
from __future__ import annotations

import string

from .synthetic_vqa import COLOURS, NUMBER_WORDS, SHAPES, corpus_lines

SPECIAL = ["<unk>", "<s>", "</s>"]
# the BPE trainer stops early when no pair is left to merge; ~every demo word becomes one token
VOCAB_SIZE = 448


def training_lines(system: str) -> list[str]:
    """Text the demo tokenizer is trained on: every prompt piece the demo renders."""
    lines = [system, "USER:", "ASSISTANT:", " USER: ", " ASSISTANT: "]
    lines += corpus_lines()
    lines += list(COLOURS) + list(SHAPES) + list(NUMBER_WORDS)
    return lines


def build_demo_tokenizer(system: str, image_token: str = "<image>", pad_token: str = "<pad>"):
    """A ``PreTrainedTokenizerFast`` (padding left, like the LLaMA-2 one the tiny models use).

    Raises ``AssertionError`` if the trained vocabulary does not put the special tokens where
    LLaMA has them (``<unk>``=0, ``<s>``=1, ``</s>``=2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    alphabet = sorted(set(string.printable) - set("\x0b\x0c\r\t ")) + ["▁"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, initial_alphabet=alphabet,
                                  min_frequency=1, show_progress=False)
    tok.train_from_iterator(training_lines(system), trainer=trainer)
    ids = [tok.token_to_id(t) for t in SPECIAL]
    assert ids == [0, 1, 2], f"special tokens landed at {ids}"
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": [image_token]})
    fast.add_special_tokens({"pad_token": pad_token})
    return fast
