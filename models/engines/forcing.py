"""Teacher forcing: what the teacher computes at chosen positions of a whole conversation — the hidden
states of chosen layers, its next-token distribution (top-k, sampled tokens, logit statistics) and the
image × answer affinity — by HF transformers (a right-padded batch, the family's forward inputs collated
by ``ModelAdapter``) or by vLLM (the pooling runner's per-token final hidden states, a batch of requests
per call). Both forcers hand the kept final-layer rows to one function, :func:`teacher_outputs`, which
applies the output head on the device and derives every logit field; what to compute is a
``schemas.teacher_cache.CacheSpec``."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ...pipeline.config import TeacherConfig
from ...schemas.teacher_cache.fields import CacheSpec
from .common import output_head, resolve_dtype, teacher_adapter, vllm_engine_kwargs, vllm_prompt

HEAD_BLOCK_BYTES = 64 << 20  # float32 logits per block of rows through the head: [rows, V] ≤ 64 MiB


@dataclass
class ForceRequest:
    """One conversation for the teacher-forced pass.

    ``input_ids``: the whole conversation, image placeholder already expanded ([L] ints);
    ``positions``: the rows kept (sorted; a row ``p`` holds the state at ``p`` and the distribution over
    token ``p + 1``); ``inputs``: the sample's forward inputs (``models.adapter.Encoded.inputs``, batch
    dim 1); ``prompt``: the rendered text (the vLLM forcer sends its token ids); ``sample_id``: keys the
    sampled-logit draws; ``affinity``: (image positions, answer-token positions) when the affinity block
    is wanted."""

    input_ids: list[int]
    positions: list[int]
    inputs: Optional[dict] = None
    image: Optional[object] = None
    prompt: Optional[str] = None
    sample_id: str = ""
    affinity: Optional[tuple[list[int], list[int]]] = None


@dataclass
class ForceResult:
    """Per kept row (n rows): ``hidden`` layer → ``[n, H] float32``; ``logits`` field name →
    array (``topk_ids [n,k] int64``, ``topk_logprobs [n,k] float32``, ``sampled_ids [n,s] int64``,
    ``sampled_logprobs [n,s] float32``, ``logit_stats [n,2] float32``: mean, std with Bessel's correction);
    ``affinity [n_image, n_answer] float32`` or None."""

    hidden: dict = field(default_factory=dict)
    logits: dict = field(default_factory=dict)
    affinity: Optional[np.ndarray] = None


# ------------------------------------------------------------------------------ one head, one derivation
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 (Steele, Lea & Flood 2014) on uint64 arrays, wrapping arithmetic."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def draw_uniforms(seed: int, sample_id: str, positions: Sequence[int], s: int) -> np.ndarray:
    """``[n, s] float64`` uniforms in [0, 1) for the sampled-logit draws of a sample's rows: counter-based,
    ``u[p, j] = splitmix64(key + p·s + j) / 2^64`` with ``key = splitmix64(seed ⊕ blake2b(sample_id))``, so a
    row's draws depend on (seed, sample id, position) only — not on the batch, the other rows kept or a
    rerun."""
    h = int.from_bytes(hashlib.blake2b(sample_id.encode("utf-8"), digest_size=8).digest(), "little")
    key = _splitmix64(np.asarray([(h ^ int(seed)) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    ctr = (np.asarray(positions, dtype=np.uint64)[:, None] * np.uint64(s) + np.arange(s, dtype=np.uint64)[None, :])
    with np.errstate(over="ignore"):
        z = _splitmix64(ctr + key)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def teacher_outputs(h, head_w, head_b, spec: CacheSpec, uniforms: Optional[np.ndarray] = None) -> dict:
    """Logit fields of ``spec`` from final hidden states ``h [N, H]`` and the output head ``head_w [V, H]``
    (+ ``head_b [V]``), computed on ``h``'s device in float32, in blocks of rows (``[rows, V]`` logits
    ≤ ``HEAD_BLOCK_BYTES``). Returns numpy arrays:

    * ``topk``: ``topk_ids [N,k]``, ``topk_logprobs [N,k]`` — the k largest of ``log_softmax(logits)``;
    * ``sampled`` (RS-KD, Anshumann et al., ACL 2025, §3): ``s`` tokens drawn with replacement from the
      proposal ``q = softmax(logits / t)`` (``t = sample_temperature``) by inverse CDF (float64) at
      ``uniforms [N, s]``, sorted; their estimate of the teacher ``p`` is the self-normalised importance
      weight ``p̂(x) = c_x·p(x)/q(x) / Σ_y c_y·p(y)/q(y)`` (``c_x`` = multiplicity), i.e. ``c_x / s`` when
      ``t = 1`` (unbiased for any loss linear in p, such as CE(p, student)); ``sampled_logprobs`` = ``log p(x)``
      at each draw when ``t != 1``;
    * ``logit_stats [N, 2]``: mean and std (Bessel) of the logit row.
    """
    import torch

    out: dict[str, list] = {}
    N = int(h.shape[0])
    if spec.logits == "none" or N == 0:
        return _empty_logits(spec, N)
    w = head_w.to(h.device, torch.float32)
    b = None if head_b is None else head_b.to(h.device, torch.float32)
    V = int(w.shape[0])
    block = max(1, HEAD_BLOCK_BYTES // (4 * V))
    u_all = None if uniforms is None else torch.as_tensor(uniforms, dtype=torch.float64, device=h.device)
    for a in range(0, N, block):
        logits = h[a:a + block].float() @ w.T
        if b is not None:
            logits = logits + b
        lp = torch.log_softmax(logits, dim=-1)
        if spec.logits == "topk":
            top = lp.topk(spec.top_k, dim=-1)
            out.setdefault("topk_ids", []).append(top.indices)
            out.setdefault("topk_logprobs", []).append(top.values)
        else:
            q = torch.softmax(logits.double() / spec.sample_temperature, dim=-1)
            cdf = torch.cumsum(q, dim=-1)
            u = u_all[a:a + block] * cdf[:, -1:]
            draws = torch.searchsorted(cdf, u, right=True).clamp_(max=V - 1).sort(dim=-1).values
            out.setdefault("sampled_ids", []).append(draws)
            if spec.sampled_logprobs:
                out.setdefault("sampled_logprobs", []).append(lp.gather(1, draws))
        if spec.stores_logit_stats:
            out.setdefault("logit_stats", []).append(torch.stack([logits.mean(-1), logits.std(-1)], dim=-1))
    return {k: torch.cat(v).cpu().numpy() for k, v in out.items()}


def _empty_logits(spec: CacheSpec, n: int) -> dict:
    if spec.logits == "none":
        return {}
    out = {"topk_ids": np.zeros((n, spec.top_k), np.int64), "topk_logprobs": np.zeros((n, spec.top_k), np.float32)} \
        if spec.logits == "topk" else {"sampled_ids": np.zeros((n, spec.samples), np.int64)}
    if spec.sampled_logprobs:
        out["sampled_logprobs"] = np.zeros((n, spec.samples), np.float32)
    if spec.stores_logit_stats:
        out["logit_stats"] = np.zeros((n, 2), np.float32)
    return out


def affinity_block(h_final, image_positions: Sequence[int], answer_positions: Sequence[int]) -> np.ndarray:
    """``[n_image, n_answer] float32``: cosine similarity of ``h_final [L, H]`` at the image positions and at
    the answer-token positions (the LLAVADI study's ``align_affinity``: ``F.normalize`` then a matmul)."""
    import torch

    hi = torch.nn.functional.normalize(h_final[list(image_positions)].float(), dim=-1)
    ha = torch.nn.functional.normalize(h_final[list(answer_positions)].float(), dim=-1)
    return (hi @ ha.T).cpu().numpy()


def results(reqs: Sequence[ForceRequest], final: Sequence, layers: dict, head_w, head_b, spec: CacheSpec,
            seed: int) -> list[ForceResult]:
    """Per request: ``final[b]`` = its final hidden states ``[L_b, H]`` (device tensor), ``layers`` = layer →
    per-request ``[L_b, H]`` for the other cached layers. The head runs once over every request's kept rows."""
    import torch

    counts = [len(r.positions) for r in reqs]
    idx = [torch.as_tensor(r.positions, dtype=torch.long, device=final[b].device) for b, r in enumerate(reqs)]
    rows = torch.cat([final[b][idx[b]] for b in range(len(reqs))]) if reqs else None
    uni = None
    if spec.logits == "sampled":
        uni = np.concatenate([draw_uniforms(seed, r.sample_id, r.positions, spec.samples) for r in reqs])
    logits = teacher_outputs(rows, head_w, head_b, spec, uni) if rows is not None else {}
    res, a = [], 0
    for b, (r, n) in enumerate(zip(reqs, counts)):
        hidden = {}
        for layer in spec.hidden_layers:
            src = final[b] if layer == -1 else layers[layer][b]
            hidden[layer] = src[idx[b]].float().cpu().numpy()
        aff = affinity_block(final[b], *r.affinity) if spec.affinity and r.affinity else None
        res.append(ForceResult(hidden, {k: v[a:a + n] for k, v in logits.items()}, aff))
        a += n
    return res


# ------------------------------------------------------------------------------------------ the forcers
class HFTeacherForcer:
    """Teacher-forced forward with transformers: right-padded batches (positions unaffected), vision
    features merged by the model, ``output_hidden_states`` only when a layer other than -1 is cached."""

    def __init__(self, teacher: TeacherConfig, spec: CacheSpec, seed: int = 0):
        import torch
        from transformers import AutoModelForImageTextToText

        self.spec, self.seed = spec, seed
        self.adapter = teacher_adapter(teacher)
        self.processor, self.tokenizer = self.adapter.processor, self.adapter.tokenizer
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = getattr(torch, resolve_dtype(teacher.dtype))
        self.model = AutoModelForImageTextToText.from_pretrained(teacher.model, dtype=self.dtype).to(self.device).eval()
        self.head = self.model.get_output_embeddings()
        self.hidden_size = int(self.head.weight.shape[1])

    def forward(self, reqs: Sequence[ForceRequest]):
        """(final post-norm hidden ``[B, L, H]``, {layer: ``[B, L, H]``} for the other cached layers) of a
        right-padded batch (the bare pass the benchmark compares the stage against)."""
        import torch

        batch = self.adapter.collate([r.inputs for r in reqs])
        batch = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                 for k, v in batch.items()}
        others = [x for x in self.spec.hidden_layers if x != -1]
        with torch.inference_mode():
            out = self.model.model(**batch, output_hidden_states=bool(others))
        return out.last_hidden_state, {x: out.hidden_states[x] for x in others}

    def forward_hidden(self, reqs: Sequence[ForceRequest]):
        """Final post-norm hidden states ``[B, L, H]`` of a right-padded batch."""
        return self.forward(reqs)[0]

    def score(self, reqs: Sequence[ForceRequest]) -> list[ForceResult]:
        import torch

        final, layers = self.forward(reqs)
        with torch.inference_mode():
            return results(reqs, [final[b] for b in range(len(reqs))],
                           {x: [h[b] for b in range(len(reqs))] for x, h in layers.items()},
                           self.head.weight, getattr(self.head, "bias", None), self.spec, self.seed)


def vllm_problems(spec: CacheSpec) -> list[str]:
    """Fields the vLLM forcer cannot give (refused before work)."""
    others = [x for x in spec.hidden_layers if x != -1]
    if others:
        return [f"cache_teacher.hidden_layers={list(spec.hidden_layers)}: the vLLM forcer reads vLLM's pooling "
                f"runner, which returns the final post-norm hidden state only (no intermediate layer); use "
                f"cache_teacher.engine=hf for layers {others}, or hidden_layers=[-1]"]
    return []


def make_forcer(kind: str, teacher: TeacherConfig, spec: CacheSpec, seed: int = 0):
    if kind == "vllm":
        return VLLMTeacherForcer(teacher, spec, seed)
    return HFTeacherForcer(teacher, spec, seed)


class VLLMTeacherForcer:
    """Teacher-forced pass with vLLM's pooling runner (``runner="pooling"``, ``convert="embed"``,
    ``PoolerConfig(task="token_embed", tok_pooling_type="ALL", use_activation=False)``: one post-norm row per
    prompt token; without ``use_activation=False`` rows come back L2-normalised): every request of a
    batch goes to one ``LLM.encode`` call (continuous batching; compilation and CUDA graphs as
    ``teacher.enforce_eager`` allows), no hooks into vLLM's modules. The output head (read from the
    safetensors) and every logit field are applied to the kept rows by :func:`teacher_outputs`, the same
    code the HF forcer uses. Prefix caching is off (a cached prefix is not re-pooled)."""

    def __init__(self, teacher: TeacherConfig, spec: CacheSpec, seed: int = 0):
        import torch

        problems = vllm_problems(spec)
        if problems:
            raise ValueError(problems[0])
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        from vllm import LLM
        from vllm.config import PoolerConfig

        self.spec, self.seed = spec, seed
        self.adapter = teacher_adapter(teacher)
        self.processor, self.tokenizer = self.adapter.processor, self.adapter.tokenizer
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        head = output_head(teacher.model)
        self.head_w = head["weight"].to(self.device, torch.float32)
        self.head_b = None if head.get("bias") is None else head["bias"].to(self.device, torch.float32)
        self.hidden_size = int(self.head_w.shape[1])
        kw = vllm_engine_kwargs(teacher, torch.cuda.is_available())
        kw.update(enable_prefix_caching=False, runner="pooling", convert="embed",
                  pooler_config=PoolerConfig(task="token_embed", tok_pooling_type="ALL", use_activation=False))
        if teacher.kv_block_size is None:
            kw.pop("block_size", None)
        self.llm = LLM(**kw)

    def score(self, reqs: Sequence[ForceRequest]) -> list[ForceResult]:
        import torch

        prompts = []
        for r in reqs:
            if r.prompt is None:
                raise ValueError("the vLLM teacher forcer needs the rendered prompt text")
            prompts.append(vllm_prompt(self.adapter, r.prompt, r.image))
        outs = self.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
        final = []
        for r, o in zip(reqs, outs):
            if list(o.prompt_token_ids) != list(r.input_ids):
                raise RuntimeError("vLLM tokenised the conversation differently from the chat-template spans "
                                   f"({len(o.prompt_token_ids)} vs {len(r.input_ids)} tokens)")
            final.append(torch.as_tensor(o.outputs.data).to(self.device))
        with torch.inference_mode():
            return results(reqs, final, {}, self.head_w, self.head_b, self.spec, self.seed)
