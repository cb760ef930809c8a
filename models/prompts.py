"""Prompt formats: a LLaVA-format conversation → the text a model is prompted (and trained) with.

``prompt_format`` (``teacher.prompt_format``, ``train_student.prompt_format``):

- ``auto`` — the checkpoint's own chat template, found where transformers keeps it (the processor's
  ``chat_template.json`` / ``chat_template.jinja``, else the tokenizer's), fed structured content
  (``[{"type": "image"}, {"type": "text", "text": …}]``) when the template reads it, plain strings
  with the family's image placeholder inline when it does not (probed once per template).
- ``llava_v1`` — LLaVA's ``conv_vicuna_v1`` (``llava/conversation.py``, what LLaVA-1.5 and the
  LLAVADI study trained on): ``"<system> USER: <image>\\n<q> ASSISTANT: <a></s>USER: <q2> ASSISTANT:"``
  (``SeparatorStyle.TWO``: sep ``" "``, sep2 ``"</s>"``, written as the tokenizer's EOS token).
- a path to a Jinja file — rendered like ``auto`` with that template.

The image rule (LLaVA's ``preprocess_multimodal``, shared by every stage through
``place_image``): a sample has at most one image; its ``<image>`` may stand in any human turn, is
removed there and put at the front of the first human turn (``"<image>\\n" + text``); ``<image>`` in
an assistant turn, more than one ``<image>``, or ``<image>`` without an image is a record-level
``Reject``. An image row whose text has no ``<image>`` gets it at the front of the first human turn.
"""
from __future__ import annotations

import datetime
import hashlib
from pathlib import Path
from typing import Optional, Sequence

IMAGE = "<image>"
ROLE = {"human": "user", "gpt": "assistant", "system": "system"}
# conv_vicuna_v1.system in LLaVA's llava/conversation.py (v1 says "user"; v0 said "human")
LLAVA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the user's questions.")
BUILTIN_FORMATS = ("auto", "llava_v1")


def place_image(turns: Sequence[dict], has_image: bool) -> list[dict]:
    """LLaVA's image placement (see module doc). ``turns``: ``[{"from", "value"}]``, an optional
    leading ``system`` turn, then alternating human/gpt. Returns new turns; raises
    ``schemas.samples.Reject("image_placement", …)``."""
    from ..schemas.samples import Reject

    out = [dict(t) for t in turns]
    n = sum(t["value"].count(IMAGE) for t in out)
    for i, t in enumerate(out):
        if t["from"] != "human" and IMAGE in t["value"]:
            raise Reject("image_placement", f"turn {i} ({t['from']}) contains {IMAGE}: only a human turn may")
    if n > 1:
        raise Reject("image_placement", f"{n} {IMAGE} placeholders: a sample carries at most one image")
    if n and not has_image:
        raise Reject("image_placement", f"{IMAGE} in the text but the sample has no image")
    if not has_image:
        return out
    first = next((i for i, t in enumerate(out) if t["from"] == "human"), None)
    if first is None:
        raise Reject("image_placement", "the sample has an image but no human turn")
    for t in out:
        if IMAGE in t["value"]:
            t["value"] = t["value"].replace(IMAGE, "").strip()
    out[first]["value"] = (IMAGE + "\n" + out[first]["value"]).strip()
    return out


def split_system(turns: Sequence[dict]) -> tuple[Optional[str], list[dict]]:
    if turns and turns[0]["from"] == "system":
        return turns[0]["value"], list(turns[1:])
    return None, list(turns)


def render_llava_v1(turns: Sequence[dict], eos: str, add_generation_prompt: bool,
                    system: str = LLAVA_V1_SYSTEM) -> str:
    """``conv_vicuna_v1.get_prompt()`` (SeparatorStyle.TWO) for turns already passed through
    ``place_image``: ``system + " "``, then per message ``ROLE + ": " + text + sep`` with sep
    alternating ``" "`` (after USER) and ``eos`` (after ASSISTANT); a trailing ``"ASSISTANT:"`` when
    ``add_generation_prompt``. A leading ``system`` turn replaces the default system text."""
    sys_text, body = split_system(turns)
    out = (sys_text if sys_text is not None else system) + " "
    for t in body:
        if t["from"] == "human":
            out += "USER: " + t["value"] + " "
        else:
            out += "ASSISTANT: " + t["value"] + eos
    if add_generation_prompt:
        out += "ASSISTANT:"
    return out


def chat_template_of(processor, fmt: str, default: Optional[str] = None) -> str:
    """The Jinja text ``fmt`` stands for: the file at ``fmt``, or (``auto``) the processor's chat
    template, else its tokenizer's, else the family's ``default``. Raises ``ValueError`` naming the
    fix when there is none."""
    if fmt not in BUILTIN_FORMATS:
        p = Path(fmt)
        if not p.is_file():
            raise ValueError(f"prompt_format={fmt!r}: neither 'auto', 'llava_v1' nor an existing Jinja file")
        return p.read_text()
    tpl = getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", None),
                                                                 "chat_template", None) or default
    if not tpl:
        raise ValueError("prompt_format=auto but the checkpoint has no chat template (no chat_template.json/"
                         ".jinja beside the processor, none in tokenizer_config.json): set prompt_format=llava_v1 "
                         "or prompt_format=PATH/TO/template.jinja")
    if isinstance(tpl, dict):  # several named templates: the default one
        tpl = tpl.get("default") or next(iter(tpl.values()))
    return tpl


_PROBE = "llavadi-probe-7Q"
# Templates that print today's date (Mistral's default system prompt: ``strftime_now``) get this
# fixed date instead: a prompt must not change between a run and its resume, or from one day's cache
# to the next day's student (it is part of the renderer's identity, hence of the cache fingerprint).
TEMPLATE_DATE = datetime.datetime(2025, 1, 1)


def _render_jinja(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt,
                                         strftime_now=TEMPLATE_DATE.strftime)


def template_reads_structured(tokenizer, template: str) -> bool:
    """Whether ``template`` renders structured content (``[{"type": "text", "text": …}]``): the
    probe text comes out and no Python list/dict repr does."""
    msgs = [{"role": "user", "content": [{"type": "text", "text": _PROBE}]}]
    try:
        out = _render_jinja(tokenizer, template, msgs, True)
    except Exception:
        return False
    return _PROBE in out and "'type'" not in out and '"type"' not in out


def to_messages(turns: Sequence[dict], structured: bool, placeholder: str) -> list[dict]:
    """LLaVA turns (after ``place_image``) → chat messages. Structured: the ``<image>`` at the front of
    a turn becomes ``{"type": "image"}``; plain: it becomes the family's ``placeholder`` text."""
    msgs = []
    for t in turns:
        role, text = ROLE[t["from"]], t["value"]
        if structured:
            content = []
            if text.startswith(IMAGE):
                content.append({"type": "image"})
                text = text[len(IMAGE):].lstrip("\n")
            content.append({"type": "text", "text": text})
            msgs.append({"role": role, "content": content})
        else:
            msgs.append({"role": role, "content": text.replace(IMAGE, placeholder)})
    return msgs


class PromptRenderer:
    """Renders conversations for one model (its processor + family) in one ``prompt_format``.

    ``render(turns, add_generation_prompt)`` → text with the family's (unexpanded) image placeholder;
    ``turns`` must have passed ``place_image``. ``identity`` is a hash of what decides the text (format
    and template), recorded in cache fingerprints."""

    def __init__(self, processor, fmt: str, placeholder: str, default_template: Optional[str] = None):
        self.processor, self.fmt, self.placeholder = processor, fmt, placeholder
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if fmt == "llava_v1":
            self.template = None
            self.structured = False
            ident = "llava_v1:" + LLAVA_V1_SYSTEM
        else:
            self.template = chat_template_of(processor, fmt, default_template)
            self.structured = template_reads_structured(self.tokenizer, self.template)
            ident = self.template + TEMPLATE_DATE.isoformat()
        self.identity = hashlib.sha256(ident.encode()).hexdigest()[:16]

    def render(self, turns: Sequence[dict], add_generation_prompt: bool) -> str:
        if self.template is None:
            text = render_llava_v1(turns, self.tokenizer.eos_token, add_generation_prompt)
            return text.replace(IMAGE, self.placeholder)
        msgs = to_messages(turns, self.structured, self.placeholder)
        return _render_jinja(self.tokenizer, self.template, msgs, add_generation_prompt)
