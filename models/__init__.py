"""Model-family knowledge (issue #12): one module per family behind ``models.base.Family``;
``ModelAdapter`` (``models.adapter``) is what the stages use. No family ``if`` outside this package.

Imports neither vLLM nor Ray (design §2)."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from .base import Family

# one module per family, each with ``FAMILIES = (Family, …)``
_MODULES = ("llava", "qwen2_vl", "idefics3", "gemma3", "paligemma", "mistral3")


def _collect() -> tuple[Family, ...]:
    out = []
    for m in _MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{m}")
        except ModuleNotFoundError as e:  # a family module not written yet
            if e.name != f"{__name__}.{m}":
                raise
            continue
        out.extend(mod.FAMILIES)
    return tuple(out)


FAMILIES: tuple[Family, ...] = _collect()


class UnsupportedModel(ValueError):
    """A checkpoint whose family llavadi does not know (raised before any work starts)."""


def model_type(model_dir: str | Path) -> str:
    cfg = Path(model_dir) / "config.json"
    if not cfg.exists():
        raise UnsupportedModel(f"{model_dir} has no config.json: pass a save_pretrained model directory")
    return json.loads(cfg.read_text()).get("model_type", "")


def family_of(model_dir: str | Path) -> Family:
    """The family of ``model_dir`` by its ``config.json`` ``model_type``; ``UnsupportedModel`` naming
    the families llavadi supports otherwise."""
    mt = model_type(model_dir)
    for f in FAMILIES:
        if mt in f.model_types:
            return f
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise UnsupportedModel(f"{model_dir}: model_type {mt!r} is not a family llavadi supports ({known}); "
                           f"support for a family lives in llavadi/models/ (prompt, processor inputs, "
                           f"parameter groups, save layout)")


def load_processor(model_dir: str | Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(model_dir))
