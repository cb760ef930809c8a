"""Resolve a run's config the way every CLI command does:
stored ``RUN/config.yaml`` (if any) ← ``--config FILE`` ← flags ← ``key=value`` overrides."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .config import LlavadiConfig, apply_overrides, load_config, load_yaml


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve(run_dir: Path | str, config_file: Optional[str] = None, flags: Optional[list[str]] = None,
            overrides: Optional[list[str]] = None) -> LlavadiConfig:
    run_dir = Path(run_dir)
    base: dict = {}
    stored = run_dir / "config.yaml"
    if stored.exists():
        base = load_yaml(str(stored))
    if config_file:
        base = deep_merge(base, load_yaml(config_file))
    base = apply_overrides(base, list(flags or []))
    return load_config(base, list(overrides or []))
