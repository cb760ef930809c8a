"""Conversations whose answers are given as token ids (issue #24: on-policy rounds).

A student's sampled answer must reach the teacher, and the student's own training, as the very tokens it
sampled — never as text decoded and tokenised again (a round trip that can change the ids: a different
merge of the same characters, a leading space). The prompt format still comes from the text: the
conversation is rendered with each answer's *decoded* text and tokenised as usual
(``ModelAdapter.conversation``), then every answer span is replaced by its sampled ids (``splice``). Only the
answer tokens are replaced; everything the template writes around them stays the template's tokens. The
image expansion (before the first answer: ``models.prompts.place_image``) is the processor's, as for any
conversation (``ModelAdapter.encode`` splices after it).

Answer span rule. ``ModelAdapter.conversation`` ends a span after the first stop token the template writes
(``</s>``, ``<|im_end|>``). A sampled answer that ends in a stop token replaces the whole span. One that does
not (it hit ``max_new_tokens``) replaces the span but the template's stop token: the teacher then sees the
end of turn the template writes after any answer, and the student is trained on its sampled tokens only
(the stop token is a prompt row, not an answer row).

A sampled answer the format cannot hold is the record's ``Reject``: ``empty_generation`` (no tokens at all; an
answer that is only its stop token is kept), ``token_out_of_vocab`` (an id past the tokenizer: a padded head row),
``special_token_in_answer`` (a special or image token anywhere but a final stop token), and the text checks of
``ModelAdapter.conversation`` on the decoded text (``special_token_in_text``, ``image_placement``,
``token_mismatch``).
"""
from __future__ import annotations

from typing import Optional, Sequence

from .adapter import ModelAdapter, TextConversation
from .base import SEQ_KEYS

PLACEHOLDER_ANSWER = "x"  # the open turn's answer text when only its prompt is needed (``turn_prompt``)


def special_ids(adapter: ModelAdapter) -> set[int]:
    """Ids a sampled answer may not hold before its end: the tokenizer's special tokens, its added tokens
    marked special, and the image token."""
    tok = adapter.tokenizer
    out = {int(i) for i in tok.all_special_ids if i is not None}
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    out |= {int(i) for i, t in added.items() if getattr(t, "special", False)}
    if adapter.image_token_id is not None:
        out.add(int(adapter.image_token_id))
    return out


def answer_text(adapter: ModelAdapter, ids: Sequence[int]) -> str:
    """The text of a sampled answer as the conversation stores it: its ids but a final stop token, decoded
    and stripped; raises ``Reject`` (module doc) when the format cannot hold it."""
    from ..schemas.samples import Reject

    ids = [int(x) for x in ids]
    if not ids:
        raise Reject("empty_generation", "the answer has no tokens")
    n_vocab = len(adapter.tokenizer)
    bad = [x for x in ids if not 0 <= x < n_vocab]
    if bad:
        raise Reject("token_out_of_vocab", f"answer ids {bad[:5]} are not tokens of the {n_vocab}-token tokenizer")
    body = ids[:-1] if ids[-1] in adapter.stop_ids else ids
    special = special_ids(adapter)
    hit = [x for x in body if x in special]
    if hit:
        raise Reject("special_token_in_answer", f"the answer holds the special token(s) "
                                                f"{adapter.tokenizer.convert_ids_to_tokens(hit[:5])} before its end")
    # may be "": an answer that is only its stop token is an answer (the teacher tells the student not to stop
    # there); the template still writes its end of turn, which the answer's ids replace
    return adapter.tokenizer.decode(body, skip_special_tokens=False).strip()


def splice(ids: Sequence[int], spans: Sequence[tuple[int, int]], answers: Sequence[Sequence[int]],
           stop_ids: set[int]) -> tuple[list[int], list[tuple[int, int]], list[tuple[int, int, int]]]:
    """Replace the first ``len(answers)`` spans of ``ids`` by ``answers`` (module doc: the template's stop
    token stays after an answer without one). Returns (new ids, every span in the new ids — later spans
    shifted —, edits ``(start, end, new length)`` in the old coordinates)."""
    out: list[int] = []
    new_spans, edits = [], []
    prev = 0
    for (s, e), a in zip(spans, answers):
        a = [int(x) for x in a]
        # an answer without a stop token of its own keeps the template's (it stays in the sequence, after it)
        end = e - 1 if ids[e - 1] in stop_ids and not (a and a[-1] in stop_ids) else e
        out += ids[prev:s]
        new_spans.append((len(out), len(out) + len(a)))
        out += a
        edits.append((s, end, len(a)))
        prev = end
    shift = len(out) - prev
    out += ids[prev:]
    new_spans += [(s + shift, e + shift) for s, e in spans[len(answers):]]
    return out, new_spans, edits


def splice_inputs(inputs: dict, edits: Sequence[tuple[int, int, int]]) -> dict:
    """The sequence-aligned forward inputs (``models.base.SEQ_KEYS``, ``[1, L]``) with ``edits`` applied: a
    replaced stretch becomes ``new length`` copies of its own value (text tokens: attention 1, one token
    type); other inputs (pixels, grids) unchanged. A stretch whose values differ cannot be spliced:
    ``Reject("token_mismatch")``."""
    import torch

    from ..schemas.samples import Reject

    out = dict(inputs)
    for k in SEQ_KEYS:
        v = inputs.get(k)
        if v is None or k == "input_ids":
            continue
        v = v.reshape(1, -1)
        parts, prev = [], 0
        for s, e, n in edits:
            seg = v[:, s:e] if e > s else v[:, max(s - 1, 0):s]
            if bool((seg != seg[:, :1]).any()):
                raise Reject("token_mismatch", f"{k} varies inside an answer: the sampled ids cannot replace it")
            parts += [v[:, prev:s], seg[:, :1].expand(1, n)]
            prev = e
        parts.append(v[:, prev:])
        out[k] = torch.cat(parts, 1)
    return out


def answer_conversation(adapter: ModelAdapter, turns: Sequence[dict], answers: Sequence[Sequence[int]],
                        has_image: bool) -> TextConversation:
    """``turns`` (gpt values: the answers' decoded text) rendered in ``adapter``'s format with the first
    ``len(answers)`` answers replaced by their ids: ``ids``/``spans`` are the spliced sequence, ``text_ids``/
    ``text_spans`` the text's own tokens, ``answers`` the ids (``ModelAdapter.encode`` splices the same after
    the image expansion). Raises ``Reject`` (module doc)."""
    from ..schemas.samples import Reject

    for a in answers:
        answer_text(adapter, a)  # the checks only: the text in ``turns`` is the caller's
    conv = adapter.conversation(turns, has_image)
    if len(answers) > len(conv.spans):
        raise Reject("bad_conversations", f"{len(answers)} answers for {len(conv.spans)} assistant turns")
    ids, spans, _ = splice(conv.ids, conv.spans, answers, adapter.stop_ids)
    return TextConversation(conv.text, ids, spans, text_ids=conv.ids, text_spans=list(conv.spans),
                            answers=[[int(x) for x in a] for a in answers])


def encode_answers(adapter: ModelAdapter, conv: TextConversation, image):
    """``ModelAdapter.encode`` of a spliced conversation: the text's own encoding (image expanded by the
    processor), then the answers spliced into its ids and sequence-aligned inputs."""
    from .adapter import Encoded

    enc = adapter.encode(TextConversation(conv.text, conv.text_ids, conv.text_spans), image)
    ids, spans, edits = splice(enc.ids, enc.spans, conv.answers, adapter.stop_ids)
    inputs = splice_inputs(enc.inputs, edits)
    import torch

    inputs["input_ids"] = torch.tensor([ids], dtype=enc.inputs["input_ids"].dtype)
    return Encoded(ids, spans, inputs, enc.image_token_id)


def row_conversation(adapter: ModelAdapter, row: dict) -> TextConversation:
    """The conversation of a sample row in ``adapter``'s format: with the row's ``answer_token_ids`` (an
    on-policy round's rows: one id list per assistant turn) spliced in, else ``adapter.conversation``."""
    from ..schemas.samples import Reject

    answers = row.get("answer_token_ids")
    has_image = row.get("image") is not None
    if answers is None:
        return adapter.conversation(row["conversations"], has_image)
    n_gpt = sum(1 for t in row["conversations"] if t["from"] == "gpt")
    if len(answers) != n_gpt:
        raise Reject("bad_conversations", f"{len(answers)} answer id lists for {n_gpt} assistant turns")
    return answer_conversation(adapter, row["conversations"], answers, has_image)


def turn_prompt(adapter: ModelAdapter, turns: Sequence[dict], answers: Sequence[Sequence[int]], image
                ) -> tuple[list[int], dict]:
    """The prompt of the next answer after ``turns`` (ending with a human turn; earlier answers' ids in
    ``answers``): (its text-level ids — image placeholder not expanded, what vLLM takes —, the forward inputs
    of ``adapter.encode``, ``[1, L]``, cut before the answer). Both are exactly the prefix the whole
    conversation will have before this answer once it is spliced in (``answer_conversation``), whatever the
    answer's text (``ModelAdapter.conversation`` checks the prompt is a prefix)."""
    t = len(answers)
    conv = answer_conversation(adapter, list(turns) + [{"from": "gpt", "value": PLACEHOLDER_ANSWER}], answers,
                               image is not None)
    enc = adapter.encode(conv, image)
    s = enc.spans[t][0]
    inputs = {k: (v.reshape(1, -1)[:, :s] if k in SEQ_KEYS else v) for k, v in enc.inputs.items()}
    return conv.ids[:conv.spans[t][0]], inputs


def prompt_problem(conv: TextConversation, prompts: Sequence[Sequence[int]]) -> Optional[str]:
    """None when every recorded turn prompt (text-level ids) is the whole conversation's prefix before that
    answer — the sequence the teacher scores is the one the student answered — else what differs."""
    for t, (p, (s, _)) in enumerate(zip(prompts, conv.spans)):
        if list(p) != conv.ids[:s]:
            return f"turn {t}: the prompt the student answered is not the conversation's prefix before its answer"
    return None
