"""Tiny checkpoints of each supported model family, built offline from the family's transformers
config and saved in the file layout the public checkpoints ship (config, generation config,
processor/preprocessor config, tokenizer files, the chat template file with its published text).
One module per family; each exposes ``CASES = {case_name: build}`` with
``build(out_dir, role="teacher"|"student", seed=0) -> Path``; ``all_cases()`` collects them."""

import json
from pathlib import Path


def publish_layout(out: Path, chat_template: str | None, template_file: str = "chat_template.json",
                   tokenizer_template: bool = False) -> Path:
    """Rewrite a transformers-5 ``save_pretrained`` directory into the hub layout of the public
    checkpoints: the image processor in ``preprocessor_config.json`` (transformers 5 folds it into
    ``processor_config.json``), the chat template as ``chat_template.json`` (``{"chat_template": …}``)
    or ``chat_template.jinja`` per ``template_file``, or inside ``tokenizer_config.json`` when
    ``tokenizer_template`` (as the Qwen2-VL / Idefics3 repos also carry it)."""
    out = Path(out)
    pc = out / "processor_config.json"
    if pc.exists():
        cfg = json.loads(pc.read_text())
        ip = cfg.pop("image_processor", None)
        if ip is not None:
            ip.setdefault("processor_class", cfg.get("processor_class"))
            (out / "preprocessor_config.json").write_text(json.dumps(ip, indent=2) + "\n")
        cfg.pop("chat_template", None)
        pc.write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)
    (out / "chat_template.json").unlink(missing_ok=True)
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc.pop("chat_template", None)
    if chat_template is not None:
        if tokenizer_template:
            tc["chat_template"] = chat_template
        elif template_file.endswith(".json"):
            (out / template_file).write_text(json.dumps({"chat_template": chat_template}, indent=2) + "\n")
        else:
            (out / template_file).write_text(chat_template)
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")
    return out


def all_cases() -> dict:
    """``{case: build}`` over every module of this package (``llava15``, ``llava_next``, …)."""
    import importlib
    import pkgutil

    cases = {}
    for m in pkgutil.iter_modules(__path__):
        cases.update(getattr(importlib.import_module(f"{__name__}.{m.name}"), "CASES", {}))
    return cases


def raw_calls() -> dict:
    """``{case: fn(processor, text, image) -> dict}``: how a family's processor is called directly
    (without llavadi's family layer) where a plain ``processor(text=…, images=…)`` is not it."""
    import importlib
    import pkgutil

    out = {}
    for m in pkgutil.iter_modules(__path__):
        out.update(getattr(importlib.import_module(f"{__name__}.{m.name}"), "RAW_CALLS", {}))
    return out
