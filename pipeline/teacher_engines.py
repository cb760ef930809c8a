"""Teacher engines: the same requests served by vLLM (default, the fast path) or by HF
transformers (for models vLLM cannot serve, and the numerical reference).

Contract of ``generate``: one ``GenRequest`` (prompt text rendered with the teacher's chat
template, optional PIL image for the single ``<image>`` placeholder, per-request seed) →
one ``GenResult`` with the generated token ids *without* the trailing EOS and a finish reason
``"stop"`` (EOS or a stop string) or ``"length"`` (hit ``max_new_tokens`` or the context). The
text is decoded by the caller with the teacher tokenizer, so both engines give identical text
for identical ids.

Sampling reproducibility: vLLM takes a seed per request. HF ``generate`` cannot seed rows of
a batch separately, so the HF engine generates one request at a time (after
``torch.manual_seed(seed)``). That also keeps padding out of the reference numerics: batched
left-padded greedy decoding was seen to flip a near-tie token against vLLM (1 in ~1000 tokens
with a random tiny teacher), unpadded decoding matched.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .config import SamplingConfig, TeacherConfig


@dataclass
class GenRequest:
    prompt: str
    image: Optional[object] = None  # PIL.Image.Image (RGB)
    seed: int = 0


@dataclass
class GenResult:
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"


def request_seed(run_seed: int, sample_id: str, turn: int) -> int:
    """Per-request seed from (run seed, sample id, turn): independent of batch order, so a shard
    regenerated twice (e.g. after a kill) is identical."""
    h = hashlib.blake2b(f"{run_seed}\x00{sample_id}\x00{turn}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def resolve_dtype(dtype: str) -> str:
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


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


def max_model_len(teacher: TeacherConfig) -> int:
    """``teacher.max_model_len`` or, when unset, the model's ``max_position_embeddings``."""
    if teacher.max_model_len:
        return teacher.max_model_len
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(teacher.model)
    return int(getattr(getattr(cfg, "text_config", cfg), "max_position_embeddings"))


def load_processor(model_dir: str | Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(model_dir))


def prompt_token_count(processor, prompt: str, image=None) -> int:
    """Tokens the model sees for this prompt, image placeholder expanded (as both engines do)."""
    kw = {"images": [image]} if image is not None else {}
    return int(processor(text=[prompt], return_tensors="np", **kw)["input_ids"].shape[1])


def _finish(ids: list[int], eos: set[int], max_new: int) -> GenResult:
    for j, t in enumerate(ids):
        if t in eos:
            return GenResult(ids[:j], "stop")
    return GenResult(ids, "length" if len(ids) >= max_new else "stop")


class VLLMEngine:
    """``vllm.LLM`` in this process (one engine per Ray actor)."""

    def __init__(self, teacher: TeacherConfig):
        import torch

        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            # in-process engine core: ~5 s start instead of ~33 s, and no fork inside a Ray actor
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        from vllm import LLM

        self.teacher = teacher
        self.processor = load_processor(teacher.model)
        self.tokenizer = self.processor.tokenizer
        kw = dict(model=teacher.model, tokenizer=teacher.model, dtype=resolve_dtype(teacher.dtype),
                  max_model_len=max_model_len(teacher), tensor_parallel_size=teacher.tensor_parallel_size,
                  seed=0, enable_prefix_caching=False, limit_mm_per_prompt={"image": 1})
        if on_gpu:
            kw["gpu_memory_utilization"] = teacher.gpu_memory_utilization
        else:
            kw["enforce_eager"] = True  # torch.compile on CPU costs minutes for no gain at test sizes
        self.llm = LLM(**kw)
        self.eos = {self.tokenizer.eos_token_id}

    def generate(self, reqs: Sequence[GenRequest], s: SamplingConfig) -> list[GenResult]:
        from vllm import SamplingParams

        prompts, params = [], []
        for r in reqs:
            p = {"prompt": r.prompt}
            if r.image is not None:
                p["multi_modal_data"] = {"image": r.image}
            prompts.append(p)
            params.append(SamplingParams(
                n=1, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_new_tokens,
                min_tokens=s.min_new_tokens, stop=list(s.stop) or None, seed=r.seed, detokenize=False))
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        res = []
        for o in outs:
            c = o.outputs[0]
            ids = [t for t in c.token_ids]
            r = _finish(ids, self.eos, s.max_new_tokens)
            if c.finish_reason == "length":
                r.finish_reason = "length"
            res.append(r)
        return res


class HFEngine:
    """transformers ``generate`` (reference engine)."""

    def __init__(self, teacher: TeacherConfig):
        import torch
        from transformers import AutoModelForImageTextToText

        self.teacher = teacher
        self.processor = load_processor(teacher.model)
        self.tokenizer = self.processor.tokenizer
        dtype = getattr(torch, resolve_dtype(teacher.dtype))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForImageTextToText.from_pretrained(teacher.model, dtype=dtype).to(self.device).eval()
        self.eos = {self.tokenizer.eos_token_id}

    def _inputs(self, reqs: Sequence[GenRequest]):
        images = [r.image for r in reqs if r.image is not None]
        kw = {"images": images} if images else {}
        self.processor.tokenizer.padding_side = "left"
        return self.processor(text=[r.prompt for r in reqs], padding=True, return_tensors="pt", **kw).to(self.device)

    def generate(self, reqs: Sequence[GenRequest], s: SamplingConfig) -> list[GenResult]:
        import torch

        kw = dict(max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens or None,
                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        if s.stop:
            kw.update(stop_strings=list(s.stop), tokenizer=self.tokenizer)
        out: list[GenResult] = []
        if s.temperature == 0:
            kw.update(do_sample=False)
        else:
            kw.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or None)
        with torch.inference_mode():
            for r in reqs:
                torch.manual_seed(r.seed)
                inp = self._inputs([r])
                gen = self.model.generate(**inp, **kw)[:, inp["input_ids"].shape[1]:]
                for row in gen.tolist():
                    out.append(_finish(row, self.eos | {self.tokenizer.pad_token_id}, s.max_new_tokens))
        return out


def make_engine(kind: str, teacher: TeacherConfig):
    return VLLMEngine(teacher) if kind == "vllm" else HFEngine(teacher)
