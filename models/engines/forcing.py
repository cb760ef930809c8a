"""Teacher forcing: the teacher's final-layer hidden states, top-k log-probs and logit statistics at
the positions that predict each answer token of a whole conversation, by HF transformers (a
right-padded batch, the family's forward inputs collated by ``ModelAdapter``) or by vLLM
(``prompt_logprobs`` + a forward hook on the language model's final norm)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

from ...pipeline.config import TeacherConfig
from .common import output_head, resolve_dtype, teacher_adapter, vllm_engine_kwargs, vllm_prompt


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
    (``language_model.model.norm``, Idefics3's ``model.text_model.norm`` …): the ``norm`` of the
    decoder stack (a module with ``layers`` and ``norm``) outside the vision tower — not a projector's
    own norm (Mistral3's ``multi_modal_projector.norm`` runs on image features only)."""
    import torch

    found = [(n, m.norm) for n, m in model.named_modules()
             if hasattr(m, "layers") and isinstance(getattr(m, "norm", None), torch.nn.Module)
             and not any(v in n for v in ("vision", "visual"))]
    if not found:
        raise RuntimeError("no decoder stack with a final norm found in the vLLM model: cannot capture hidden states")
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
