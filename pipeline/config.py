"""Typed run configuration: one YAML per run with a section per stage.

Contract
- ``LlavadiConfig`` is a tree of dataclasses; ``Literal`` fields are choices, units are in the
  names (``timeout_s``, ``max_new_tokens``).
- ``load_config(base, overrides)`` builds it from a nested dict plus ``key=value`` overrides
  (values parsed as YAML scalars/lists) and validates the *whole* tree, raising one
  ``ConfigError`` that lists every problem.
- ``to_dict``/``dump_yaml`` give the resolved form written to ``RUN/config.yaml``.
- The run section (executor, Ray address, worker counts) is *not* part of any stage
  fingerprint: the same stage gives the same bytes on either executor.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from .config_on_policy import OnPolicyConfig


def prompt_format_problems(key: str, value: str) -> list[str]:
    """``auto``, ``llava_v1`` or an existing Jinja file."""
    import os

    if value in ("auto", "llava_v1") or os.path.isfile(value):
        return []
    return [f"{key}={value!r}: use auto (the checkpoint's chat template), llava_v1 (LLaVA's conv_vicuna_v1) "
            f"or the path of a Jinja chat template file"]


class ConfigError(ValueError):
    """All problems found in a configuration, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class RunConfig:
    """Where and how stages execute. Not fingerprinted."""

    executor: Literal["ray", "local"] = "ray"  # ray: shards in Ray actors; local: in-process, one shard after another (debugging)
    ray_address: Optional[str] = None  # host:port of a cluster to join, or auto (the one running on this machine); None: $RAY_ADDRESS if set, else an embedded cluster; local: embedded even with $RAY_ADDRESS
    num_cpus: int = 2  # embedded cluster size; with 1 CPU an actor asking for 1 CPU deadlocks
    num_workers: int = 2  # shard workers (Ray actors) per stage
    cpus_per_worker: float = 1.0  # Ray CPUs each shard worker asks for
    max_retries: int = 2  # re-runs of a shard whose worker process died

    def validate(self) -> list[str]:
        p = []
        if self.num_cpus < 1:
            p.append("run.num_cpus must be >= 1")
        if self.num_workers < 1:
            p.append("run.num_workers must be >= 1")
        if self.cpus_per_worker <= 0:
            p.append("run.cpus_per_worker must be > 0")
        if self.max_retries < 0:
            p.append("run.max_retries must be >= 0")
        return p


@dataclass
class IngestConfig:
    """``llavadi ingest``: LLaVA JSON / JSONL / Parquet → Parquet sample shards."""

    inputs: list[str] = field(default_factory=list)  # paths or fsspec URLs (--input): .json (a list), .jsonl, .parquet
    image_root: Optional[str] = None  # image paths in records are relative to this (images embedded in a Parquet go to RUN/data/images/)
    shard_size: int = 1000  # records per output shard
    max_chars: int = 65536  # a conversation longer than this (all turns) is rejected
    check_images: bool = True  # open + decode every image (sha256 is always computed)

    def validate(self) -> list[str]:
        p = []
        if self.shard_size < 1:
            p.append("ingest.shard_size must be >= 1")
        if self.max_chars < 1:
            p.append("ingest.max_chars must be >= 1")
        return p


@dataclass
class TeacherConfig:
    """The teacher model, shared by regenerate and cache-teacher (and eval's teacher row)."""

    model: Optional[str] = None  # a save_pretrained directory (LLaVA-style, with processor)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    max_model_len: Optional[int] = None  # None: the model's max_position_embeddings
    tensor_parallel_size: int = 1  # GPUs per vLLM engine
    gpu_memory_utilization: float = 0.85  # share of each GPU vLLM may take (weights + KV cache)
    num_actors: int = 1  # engine replicas (Ray actors), each loads the teacher once
    gpus_per_actor: float = 0.0  # 0 on CPU; = tensor_parallel_size on GPU machines
    cpus_per_actor: float = 1.0  # Ray CPUs each engine actor asks for
    # regenerate's vLLM engine: None = eager on CPU (torch.compile adds ~1 min to the start, needs a
    # C++ compiler, and decoded only 0-6 % faster on a 164M teacher in four runs of
    # benchmarks/regenerate.py), vLLM's default on GPU (compiled + CUDA graphs). Applies to cache-teacher's
    # vLLM forcer (the pooling runner) too.
    enforce_eager: Optional[bool] = None
    # regenerate's vLLM engine reuses the KV of prompt prefixes it has computed: the system prompt
    # every request shares, and turn t's whole conversation inside turn t+1's prompt. Emptied at the
    # start of every shard, so a shard's output never depends on what the engine served before it
    # (what keeps kill-and-resume exact). cache-teacher never uses it (every position is computed).
    prefix_caching: bool = True
    # vLLM's KV-cache block in tokens; prefixes are cached in whole blocks. None: 32 on CPU (the
    # smallest its attention takes; its default, 128, is longer than a LLaVA system prompt), vLLM's
    # default on GPU.
    kv_block_size: Optional[int] = None
    # how conversations become the teacher's prompts (models/prompts.py): auto = the checkpoint's own
    # chat template (processor or tokenizer), llava_v1 = LLaVA's conv_vicuna_v1 (what LLaVA-1.5 and
    # the study trained on), or a path to a Jinja chat template
    prompt_format: str = "auto"

    def validate(self) -> list[str]:
        p = []
        p += prompt_format_problems("teacher.prompt_format", self.prompt_format)
        if self.max_model_len is not None and self.max_model_len < 16:
            p.append("teacher.max_model_len must be >= 16")
        if self.tensor_parallel_size < 1:
            p.append("teacher.tensor_parallel_size must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            p.append("teacher.gpu_memory_utilization must be in (0, 1]")
        if self.num_actors < 1:
            p.append("teacher.num_actors must be >= 1")
        if self.gpus_per_actor < 0 or self.cpus_per_actor <= 0:
            p.append("teacher.gpus_per_actor must be >= 0 and teacher.cpus_per_actor > 0")
        if self.kv_block_size is not None and (self.kv_block_size < 16 or self.kv_block_size % 16):
            p.append("teacher.kv_block_size must be a multiple of 16 (32 on CPU), or null for the default")
        return p


@dataclass
class SamplingConfig:
    """Teacher sampling for regeneration. The study: temperature 1.0, 128 new tokens."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling; 1 = off
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 128  # per answer turn
    min_new_tokens: int = 0  # per answer turn: end-of-sequence and stop strings are ignored before
    stop: list[str] = field(default_factory=list)  # stop strings (the answer is cut before them)

    def validate(self) -> list[str]:
        p = []
        if self.temperature < 0:
            p.append("regenerate.sampling.temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            p.append("regenerate.sampling.top_p must be in (0, 1]")
        if self.top_k < 0:
            p.append("regenerate.sampling.top_k must be >= 0 (0 = off)")
        if self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            p.append("regenerate.sampling: need 1 <= max_new_tokens and 0 <= min_new_tokens <= max_new_tokens")
        return p


@dataclass
class RegenerateConfig:
    """``llavadi regenerate``: every assistant turn re-answered by the teacher, turn by turn."""

    engine: Literal["vllm", "hf"] = "vllm"  # vllm: engines in Ray actors; hf: transformers generate
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0  # per-sample seeds derive from (seed, sample id, turn): a rerun is identical
    block_size: int = 256  # samples per turn-synchronous generate call
    reject_truncated: bool = False  # an answer that hit max_new_tokens is a reject (else kept)
    on_failure: Literal["reject", "keep_original"] = "reject"  # what a failed sample/turn becomes

    def validate(self) -> list[str]:
        p = self.sampling.validate()
        if self.block_size < 1:
            p.append("regenerate.block_size must be >= 1")
        return p


@dataclass
class CacheTeacherConfig:
    """``llavadi cache-teacher``: teacher-forced pass over whole conversations → teacher cache. What the
    cache holds is declared by these keys (``schemas/teacher_cache/fields.py``)."""

    source: Literal["regenerate", "data"] = "regenerate"  # the study's regenerated-or-original ablation
    # what runs the teacher-forced pass: hf = transformers, vllm = vLLM's pooling runner (final layer only).
    # Default hf: every family and layer, no vLLM install or engine start-up; vllm's pass measured faster on
    # the 164M benchmark teacher (benchmarks/cache_teacher.py; README: Engines), expected more so on GPU
    engine: Literal["hf", "vllm"] = "hf"
    # rows kept: answer = positions predicting answer tokens; text = + prompt/system positions; all = + image positions
    positions: Literal["answer", "text", "all"] = "answer"
    # decoder layers cached per row, as output_hidden_states indexes them (-1 = final post-norm); [] = logits-only cache
    hidden_layers: list[int] = field(default_factory=lambda: [-1])
    logits: Literal["topk", "sampled", "none"] = "topk"  # topk: k ids + log-probs (+ tail); sampled: RS-KD draws
    top_k: int = 64  # teacher log-probs kept per row with logits=topk (the rest is one tail bucket)
    samples: int = 16  # tokens drawn per row with logits=sampled (RS-KD, Anshumann et al. 2025)
    sample_temperature: float = 1.0  # proposal temperature of the draws (1 = the teacher itself: weights c/s)
    sample_seed: int = 0  # draws are keyed by (seed, sample id, position): a rerun writes identical bytes
    affinity: bool = False  # per image sample, the image x answer cosine block of final hidden states (fp16)
    hidden_dtype: Literal["float16", "bfloat16", "int8"] = "float16"  # hidden-state storage (int8: per-row scale)
    logprob_dtype: Literal["float32", "float16"] = "float32"  # top-k / sampled log-prob storage
    store: Literal["zarr", "webdataset"] = "zarr"  # zarr: a Zarr v3 directory per shard; webdataset: a tar per shard
    batch_size: int = 8  # conversations per forward pass (sorted by length within a window)
    # with engine=vllm: conversations per LLM.encode call (continuous batching inside it); every position of
    # every prompt comes back (L x H float32 each), so this bounds the memory of one call
    vllm_requests: int = 32
    # rows whose tokens the size estimate counts (--dry-run, status, the launch's disk-space check):
    # evenly spaced over the input, the rest extrapolated; 0 = every row (pipeline/estimate.py)
    estimate_rows: int = 1000
    # samples the estimate runs the teacher on to measure compressed bytes per row (0: no teacher run,
    # uncompressed sizes — an upper bound)
    estimate_probe_samples: int = 8
    ignore_space_check: bool = False  # launch even when the estimated cache exceeds the free disk space

    def validate(self) -> list[str]:
        p = []
        if self.top_k < 1:
            p.append("cache_teacher.top_k must be >= 1")
        if not 1 <= self.samples <= 255:
            p.append("cache_teacher.samples must be in [1, 255]")
        if not self.sample_temperature > 0:
            p.append("cache_teacher.sample_temperature must be > 0")
        if len(set(self.hidden_layers)) != len(self.hidden_layers):
            p.append(f"cache_teacher.hidden_layers lists a layer twice: {self.hidden_layers}")
        if not self.hidden_layers and self.logits == "none":
            p.append("cache_teacher.hidden_layers=[] with cache_teacher.logits=none caches nothing to distil: "
                     "keep a hidden layer or a logits field")
        if self.batch_size < 1:
            p.append("cache_teacher.batch_size must be >= 1")
        if self.vllm_requests < 1:
            p.append("cache_teacher.vllm_requests must be >= 1")
        if self.estimate_rows < 0:
            p.append("cache_teacher.estimate_rows must be >= 0 (0 = every row)")
        if self.estimate_probe_samples < 0:
            p.append("cache_teacher.estimate_probe_samples must be >= 0 (0 = no teacher run)")
        return p


@dataclass
class KDConfig:
    """The logit-distillation term (``stages/train_student/terms.py``: KD)."""

    # fkl: forward KL (the study's); rkl: reverse KL; jsd: generalized JSD; tvd: total variation; mse: MSE on the
    # logits (the study's mse_distill; needs source=exact)
    kind: Literal["fkl", "rkl", "jsd", "tvd", "mse"] = "fkl"
    beta: float = 0.5  # JSD mixture weight (TRL convention: 0 → forward KL, 1 → reverse KL)
    temperature: float = 1.0  # the loss is multiplied by T² (Hinton)
    # rows KD reads: answer (the study's default), text (+ prompt/system positions), all (+ image positions: the
    # study's align_logits_all, LLaVA-KD's visual-token KD); the cache must hold them (cache_teacher.positions)
    positions: Literal["answer", "text", "all"] = "answer"
    # topk: the cached top-k + one tail bucket; exact: full vocabulary from the cached hidden + teacher head
    # (chunked); sampled: the RS-KD estimate from the cached sampled tokens (cache_teacher.logits=sampled)
    source: Literal["topk", "exact", "sampled"] = "topk"
    exact: bool = False  # the older spelling of source=exact (kept working)
    standardize: bool = False  # logit standardization (Sun et al. 2024)
    chunk_size: int = 512  # rows per chunk on the exact path (peak ≈ chunk/N of the naive loss; 512 meets ≤ 0.25 from N ≈ 2k)

    @property
    def resolved_source(self) -> str:
        """``source``, with the older ``exact: true`` read as ``source: exact``."""
        return "exact" if self.exact else self.source

    def validate(self) -> list[str]:
        p = []
        if not 0 <= self.beta <= 1:
            p.append("train_student.kd.beta must be in [0, 1]")
        if self.temperature <= 0:
            p.append("train_student.kd.temperature must be > 0")
        if self.chunk_size < 1:
            p.append("train_student.kd.chunk_size must be >= 1")
        if self.exact and self.source not in ("topk", "exact"):
            p.append(f"train_student.kd.exact=true (the older spelling of kd.source=exact) contradicts "
                     f"kd.source={self.source}: set only train_student.kd.source")
        src = self.resolved_source
        if self.kind == "mse" and src != "exact":
            p.append("train_student.kd.kind=mse (MSE on the logits) needs the full logits: set train_student.kd.source=exact")
        if self.kind == "mse" and self.temperature != 1.0:
            p.append("train_student.kd.kind=mse compares logits directly: train_student.kd.temperature must be 1")
        if src == "sampled" and (self.kind != "fkl" or self.temperature != 1.0 or self.standardize):
            p.append("train_student.kd.source=sampled (RS-KD) estimates the teacher's distribution from its sampled "
                     "tokens: only kind=fkl at temperature 1 without standardize (a tempered, standardized or "
                     "student-weighted divergence needs the teacher's full row; use source=topk or exact)")
        return p


@dataclass
class FeatureConfig:
    """The hidden-state feature term (``stages/train_student/terms.py``: FEAT), one per layer pair."""

    kind: Literal["mse", "cosine"] = "mse"  # distance between projector(student hidden) and the teacher hidden
    # none: identity (student and teacher widths must be equal); linear; mlp = Linear-GELU-Linear (the study's)
    projector: Literal["none", "linear", "mlp"] = "mlp"
    positions: Literal["answer", "text", "all"] = "answer"  # rows the term reads (the study's final recipe: all)
    # [student_layer, teacher_layer] pairs, as output_hidden_states indexes them (-1 = the final post-norm state);
    # the cache must hold each teacher layer (cache_teacher.hidden_layers); one projector per pair
    layers: list[list[int]] = field(default_factory=lambda: [[-1, -1]])

    def validate(self) -> list[str]:
        p = []
        if not self.layers or any(len(pair) != 2 for pair in self.layers):
            p.append(f"train_student.feature.layers must be a list of [student_layer, teacher_layer] pairs, "
                     f"got {self.layers}")
        elif len({tuple(x) for x in self.layers}) != len(self.layers):
            p.append(f"train_student.feature.layers lists a pair twice: {self.layers}")
        return p


@dataclass
class LoRAConfig:
    """LoRA adapters on the student's language model (PEFT; Hu et al. 2021): the LM's base weights are
    frozen, each adapted linear layer W gets W + (alpha / rank) · B·A. The final student is saved merged."""

    enabled: bool = False  # train LoRA adapters instead of the LM's weights (the LM's base weights stay frozen whatever freeze_lm says)
    rank: int = 16  # r: inner dimension of each adapter's A [r, in] and B [out, r]
    alpha: float = 32.0  # scaling numerator: the update is (alpha / rank) · B·A (Hu et al. 2021, §4.1)
    dropout: float = 0.05  # dropout on the adapter's input during training
    # leaf names of the language model's linear layers to adapt (modules of the vision tower or projector with
    # the same names are never adapted); null = the model family's default (models/: attention + MLP projections)
    target_modules: Optional[list[str]] = None

    def validate(self) -> list[str]:
        import re

        p = []
        if self.rank < 1:
            p.append("train_student.lora.rank must be >= 1")
        if not self.alpha > 0:
            p.append("train_student.lora.alpha must be > 0")
        if not 0 <= self.dropout < 1:
            p.append("train_student.lora.dropout must be in [0, 1)")
        if self.target_modules is not None:
            bad = [t for t in self.target_modules if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(t))]
            if not self.target_modules or bad:
                p.append(f"train_student.lora.target_modules: a non-empty list of module leaf names such as q_proj "
                         f"(no dots, no regex), or null for the family's default; got {self.target_modules!r}")
        return p


@dataclass
class TrainStudentConfig:
    """``llavadi train-student``. Defaults = the study's final recipe (preset ``llavadi``):
    CE + forward KL + MSE, weights 1, T = 1, lr 2e-5 cosine, warmup 3%, 1 epoch, vision frozen."""

    student: Optional[str] = None  # save_pretrained directory of the initial student (with processor)
    prompt_format: str = "auto"  # the student's prompts: auto | llava_v1 | PATH.jinja (as teacher.prompt_format)
    # loss = ce_weight·CE + kd_weight·KD + feature_weight·Σ FEAT[pair] + affinity_weight·AFFINITY (terms.py)
    ce_weight: float = 1.0  # cross-entropy at the answer tokens (train_student.ce_target)
    kd_weight: float = 1.0  # logit KD (train_student.kd)
    feature_weight: float = 1.0  # hidden-state feature loss (train_student.feature), each layer pair
    # MSE between the student's and the teacher's image x answer cosine blocks of final hidden states (the study's
    # align_affinity; needs cache_teacher.affinity=true and the same image-token count in student and teacher)
    affinity_weight: float = 0.0
    ce_target: Literal["label", "teacher_argmax"] = "label"  # CE against the data's tokens or the teacher's argmax
    # token: each term is the mean over its rows in the global batch; sample: the mean over each sample's rows,
    # then over the samples (the study's code: per-sample losses / batch size)
    reduction: Literal["token", "sample"] = "token"
    kd: KDConfig = field(default_factory=KDConfig)
    feature: FeatureConfig = field(default_factory=FeatureConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    lr: float = 2e-5  # peak AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # learning rate after the warmup
    warmup_ratio: float = 0.03  # share of the steps with linear warmup
    epochs: int = 1  # passes over the cache (when max_steps is 0)
    max_steps: int = 0  # 0: epochs × steps per epoch
    batch_size: int = 8  # samples per optimizer step, all ranks together (the global batch)
    micro_batch_size: int = 8  # samples per forward on one rank (accumulation fills the global batch)
    max_grad_norm: float = 1.0  # 0 = no clipping
    # a step whose loss or gradient is non-finite (on any rank) never updates the weights; "stop": the run
    # ends with an error naming the step and the batch's sample ids; "skip": the step is dropped and
    # counted (skipped_nonfinite in metrics.jsonl)
    nonfinite: Literal["stop", "skip"] = "stop"
    freeze_vision: bool = True  # vision tower not trained (the study's recipe)
    freeze_projector: bool = False  # the model's multimodal projector not trained
    freeze_lm: bool = False  # language model (and LM head) not trained
    precision: Literal["auto", "float32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, float32 on CPU
    # ddp: every rank holds the whole student + optimizer state; fsdp: FSDP2 (fully_shard per decoder layer,
    # then the rest) shards weights, gradients and optimizer state over the ranks; checkpoints are sharded
    # (torch.distributed.checkpoint), the final student is still a save_pretrained directory
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # recompute each layer's activations in backward instead of storing them (less memory, ~1 more forward)
    gradient_checkpointing: bool = False
    seed: int = 0  # projector init and shuffle order
    shuffle_buffer: int = 1000  # samples; the buffer spans shards
    num_workers: int = 0  # DataLoader worker processes per rank
    # MB of prepared samples (rendered, tokenised, processed) kept in memory for the next epoch and for later runs
    # in the same process (sweep arms); used only when a run streams its samples more than once; 0 = off
    sample_memo_mb: int = 1024
    save_every_steps: int = 100  # checkpoint interval (the last step is always saved)
    keep_checkpoints: int = 2  # newest checkpoints kept, older ones deleted
    log_every_steps: int = 1  # metrics.jsonl / TensorBoard interval
    # a run directory (path or fsspec URL) whose finished cache_teacher/ and its source shards are
    # pulled into this run before training (students train away from the teacher's machine)
    cache_from: Optional[str] = None
    # the folder of the cache's sample images; null = the ingest.image_root of the run the samples come from
    # (cache_from's config.yaml with cache_from, else this run's)
    cache_image_root: Optional[str] = None
    log_sample_ids: bool = False  # each rank logs the ids of its samples per step (audit of DDP sharding)

    def validate(self) -> list[str]:
        p = self.kd.validate() + self.lora.validate() + prompt_format_problems("train_student.prompt_format", self.prompt_format)
        if self.lr <= 0:
            p.append("train_student.lr must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            p.append("train_student.warmup_ratio must be in [0, 1)")
        if self.epochs < 1 or self.max_steps < 0:
            p.append("train_student.epochs must be >= 1 and max_steps >= 0")
        if self.micro_batch_size < 1 or self.batch_size < self.micro_batch_size or self.batch_size % self.micro_batch_size:
            p.append("train_student.batch_size must be a multiple of micro_batch_size (>= 1)")
        p += self.feature.validate()
        if min(self.ce_weight, self.kd_weight, self.feature_weight, self.affinity_weight) < 0:
            p.append("train_student loss weights must be >= 0")
        if max(self.ce_weight, self.kd_weight, self.feature_weight, self.affinity_weight) == 0:
            p.append("train_student: every loss weight is 0 — nothing to train on")
        if self.sample_memo_mb < 0:
            p.append("train_student.sample_memo_mb must be >= 0 (0 = off)")
        if self.shuffle_buffer < 1 or self.num_workers < 0 or self.save_every_steps < 1 or self.keep_checkpoints < 1:
            p.append("train_student: shuffle_buffer, save_every_steps, keep_checkpoints must be >= 1, num_workers >= 0")
        return p


@dataclass
class EvalConfig:
    """``llavadi eval``: answers on a held-out set + KL to the teacher / perplexity on a held-out cache."""

    engine: Literal["hf", "vllm"] = "hf"  # what generates the greedy answers: transformers or vLLM
    data: Optional[str] = None  # held-out LLaVA JSON/JSONL with reference answers
    image_root: Optional[str] = None  # images of `data`; defaults to ingest.image_root
    cache: Optional[str] = None  # a held-out teacher cache directory (…/cache_teacher) for KL / perplexity
    cache_image_root: Optional[str] = None  # images of the cache's samples; defaults to its run's ingest.image_root
    # the evaluated model's prompts: auto | llava_v1 | PATH.jinja; null = train_student.prompt_format
    prompt_format: Optional[str] = None
    max_new_tokens: int = 16  # greedy answer length cap
    max_samples: int = 0  # 0 = all

    def validate(self) -> list[str]:
        p = []
        if self.max_new_tokens < 1 or self.max_samples < 0:
            p.append("eval.max_new_tokens must be >= 1 and eval.max_samples >= 0")
        if self.prompt_format is not None:
            p += prompt_format_problems("eval.prompt_format", self.prompt_format)
        return p


@dataclass
class LlavadiConfig:
    run: RunConfig = field(default_factory=RunConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    regenerate: RegenerateConfig = field(default_factory=RegenerateConfig)
    cache_teacher: CacheTeacherConfig = field(default_factory=CacheTeacherConfig)
    train_student: TrainStudentConfig = field(default_factory=TrainStudentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)

    def validate(self) -> list[str]:
        problems: list[str] = []
        for f in dataclasses.fields(self):
            problems += getattr(self, f.name).validate()
        return problems


# --------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check/convert ``value`` to annotation ``tp``; append a problem and return it unchanged
    when it does not fit."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key, problems)
    if origin is Literal:
        if value not in args:
            problems.append(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            if args and args[0] is str and isinstance(value, str):
                value = [value]  # a single path where a list is expected
            else:
                problems.append(f"{key}: expected a list, got {value!r}")
                return value
        return [_coerce(v, args[0], f"{key}[{i}]", problems) for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, problems)
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            problems.append(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{prefix or 'config'}: expected a mapping, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
            problems.append(f"{key}: unknown key{hint}")
            continue
        kwargs[k] = _coerce(v, hints[k], key, problems)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - defensive
        problems.append(f"{prefix}: {e}")
        return cls()


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"regenerate.sampling.temperature=0.7"`` → (["regenerate","sampling","temperature"], 0.7)."""
    if "=" not in text:
        raise ConfigError([f"override {text!r} is not key=value"])
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError([f"override {text!r} has an empty key"])
    value = yaml.safe_load(raw) if raw.strip() != "" else None
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    out = json.loads(json.dumps(data))  # deep copy, plain types
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for p in path[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = {}
                node[p] = nxt
            node = nxt
        node[path[-1]] = value
    return out


def load_config(base: dict | None = None, overrides: list[str] | None = None) -> LlavadiConfig:
    """Build and validate; raises ``ConfigError`` listing every problem."""
    data = apply_overrides(base or {}, list(overrides or []))
    problems: list[str] = []
    cfg = _build(LlavadiConfig, data, "", problems)
    if not problems:
        problems += cfg.validate()
    if problems:
        raise ConfigError(problems)
    return cfg


def load_yaml(path: str) -> dict:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping of sections"])
    return data


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: LlavadiConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------- fingerprints


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def fingerprint(material: dict, upstream: str | None) -> str:
    """Stage fingerprint = sha256(stage material + upstream stage fingerprint), 16 hex chars."""
    h = hashlib.sha256(canonical_json({"material": material, "upstream": upstream}).encode())
    return h.hexdigest()[:16]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def changed_keys(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two nested dicts (added/removed included)."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
