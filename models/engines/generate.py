"""Teacher engines: the same requests served by vLLM (default, the fast path) or by HF
transformers (for models vLLM cannot serve, and the numerical reference).

Contract of ``generate``: one ``GenRequest`` (prompt text rendered in the teacher's prompt format by
``models.ModelAdapter``, optional PIL image for its single image placeholder, per-request seed) →
one ``GenResult`` with the generated token ids *without* the trailing stop token and a finish reason
``"stop"`` (a stop token — EOS or the family's end-of-turn, ``ModelAdapter.stop_ids`` — or a stop string) or ``"length"`` (hit ``max_new_tokens`` or the context). The
text is decoded by the caller with the teacher tokenizer, so both engines give identical text
for identical ids.

Sampling reproducibility: vLLM takes a seed per request. HF ``generate`` cannot seed rows of
a batch separately, so the HF engine generates one request at a time (after
``torch.manual_seed(seed)``). That also keeps padding out of the reference numerics: batched
left-padded greedy decoding was seen to flip a near-tie token against vLLM (1 in ~1000 tokens
with a random tiny teacher), unpadded decoding matched.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

from ...pipeline.config import SamplingConfig, TeacherConfig
from .common import resolve_dtype, teacher_adapter, vllm_engine_kwargs, vllm_prompt


@dataclass
class GenRequest:
    prompt: str
    image: Optional[object] = None  # PIL.Image.Image (RGB)
    seed: int = 0
    # the forward inputs themselves (``[1, L]`` tensors, image expanded) instead of ``prompt`` — a prompt that
    # holds earlier sampled answer ids (``models.answer_ids.turn_prompt``); the HF engine only
    inputs: Optional[dict] = None
    # the same prompt as text-level ids (image placeholder not expanded: vLLM expands it), for the vLLM engine;
    # a request with ``inputs`` needs them there
    prompt_ids: Optional[list] = None


@dataclass
class GenResult:
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    cached_prompt_tokens: int = 0  # prompt tokens served from the engine's prefix cache (not recomputed)
    stop_token_id: Optional[int] = None  # the stop token that ended the answer (not in token_ids), if one did


def _finish(ids: list[int], eos: set[int], max_new: int) -> GenResult:
    for j, t in enumerate(ids):
        if t in eos:
            return GenResult(ids[:j], "stop", stop_token_id=int(t))
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
        self.adapter = teacher_adapter(teacher)
        self.processor, self.tokenizer = self.adapter.processor, self.adapter.tokenizer
        self.llm = LLM(**vllm_engine_kwargs(teacher, on_gpu))
        self.eos = set(self.adapter.stop_ids)

    def reset_cache(self) -> None:
        """Forget every cached prefix: what the next request computes no longer depends on the
        requests served before it (called at each shard's start)."""
        if self.teacher.prefix_caching and not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running)")

    def generate(self, reqs: Sequence[GenRequest], s: SamplingConfig) -> list[GenResult]:
        from vllm import SamplingParams

        prompts, params = [], []
        if any(r.inputs is not None and r.prompt_ids is None for r in reqs):
            raise ValueError("a GenRequest with forward inputs needs prompt_ids for the vLLM engine")
        for r in reqs:
            prompts.append(vllm_prompt(self.adapter, r.prompt, r.image, r.prompt_ids))
            params.append(SamplingParams(
                n=1, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_new_tokens,
                min_tokens=s.min_new_tokens, stop=list(s.stop) or None, stop_token_ids=sorted(self.eos),
                seed=r.seed, detokenize=False))
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        res = []
        for o in outs:
            c = o.outputs[0]
            ids = [t for t in c.token_ids]
            r = _finish(ids, self.eos, s.max_new_tokens)
            if c.finish_reason == "length":
                r.finish_reason = "length"
            r.cached_prompt_tokens = int(o.num_cached_tokens or 0)
            res.append(r)
        return res


class HFEngine:
    """transformers ``generate`` (reference engine)."""

    def __init__(self, teacher: TeacherConfig):
        import torch
        from transformers import AutoModelForImageTextToText

        self.teacher = teacher
        self.adapter = teacher_adapter(teacher)
        self.processor, self.tokenizer = self.adapter.processor, self.adapter.tokenizer
        dtype = getattr(torch, resolve_dtype(teacher.dtype))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForImageTextToText.from_pretrained(teacher.model, dtype=dtype).to(self.device).eval()
        self.eos = set(self.adapter.stop_ids)

    def reset_cache(self) -> None:
        """Nothing to reset: each ``generate`` starts from the prompt alone."""

    def _inputs(self, r: GenRequest) -> dict:
        inputs = r.inputs if r.inputs is not None else self.adapter.prompt_inputs(r.prompt, r.image)
        return {k: v.to(self.device) for k, v in inputs.items()}

    def generate(self, reqs: Sequence[GenRequest], s: SamplingConfig) -> list[GenResult]:
        import torch

        from transformers import GenerationConfig

        # a fresh GenerationConfig: exactly llavadi's sampling, none of the checkpoint's own defaults
        # (Gemma3/Qwen2-VL ship do_sample=true, top_k, repetition_penalty … that vLLM does not apply)
        gc = dict(max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens or None,
                  pad_token_id=self.adapter.pad_token_id, eos_token_id=sorted(self.eos))
        if s.temperature == 0:
            gc.update(do_sample=False)
        else:
            gc.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=max(s.top_k, 0))
        kw = {"generation_config": GenerationConfig(**gc)}
        if s.stop:
            kw.update(stop_strings=list(s.stop), tokenizer=self.tokenizer)
        out: list[GenResult] = []
        with torch.inference_mode():
            for r in reqs:
                torch.manual_seed(r.seed)
                inp = self._inputs(r)
                gen = self.model.generate(**inp, **kw)[:, inp["input_ids"].shape[1]:]
                for row in gen.tolist():
                    out.append(_finish(row, self.eos | {self.adapter.pad_token_id}, s.max_new_tokens))
        return out


def make_engine(kind: str, teacher: TeacherConfig):
    return VLLMEngine(teacher) if kind == "vllm" else HFEngine(teacher)
