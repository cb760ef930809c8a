"""What both teacher engines (generation and teacher forcing) share: request seeds, dtypes, the
checkpoint's identity and context length, the teacher's ``ModelAdapter``, vLLM prompts and engine
arguments, and the output head read straight from the safetensors."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from ...pipeline.config import TeacherConfig


def request_seed(run_seed: int, sample_id: str, turn: int) -> int:
    """Per-request seed from (run seed, sample id, turn): independent of batch order, so a shard
    regenerated twice (e.g. after a kill) is identical."""
    h = hashlib.blake2b(f"{run_seed}\x00{sample_id}\x00{turn}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def resolve_dtype(dtype: str, on_gpu: Optional[bool] = None) -> str:
    """``auto``: bf16 on GPU, fp32 on CPU (``on_gpu`` None: whether this process sees a GPU)."""
    if dtype != "auto":
        return dtype
    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    return "bfloat16" if on_gpu else "float32"


def weights_identity(model_dir: str | Path) -> str:
    """Cheap identity of a checkpoint: config + names, sizes and the first/last MiB of each
    weight file (hashing 26 GB of a 13B teacher on every launch would take minutes)."""
    d = Path(model_dir)
    h = hashlib.sha256()
    for p in sorted(d.iterdir()):
        if p.suffix in (".safetensors", ".bin") or p.name in ("config.json",):
            size = p.stat().st_size
            h.update(f"{p.name}:{size}".encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))
                if size > 2 << 20:
                    f.seek(-(1 << 20), os.SEEK_END)
                    h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def weights_sha256(model_dir: str | Path) -> str:
    """Full identity of a checkpoint: sha256 over ``config.json`` and every byte of every weight file
    (``.safetensors``, ``.bin``), in name order. What an on-policy round's generator is known by (issue #24):
    two students that differ in one weight must not share a round's fingerprint, which the sampled identity
    of ``weights_identity`` cannot promise. Reads the whole checkpoint (about 1 s per GB)."""
    d = Path(model_dir)
    h = hashlib.sha256()
    for p in sorted(d.iterdir()):
        if p.suffix in (".safetensors", ".bin") or p.name == "config.json":
            h.update(f"{p.name}:{p.stat().st_size}\n".encode())
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()


def max_model_len(teacher: TeacherConfig) -> int:
    """``teacher.max_model_len`` or, when unset, the model's ``max_position_embeddings``."""
    if teacher.max_model_len:
        return teacher.max_model_len
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(teacher.model)
    return int(getattr(getattr(cfg, "text_config", cfg), "max_position_embeddings"))


def teacher_adapter(teacher: TeacherConfig):
    """The teacher's ``models.ModelAdapter`` (family, processor, ``teacher.prompt_format``)."""
    from ..adapter import ModelAdapter

    return ModelAdapter(teacher.model, teacher.prompt_format)


def vllm_prompt(adapter, text: str, image, ids: Optional[list] = None) -> dict:
    """A vLLM prompt: the text's own token ids (as the HF path tokenises it: one BOS even when the
    template writes it), or ``ids`` when given (a prompt holding sampled answer ids), and the image; vLLM
    expands the placeholder itself."""
    p = {"prompt_token_ids": list(ids) if ids is not None else adapter.family.text_ids(adapter.processor, text)}
    if image is not None:
        p["multi_modal_data"] = {"image": image}
    return p


def safetensors_files(model_dir: Path) -> list[str]:
    """The checkpoint's safetensors file names: the index's shards, else ``model.safetensors``."""
    idx = model_dir / "model.safetensors.index.json"
    if idx.exists():
        return sorted(set(json.loads(idx.read_text())["weight_map"].values()))
    return ["model.safetensors"]


CPU_KV_BLOCK_SIZE = 32  # the smallest block vLLM's CPU attention takes
CPU_STEP_TOKENS = 4096  # tokens per engine step on CPU (vLLM's default budget), at least one whole prompt


def vllm_engine_kwargs(teacher: TeacherConfig, on_gpu: bool) -> dict:
    """``vllm.LLM`` arguments for regenerate's engine (cache-teacher's forcer overrides a few).

    ``enforce_eager`` None: eager on CPU (compiling costs ~1 min at start and a C++ toolchain for
    a few % of decoding speed), vLLM's default on GPU (compiled + CUDA graphs). Prefix caching per
    ``teacher.prefix_caching``, in blocks of ``teacher.kv_block_size`` (None: ``CPU_KV_BLOCK_SIZE``
    on CPU, vLLM's default on GPU). On CPU no chunked prefill (see below: seeded sampling needs it off)."""
    kw = dict(model=teacher.model, tokenizer=teacher.model, dtype=resolve_dtype(teacher.dtype, on_gpu),
              max_model_len=max_model_len(teacher), tensor_parallel_size=teacher.tensor_parallel_size,
              seed=0, enable_prefix_caching=teacher.prefix_caching, limit_mm_per_prompt={"image": 1})
    if on_gpu:
        kw["gpu_memory_utilization"] = teacher.gpu_memory_utilization
    if teacher.enforce_eager is not None:
        kw["enforce_eager"] = bool(teacher.enforce_eager)
    elif not on_gpu:
        kw["enforce_eager"] = True
    block = teacher.kv_block_size or (None if on_gpu else CPU_KV_BLOCK_SIZE)
    if block:
        kw["block_size"] = block
    if not on_gpu:
        # vLLM's CPU runner cannot rewind a seeded request's generator when a step ends inside its prompt (a chunked
        # prefill): "RuntimeError: CPU Generator does not use offset" (gpu_model_runner._bookkeeping_sync, vLLM 0.32)
        # as soon as sampled requests hold more prompt tokens than one step takes. Whole prompts per step instead.
        kw["enable_chunked_prefill"] = False
        kw["max_num_batched_tokens"] = max(CPU_STEP_TOKENS, kw["max_model_len"])
    return kw


def output_head(model_dir: str | Path) -> dict:
    """The teacher's output projection read straight from its safetensors (no model load):
    ``{"weight": [V,H]}`` (+ ``"bias"``). Tied heads fall back to the input embeddings."""
    from safetensors import safe_open

    d = Path(model_dir)
    files = safetensors_files(d)
    found = {}
    for suffix, name in (("lm_head.weight", "weight"), ("lm_head.bias", "bias")):
        for f in files:
            with safe_open(d / f, "pt") as sf:
                key = next((k for k in sf.keys() if k.endswith(suffix)), None)
                if key:
                    found[name] = sf.get_tensor(key)
                    break
    if "weight" not in found:  # tied embeddings
        for f in files:
            with safe_open(d / f, "pt") as sf:
                key = next((k for k in sf.keys() if k.endswith("embed_tokens.weight")), None)
                if key:
                    found["weight"] = sf.get_tensor(key)
                    break
    if "weight" not in found:
        raise RuntimeError(f"no lm_head / embed_tokens weight found in {d}")
    return found
