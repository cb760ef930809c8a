"""One model directory as llavadi sees it: its family, processor, prompt format and stop tokens, and
the two things every stage asks of it — where the answer tokens of a conversation are, and the
forward inputs of a sample.

Answer tokens (what cache-teacher caches and train-student trains on) are each assistant text plus
the end-of-turn token the prompt format emits: the tokens that the rendered conversation through
answer t and the whole conversation share after the rendered prompt of turn t (whose ids must be a
prefix of both), cut after the first stop token (``eos_token_id`` of ``generation_config.json`` and
the tokenizer: ``</s>``, ``<|im_end|>``, ``<end_of_turn>`` …) — a template's text after it (a
newline) is not something the model generates. They are found on the text's own tokens, then moved
past the image expansion read off the processor's output for that very image (anyres, dynamic
resolution): the number of image tokens is never assumed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .base import Family, collate
from .prompts import PromptRenderer, place_image, split_system


@dataclass
class TextConversation:
    """A conversation rendered and tokenised, image placeholder NOT expanded:
    ``ids [L_text]``, ``spans`` = ``[start, end)`` of every answer in ``ids``.

    With ``answers`` (sampled answer ids: ``models.answer_ids``), ``ids``/``spans`` hold those ids spliced into
    the text's own tokens ``text_ids``/``text_spans``; ``encode`` splices them after the image expansion."""

    text: str
    ids: list[int]
    spans: list[tuple[int, int]]
    text_ids: Optional[list[int]] = None
    text_spans: Optional[list[tuple[int, int]]] = None
    answers: Optional[list[list[int]]] = None


@dataclass
class Encoded:
    """A sample as the model sees it: ``ids [L]`` (image expanded), answer ``spans`` in ``ids``, the
    forward inputs (processor outputs the family's forward takes, tensors with batch dimension 1) and
    the id of the image-feature token (``Family.image_token_id``; None for a model without one)."""

    ids: list[int]
    spans: list[tuple[int, int]]
    inputs: dict
    image_token_id: Optional[int] = None

    @property
    def positions(self) -> list[int]:
        """Positions whose next-token logits predict the answer tokens (``p - 1`` for token ``p``)."""
        return [p - 1 for a, b in self.spans for p in range(a, b)]

    @property
    def answer_ids(self) -> list[int]:
        return [self.ids[p] for a, b in self.spans for p in range(a, b)]

    @property
    def answer_token_positions(self) -> list[int]:
        """Positions of the answer tokens themselves (the study's answer mask: ``labels != IGNORE``)."""
        return [p for a, b in self.spans for p in range(a, b)]

    @property
    def image_positions(self) -> list[int]:
        """Positions that receive the vision features (``ids[p] == image_token_id``)."""
        t = self.image_token_id
        return [] if t is None else [p for p, x in enumerate(self.ids) if x == t]

    def rows(self, kinds) -> tuple[list[int], list[int]]:
        """(positions, kind codes) of this sample's teacher-cache rows of the given ``kinds``
        (``schemas.teacher_cache.fields``: a row ``p`` < L-1 is ``answer`` when token ``p+1`` is an answer
        token, else ``image`` when ``p`` is an image position, else ``prompt``), in sequence order."""
        from ..schemas.teacher_cache.fields import KIND_ANSWER, KIND_IMAGE, KIND_PROMPT

        answer, image = set(self.positions), set(self.image_positions)
        pos, kind = [], []
        for p in range(len(self.ids) - 1):
            k = KIND_ANSWER if p in answer else KIND_IMAGE if p in image else KIND_PROMPT
            if k in kinds:
                pos.append(p)
                kind.append(k)
        return pos, kind


def stop_token_ids(model_dir: str | Path, tokenizer) -> set[int]:
    """End-of-turn ids: ``generation_config.json``'s ``eos_token_id`` (int or list) and the tokenizer's."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gc = Path(model_dir) / "generation_config.json"
    if gc.exists():
        e = json.loads(gc.read_text()).get("eos_token_id")
        ids.update(int(x) for x in (e if isinstance(e, list) else [e]) if x is not None)
    return ids


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ModelAdapter:
    """``model_dir``'s family, processor and prompt format (``auto`` | ``llava_v1`` | Jinja path).

    Raises ``UnsupportedModel`` (a ``ValueError``) for a family llavadi does not know, ``ValueError``
    for a prompt format the checkpoint cannot give (``auto`` without a chat template)."""

    def __init__(self, model_dir: str | Path, prompt_format: str = "auto", processor=None):
        from . import family_of, load_processor

        self.model_dir = str(model_dir)
        self.family: Family = family_of(model_dir)
        self.processor = processor if processor is not None else load_processor(model_dir)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.prompt_format = prompt_format
        self.renderer = PromptRenderer(self.processor, prompt_format, self.family.placeholder(self.processor),
                                       self.family.default_chat_template(self.processor))
        self.stop_ids = stop_token_ids(model_dir, self.tokenizer)
        self.image_token_id = self.family.image_token_id(_model_config(model_dir))
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.tokenizer.eos_token_id)
        # special-token strings a tokenizer parses as control tokens wherever they stand in a text
        added = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        self.special_strings = sorted({t for t in self.tokenizer.all_special_tokens if t}
                                      | {t.content for t in added.values() if getattr(t, "special", False) and t.content})

    # ------------------------------------------------------------------ prompts

    def prompt(self, turns: Sequence[dict], has_image: bool) -> str:
        """Text that prompts the next assistant answer after ``turns`` (ending with a human turn)."""
        turns = place_image(turns, has_image)
        self._check_special_strings(turns)
        return self.renderer.render(turns, add_generation_prompt=True)

    def conversation(self, turns: Sequence[dict], has_image: bool) -> TextConversation:
        """Render + tokenise a whole conversation and locate its answers (module doc). Raises
        ``Reject`` (``image_placement``, ``token_mismatch``)."""
        from ..schemas.samples import Reject

        turns = place_image(turns, has_image)
        self._check_special_strings(turns)
        sys_turn, body = split_system(turns)
        head = turns[: len(turns) - len(body)]
        ids = lambda text: self.family.text_ids(self.processor, text)  # noqa: E731
        full_text = self.renderer.render(turns, add_generation_prompt=False)
        full = ids(full_text)
        spans = []
        for t in range(len(body) // 2):
            p = ids(self.renderer.render(head + body[: 2 * t + 1], add_generation_prompt=True))
            pa = ids(self.renderer.render(head + body[: 2 * t + 2], add_generation_prompt=False))
            if pa[: len(p)] != p:
                raise Reject("token_mismatch", f"turn {t}: prompt ids are not a prefix of prompt+answer ids")
            if full[: len(p)] != p:
                raise Reject("token_mismatch", f"turn {t}: the prompt's ids are not a prefix of the conversation's ids")
            # the answer: what prompt+answer and the whole conversation share after the prompt, cut
            # after the first stop token; trailing whitespace-only tokens dropped (a template that ends
            # answers with a space — llava-1.5-hf's — would otherwise merge it with the next turn)
            end = len(p) + _common_prefix(pa[len(p):], full[len(p):])
            for j in range(len(p), end):
                if pa[j] in self.stop_ids:
                    end = j + 1
                    break
            else:
                while end > len(p) and not self.tokenizer.decode([pa[end - 1]]).strip():
                    end -= 1
            if end == len(p):
                raise Reject("token_mismatch", f"turn {t}: the answer has no tokens")
            spans.append((len(p), end))
        return TextConversation(full_text, full, spans)

    def _check_special_strings(self, turns: Sequence[dict]) -> None:
        """A turn whose text holds a special-token string (``</s>``, ``<|im_end|>``, ``[IMG]`` …) would be
        tokenised as that control token — an answer cut at a literal ``</s>``, a second image: rejected
        (``special_token_in_text``), never silently truncated. The leading ``<image>`` of the image
        rule is the placeholder, not text."""
        from ..schemas.samples import Reject
        from .prompts import IMAGE

        for i, t in enumerate(turns):
            text = t["value"]
            if text.startswith(IMAGE):
                text = text[len(IMAGE):]
            hit = next((sp for sp in self.special_strings if sp in text), None)
            if hit is not None:
                raise Reject("special_token_in_text", f"turn {i} ({t['from']}) contains {hit!r}, a special token of "
                                                      f"this tokenizer: it would be read as a control token")

    def format_problems(self) -> tuple[list[str], list[str]]:
        """(refusals, warnings) for this prompt format, probed on a one-turn conversation before any work:
        refused when an image row cannot be encoded (a template that drops the image, a format the
        family's layout cannot take); warned when answers end in no stop token (the student would not
        learn to stop: llava-1.5-hf's own template ends answers with a space)."""
        from PIL import Image

        from ..schemas.samples import Reject

        turns = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A test."}]
        refuse, warn = [], []
        try:
            conv = self.conversation(turns, True)
            enc = self.encode(conv, Image.new("RGB", (64, 64), (128, 128, 128)))  # raises for a layout it cannot take
            placeholder = self.family.placeholder(self.processor)
            if placeholder not in conv.text:
                raise Reject("image_placement", f"the rendered prompt holds no image placeholder ({placeholder!r})")
            del enc
        except Reject as r:
            refuse.append(f"prompt_format={self.prompt_format!r} cannot show an image to this {self.family.name} "
                          f"model ({r.reason}: {r.detail}); use prompt_format=auto or a template that renders "
                          f"{{'type': 'image'}} content")
            return refuse, warn
        if conv.ids[conv.spans[0][1] - 1] not in self.stop_ids:
            warn.append(f"prompt_format={self.prompt_format!r} ends answers with no stop token "
                        f"({sorted(self.stop_ids)}): answer tokens carry no end of turn, so a student will not "
                        f"learn to stop (llava-1.5-hf's published template does this; prompt_format=llava_v1 "
                        f"is what LLaVA-1.5 trained on)")
        return refuse, warn

    # ------------------------------------------------------------------ forward inputs

    def processor_outputs(self, text: str, image) -> dict:
        """The processor's own outputs for one sample (``Reject("processor_error")`` when it fails)."""
        from ..schemas.samples import Reject

        try:
            return self.family.processor_call(self.processor, text, image)
        except Reject:  # the family's own reason
            raise
        except Exception as e:  # a record the processor cannot take is that record's problem
            raise Reject("processor_error", f"{type(e).__name__}: {e}"[:500]) from None

    def encode(self, conv: TextConversation, image) -> Encoded:
        """``conv`` with ``image`` (or None) as the model sees it. The processor's ids must equal the
        text's ids outside the image expansion, and no answer may lie inside it; else
        ``Reject("token_mismatch")``."""
        from ..schemas.samples import Reject

        if conv.answers is not None:  # sampled answer ids replace the text's answer tokens (issue #24)
            from .answer_ids import encode_answers

            return encode_answers(self, conv, image)
        out = self.processor_outputs(conv.text, image)
        E = [int(x) for x in out["input_ids"].reshape(-1).tolist()]
        U = conv.ids
        if image is None:
            if E != U:
                raise Reject("token_mismatch", "the processor tokenised the text-only conversation differently "
                                               "from its tokenizer")
            return Encoded(E, list(conv.spans), self.family.forward_inputs(out), self.image_token_id)
        a = _common_prefix(U, E)
        b = min(_common_prefix(U[::-1], E[::-1]), len(U) - a, len(E) - a)
        delta = len(E) - len(U)
        # U[:a] == E[:a] and U[len(U)-b:] == E[len(E)-b:]: the image expansion replaced U[a:len(U)-b]
        spans = []
        for s_, e_ in conv.spans:
            if e_ <= a:
                spans.append((s_, e_))
            elif s_ >= len(U) - b:
                spans.append((s_ + delta, e_ + delta))
            else:
                raise Reject("token_mismatch", "an answer token lies inside the image expansion")
        return Encoded(E, spans, self.family.forward_inputs(out), self.image_token_id)

    def prompt_inputs(self, text: str, image) -> dict:
        """Forward inputs of a generation prompt (batch dimension 1)."""
        return self.family.forward_inputs(self.processor_outputs(text, image))

    def collate(self, encoded: Sequence[dict]) -> dict:
        """Per-sample forward inputs → one right-padded batch (``models.base.collate``)."""
        return collate(encoded, self.pad_token_id)


def _model_config(model_dir: str | Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir))


def check_model(model_dir: str | Path, prompt_format: str, model_key: str, format_key: str
                ) -> tuple[Optional[ModelAdapter], list[str]]:
    """Before any work: ``model_dir`` is of a supported family and ``prompt_format`` renders and can show
    an image (``ModelAdapter.format_problems``); its warnings go to stderr. Returns (the adapter, or None
    when it cannot be built; problems, each naming the config key to change)."""
    import sys

    from . import UnsupportedModel

    try:
        ad = ModelAdapter(model_dir, prompt_format)
        refuse, warn = ad.format_problems()
    except UnsupportedModel as e:
        return None, [f"{model_key}: {e}"]
    except ValueError as e:
        return None, [f"{format_key}: {e}"]
    for w in warn:
        print(f"[llavadi] warning: {format_key}: {w}", file=sys.stderr)
    return ad, [f"{format_key}: {r}" for r in refuse]


def vllm_support(model_dir: str | Path) -> Optional[str]:
    """None when vLLM's build here serves ``model_dir``'s family, else the reason it cannot."""
    from . import family_of

    import torch

    fam = family_of(model_dir)
    return fam.vllm_gpu if torch.cuda.is_available() else fam.vllm_cpu
