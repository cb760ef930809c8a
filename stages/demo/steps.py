"""Pipeline steps the demo and the demo-teacher builder share: each is a real llavadi stage on a
run directory, so both resume after a kill and reuse finished work on a rerun."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ...pipeline.runner import run_stage
from ...pipeline.session import resolve


# what a demo model dir holds (save_pretrained layout of llava-1.5-hf)
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
               "processor_config.json", "llavadi_tiny_spec.json")


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def stage(stage_obj, run: Path, overrides: list[str]) -> None:
    cfg = resolve(run, None, [], overrides)
    rep = run_stage(stage_obj, run, cfg, progress=True)
    say(f"{stage_obj.name} {run.name}: {rep.shards_total} shards ({rep.shards_run} run, {rep.shards_skipped} reused)")


def scratch_dir(out: Path) -> Path:
    """An empty temporary sibling of ``out`` to fill, then ``atomic.replace_dir`` (a crash leaves ``out`` as it was)."""
    import shutil

    from ...pipeline import atomic

    tmp = atomic.tmp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def copy_model(ckpt: Path, init: Path, dst: Path) -> None:
    """Copy ``MODEL_FILES`` into ``dst``: each from the training checkpoint ``ckpt`` where it has
    it, else from the model it was trained from (``init``: tokenizer/processor files, our spec)."""
    import shutil

    for name in MODEL_FILES:
        src = ckpt / name if (ckpt / name).exists() else init / name
        if src.exists():
            shutil.copy2(src, dst / name)


def link_run(src: Path, dst: Path) -> None:
    """A run dir that shares ``src``'s data and cache (symlinks) but trains its own student."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("data", "regenerate", "cache_teacher"):
        if (src / name).exists() and not (dst / name).exists():
            os.symlink((src / name).resolve(), dst / name)
    if not (dst / "config.yaml").exists():
        (dst / "config.yaml").write_text((src / "config.yaml").read_text())


def train(run: Path, student: Path, overrides: list[str]) -> Path:
    """``llavadi train-student`` on ``run`` from ``student``; returns the final checkpoint dir."""
    from ..train_student.loop import train as train_loop

    cfg = resolve(run, None, [f"train_student.student={json.dumps(str(student))}"], overrides)
    res = train_loop(run, cfg, progress=True)
    return Path(res["final_checkpoint"])


def sft(run: Path, data_json: Path, base: list[str], init: Path, *, steps: int, batch: int, lr: float,
        seed: int = 0, save_every: int = 100000, keep: int = 2, freeze_vision: bool = False) -> Path:
    """Supervised fine-tuning through the pipeline: ingest → cache-teacher with ``source=data``
    (targets only: top-1 ids, int8 hidden states, never read with KD off) → train-student with KD
    and the feature loss off. Returns the final checkpoint dir."""
    from ..cache_teacher import STAGE as CACHE
    from ..ingest import STAGE as INGEST

    stage(INGEST, run, base + [f"ingest.inputs={json.dumps([str(data_json)])}"])
    stage(CACHE, run, [f"teacher.model={json.dumps(str(init))}", "cache_teacher.source=data", "cache_teacher.top_k=1",
                       "cache_teacher.hidden_dtype=int8"])
    return train(run, init, [
        "train_student.kd_weight=0", "train_student.feature_weight=0", f"train_student.lr={lr}",
        f"train_student.batch_size={batch}", f"train_student.micro_batch_size={batch}",
        f"train_student.max_steps={steps}", f"train_student.freeze_vision={str(freeze_vision).lower()}", f"train_student.seed={seed}",
        f"train_student.save_every_steps={save_every}", f"train_student.keep_checkpoints={keep}",
        "train_student.epochs=100000", "train_student.shuffle_buffer=2000", "train_student.log_every_steps=20"])


def evaluate_cached(run: Path, model: Path, name: str, overrides: list[str]) -> dict:
    """``llavadi eval`` for one model; a finished result for the same checkpoint is reused."""
    from ..eval import evaluate

    path = run / "eval" / f"{name}.json"
    if path.exists():
        res = json.loads(path.read_text())
        if res.get("model") == str(Path(model).resolve()):
            return res
    cfg = resolve(run, None, [], overrides)
    return evaluate(run, cfg, str(model), name)
