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
    cached_prompt_tokens: int = 0  # prompt tokens served from the engine's prefix cache (not recomputed)


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


def max_model_len(teacher: TeacherConfig) -> int:
    """``teacher.max_model_len`` or, when unset, the model's ``max_position_embeddings``."""
    if teacher.max_model_len:
        return teacher.max_model_len
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(teacher.model)
    return int(getattr(getattr(cfg, "text_config", cfg), "max_position_embeddings"))


def teacher_adapter(teacher: TeacherConfig):
    """The teacher's ``models.ModelAdapter`` (family, processor, ``teacher.prompt_format``)."""
    from ..models.adapter import ModelAdapter

    return ModelAdapter(teacher.model, teacher.prompt_format)


def vllm_prompt(adapter, text: str, image) -> dict:
    """A vLLM prompt: the text's own token ids (as the HF path tokenises it: one BOS even when the
    template writes it) and the image; vLLM expands the placeholder itself."""
    p = {"prompt_token_ids": adapter.family.text_ids(adapter.processor, text)}
    if image is not None:
        p["multi_modal_data"] = {"image": image}
    return p


def _finish(ids: list[int], eos: set[int], max_new: int) -> GenResult:
    for j, t in enumerate(ids):
        if t in eos:
            return GenResult(ids[:j], "stop")
    return GenResult(ids, "length" if len(ids) >= max_new else "stop")


def safetensors_files(model_dir: Path) -> list[str]:
    """The checkpoint's safetensors file names: the index's shards, else ``model.safetensors``."""
    import json as _json

    idx = model_dir / "model.safetensors.index.json"
    if idx.exists():
        return sorted(set(_json.loads(idx.read_text())["weight_map"].values()))
    return ["model.safetensors"]


CPU_KV_BLOCK_SIZE = 32  # the smallest block vLLM's CPU attention takes


def vllm_engine_kwargs(teacher: TeacherConfig, on_gpu: bool) -> dict:
    """``vllm.LLM`` arguments for regenerate's engine (cache-teacher's forcer overrides a few).

    ``enforce_eager`` None: eager on CPU (compiling costs ~1 min at start and a C++ toolchain for
    a few % of decoding speed), vLLM's default on GPU (compiled + CUDA graphs). Prefix caching per
    ``teacher.prefix_caching``, in blocks of ``teacher.kv_block_size`` (None: ``CPU_KV_BLOCK_SIZE``
    on CPU, vLLM's default on GPU)."""
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
    return kw


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
        for r in reqs:
            prompts.append(vllm_prompt(self.adapter, r.prompt, r.image))
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
        return {k: v.to(self.device) for k, v in self.adapter.prompt_inputs(r.prompt, r.image).items()}

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


# ----------------------------------------------------------------------------- teacher forcing


@dataclass
class ForceRequest:
    """One conversation for the teacher-forced pass.

    ``input_ids``: the whole conversation, image placeholder already expanded ([L] ints);
    ``positions``: indices whose next-token distribution is kept (answer token p ↔ p-1);
    ``inputs``: the forward inputs of this sample (``models.adapter.Encoded.inputs``, batch dim 1)."""

    input_ids: list[int]
    positions: list[int]
    inputs: Optional[dict] = None
    image: Optional[object] = None
    prompt: Optional[str] = None  # the rendered conversation text (the vLLM forcer sends its token ids)


@dataclass
class ForceResult:
    """Per kept position (n rows): ``hidden [n,H] float32`` final-layer post-norm state,
    ``topk_ids [n,k] int64``, ``topk_logprobs [n,k] float32`` (raw, T=1),
    ``logit_stats [n,2] float32`` (mean, std with Bessel's correction, of the full logit row)."""

    hidden: object
    topk_ids: object
    topk_logprobs: object
    logit_stats: object


def topk_from_hidden(hidden, head_weight, k: int, head_bias=None):
    """Teacher outputs at kept positions from final hidden states and the output head:
    ``hidden [n,H]``, ``head_weight [V,H]`` → (topk_ids [n,k], topk_logprobs [n,k], stats [n,2]),
    float32 math."""
    import torch

    logits = hidden.float() @ head_weight.float().T
    if head_bias is not None:
        logits = logits + head_bias.float()
    lp = torch.log_softmax(logits, dim=-1)
    top = lp.topk(k, dim=-1)
    stats = torch.stack([logits.mean(-1), logits.std(-1)], dim=-1)
    return top.indices, top.values, stats


class HFTeacherForcer:
    """Teacher-forced forward with transformers: right-padded batches (positions unaffected),
    vision features merged by the model, the LM head applied only at kept positions."""

    def __init__(self, teacher: TeacherConfig, top_k: int):
        import torch
        from transformers import AutoModelForImageTextToText

        self.k = top_k
        self.adapter = teacher_adapter(teacher)
        self.processor, self.tokenizer = self.adapter.processor, self.adapter.tokenizer
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = getattr(torch, resolve_dtype(teacher.dtype))
        self.model = AutoModelForImageTextToText.from_pretrained(teacher.model, dtype=self.dtype).to(self.device).eval()
        self.head = self.model.get_output_embeddings()
        self.hidden_size = int(self.head.weight.shape[1])

    def forward_hidden(self, reqs: Sequence[ForceRequest]):
        """Final post-norm hidden states ``[B, L, H]`` of a right-padded batch (the bare pass the
        benchmark compares the stage against)."""
        import torch

        batch = self.adapter.collate([r.inputs for r in reqs])
        batch = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                 for k, v in batch.items()}
        with torch.inference_mode():
            out = self.model.model(**batch)
        return out.last_hidden_state

    def score(self, reqs: Sequence[ForceRequest]) -> list[ForceResult]:
        import torch

        h = self.forward_hidden(reqs)
        res = []
        with torch.inference_mode():
            for b, r in enumerate(reqs):
                hs = h[b, torch.tensor(r.positions, dtype=torch.long, device=h.device)]
                ids, lps, stats = topk_from_hidden(hs, self.head.weight, self.k, getattr(self.head, "bias", None))
                res.append(ForceResult(hs.float().cpu().numpy(), ids.cpu().numpy(), lps.cpu().numpy(),
                                       stats.cpu().numpy()))
        return res


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


def make_forcer(kind: str, teacher: TeacherConfig, top_k: int):
    if kind == "vllm":
        return VLLMTeacherForcer(teacher, top_k)
    return HFTeacherForcer(teacher, top_k)


class VLLMTeacherForcer:
    """Teacher-forced pass with vLLM: ``SamplingParams(max_tokens=1, prompt_logprobs=k)``
    gives the raw top-k log-probs at every prompt position; a forward hook on the language
    model's final norm (installed with ``llm.apply_model``) captures the post-norm hidden states
    of the same pass. That needs the engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
    and one request per call (so the captured rows are that prompt's, in order); prefix caching
    is off so every position is computed. The logit mean/std come from the captured hidden
    states and the output head (the same recomputation students do)."""

    def __init__(self, teacher: TeacherConfig, top_k: int):
        import torch

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        from vllm import LLM

        self.k = top_k
        self.adapter = teacher_adapter(teacher)
        self.processor, self.tokenizer = self.adapter.processor, self.adapter.tokenizer
        head = output_head(teacher.model)
        self.head_w, self.head_b = head["weight"].float(), head.get("bias")
        self.hidden_size = int(self.head_w.shape[1])
        kw = vllm_engine_kwargs(teacher, torch.cuda.is_available())
        # prefix caching off: every position's hidden state must be computed (and captured); so the
        # small CPU block, there only for prefix reuse, is not needed either (unless set explicitly)
        kw.update(enable_prefix_caching=False, max_logprobs=max(20, top_k), logprobs_mode="raw_logprobs")
        if teacher.kv_block_size is None:
            kw.pop("block_size", None)
        # always eager, whatever teacher.enforce_eager says: the final-norm hook must run on every
        # forward, and a replayed CUDA graph (or a compiled graph) would skip its Python side effect
        kw["enforce_eager"] = True
        self.llm = LLM(**kw)
        self.llm.apply_model(_install_norm_hook)

    def score(self, reqs: Sequence[ForceRequest]) -> list[ForceResult]:
        import torch
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=self.k, detokenize=False)
        res = []
        for r in reqs:
            if r.prompt is None:
                raise ValueError("the vLLM teacher forcer needs the rendered prompt text")
            p = vllm_prompt(self.adapter, r.prompt, r.image)
            self.llm.apply_model(_reset_norm_hook)
            out = self.llm.generate([p], params, use_tqdm=False)[0]
            if list(out.prompt_token_ids) != list(r.input_ids):
                raise RuntimeError("vLLM tokenised the conversation differently from the chat-template spans "
                                   f"({len(out.prompt_token_ids)} vs {len(r.input_ids)} tokens)")
            hidden = torch.cat(self.llm.apply_model(_take_norm_hook)[0], dim=0)[: len(r.input_ids)]
            hs = hidden[torch.tensor(r.positions, dtype=torch.long)].float()
            top_ids, top_lp = [], []
            for pos in r.positions:
                d = out.prompt_logprobs[pos + 1]  # entry p scores token p from the prefix [0, p)
                best = sorted(((v.rank, tid, v.logprob) for tid, v in d.items() if v.rank <= self.k))[: self.k]
                top_ids.append([t for _, t, _ in best])
                top_lp.append([lp for _, _, lp in best])
            _, _, stats = topk_from_hidden(hs, self.head_w, 1, self.head_b)
            import numpy as np

            res.append(ForceResult(hs.numpy(), np.asarray(top_ids, dtype=np.int64).reshape(-1, self.k),
                                   np.asarray(top_lp, dtype=np.float32).reshape(-1, self.k), stats.numpy()))
        return res


def _final_norm(model):
    """The language model's final norm in vLLM's module tree, whatever the family nests it under
    (``language_model.model.norm``, Idefics3's ``model.text_model.norm`` …): the shortest-named module
    called ``norm`` outside the vision tower."""
    found = [(n, m) for n, m in model.named_modules()
             if n.split(".")[-1] == "norm" and not any(v in n for v in ("vision", "visual"))]
    if not found:
        raise RuntimeError("no final norm found in the vLLM model: cannot capture hidden states")
    return min(found, key=lambda nm: (nm[0].count("."), nm[0]))[1]


def _install_norm_hook(model):
    norm = _final_norm(model)
    norm._llavadi_rows = []

    def hook(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        mod._llavadi_rows.append(h.detach().float().cpu())

    norm.register_forward_hook(hook)
    return True


def _reset_norm_hook(model):
    _final_norm(model)._llavadi_rows = []


def _take_norm_hook(model):
    return _final_norm(model)._llavadi_rows
