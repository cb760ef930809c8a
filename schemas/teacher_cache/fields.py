"""The teacher cache's fields, declared once (issue #20): what a cache can hold, per row and per sample,
and how each is encoded on disk. Both stores (``zarr_store``, ``wds_store``), the image-row store, the
readers, the size estimate (``pipeline/estimate.py``) and the README's format table follow from
:meth:`CacheSpec.fields`.

**Rows** are positions of the teacher-forced sequence (``[L]`` token ids, image expanded). Row ``p``
holds what the teacher computes at position ``p``: its hidden states and its distribution over the
token at ``p + 1`` (``token_ids``). Each row has a **kind** (code = index in :data:`KINDS`):

* ``answer`` (2): the next token ``p + 1`` is an answer token (today's rows, in the same order);
* ``image``  (0): the token at ``p`` is an image-feature token (``config.image_token_id``: where the
  vision features are placed; wrapper tokens such as ``<|vision_start|>`` or ``[IMG_BREAK]`` are not);
* ``prompt`` (1): every other position before the last (system, prompt and template text).

``CacheSpec.positions`` picks which rows are kept: ``answer`` | ``text`` (answer + prompt) | ``all``
(answer + prompt + image). Rows are in sequence order whatever fields are chosen. The last position
(which predicts past the end) is never a row.

**Codecs** (``Codec.encode`` → stored parts, ``decode`` → the reader's array):

* ``float16`` — IEEE half (numpy rounding, round-to-nearest-even);
* ``bfloat16`` — the top 16 bits of the float32 after round-to-nearest-even, stored as ``uint16``
  (NaN kept NaN); read as ``(bits.astype(uint32) << 16).view(float32)``;
* ``int8`` — symmetric per row: ``scale = max|x| / 127`` (float32 part ``<name>.scale``, 0 for an
  all-zero row), ``q = clip(rint(x / scale), -127, 127)``; read as ``q * scale``; ``|error| <= scale/2``;
* ``ids`` — token ids in the fewest bits the vocabulary needs: ``uint16`` when ``V <= 65 536``, else
  ``b = ceil(log2 V)`` bits per id packed little-endian per row into ``ceil(cols * b / 8)`` bytes (Megatron-LM's
  offline KD packs 17-bit ids the same way); the sorted sampled ids are delta-coded first (first id, then
  the differences: repeated draws store as 0);
* ``raw`` — the array in a fixed little-endian dtype.

Readers always return float32 for floats, int32 for ids and ``position``, uint8 for ``kind``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional

import numpy as np

KINDS = ("image", "prompt", "answer")
KIND_IMAGE, KIND_PROMPT, KIND_ANSWER = 0, 1, 2
POSITIONS = {"answer": (KIND_ANSWER,), "text": (KIND_PROMPT, KIND_ANSWER), "all": (KIND_IMAGE, KIND_PROMPT, KIND_ANSWER)}
HIDDEN_DTYPES = ("float16", "bfloat16", "int8")
LOGPROB_DTYPES = ("float32", "float16")
LOGITS = ("topk", "sampled", "none")
STORES = ("zarr", "webdataset")
IMAGE_KEY_BYTES = 32  # sha256 of (token ids through the image, pixel inputs): image_rows.image_key


# ------------------------------------------------------------------------------------ quantisation
def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits (uint16), round-to-nearest-even; NaN stays a quiet NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    b = x.view(np.uint32)
    rounded = ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((b[nan] >> np.uint32(16)).astype(np.uint16) | np.uint16(0x0040))
    return rounded


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def int8_quantise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: returns (q [n,H] int8, scale [n] float32 = max|x|/127)."""
    x = np.asarray(x, dtype=np.float32)
    scale = (np.abs(x).max(axis=1) / np.float32(127)).astype(np.float32) if x.shape[0] else np.zeros(0, np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.rint(x / safe[:, None]), -127, 127).astype(np.int8)
    return q, scale


def id_bits(vocab_size: int) -> int:
    """Bits per stored token id: 16 up to V = 65 536 (stored as uint16), else ``ceil(log2 V)``."""
    return 16 if vocab_size <= 1 << 16 else max(17, math.ceil(math.log2(vocab_size)))


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """``[n, c]`` non-negative ids < 2**bits → ``[n, ceil(c*bits/8)] uint8`` (each id's ``bits`` low bits,
    little-endian bit order, concatenated per row)."""
    ids = np.ascontiguousarray(ids, dtype="<u4")
    n, c = ids.shape
    bitsarr = np.unpackbits(ids.view(np.uint8).reshape(n, c, 4), axis=2, bitorder="little")[:, :, :bits]
    return np.packbits(bitsarr.reshape(n, c * bits), axis=1, bitorder="little")


def unpack_ids(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Inverse of :func:`pack_ids`: ``[n, nbytes] uint8`` → ``[n, cols] int32``."""
    n = packed.shape[0]
    flat = np.unpackbits(np.asarray(packed, np.uint8), axis=1, count=cols * bits, bitorder="little")
    full = np.zeros((n, cols, 32), np.uint8)
    full[:, :, :bits] = flat.reshape(n, cols, bits)
    return np.packbits(full, axis=2, bitorder="little").reshape(n, cols, 4).view("<u4")[..., 0].astype(np.int32)


# ------------------------------------------------------------------------------------------ codecs
@dataclass(frozen=True)
class Part:
    """One stored array of a field: ``<field><suffix>``, dtype, per-row tail shape."""

    suffix: str
    dtype: np.dtype
    tail: tuple


@dataclass(frozen=True)
class Codec:
    """How one field is stored. ``kind``: ``raw`` | ``float16`` | ``bfloat16`` | ``int8`` | ``ids``;
    ``cols``: the per-row width (0 = a 1-D field); ``dtype``: raw storage dtype; ``bits``: id width."""

    kind: str
    cols: int = 0
    dtype: str = "<f4"
    bits: int = 16
    delta: bool = False  # ids: each row's ids are sorted; stored as the first id and the differences after it

    @property
    def tail(self) -> tuple:
        return (self.cols,) if self.cols else ()

    def parts(self) -> list[Part]:
        if self.kind == "raw":
            return [Part("", np.dtype(self.dtype), self.tail)]
        if self.kind == "float16":
            return [Part("", np.dtype("<f2"), self.tail)]
        if self.kind == "bfloat16":
            return [Part("", np.dtype("<u2"), self.tail)]
        if self.kind == "int8":
            return [Part("", np.dtype("i1"), self.tail), Part(".scale", np.dtype("<f4"), ())]
        if self.kind == "ids":
            if self.bits == 16:
                return [Part("", np.dtype("<u2"), self.tail)]
            return [Part("", np.dtype("u1"), (-(-max(1, self.cols) * self.bits // 8),))]
        raise ValueError(f"unknown codec {self.kind!r}")

    def raw_bytes_per_row(self) -> float:
        """Uncompressed stored bytes per row (all parts)."""
        return float(sum(p.dtype.itemsize * math.prod(p.tail) for p in self.parts()))

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """A field's values (``[n] + tail``) → its stored parts, by suffix."""
        if self.kind == "raw":
            return {"": np.ascontiguousarray(x, dtype=self.dtype)}
        if self.kind == "float16":
            return {"": np.asarray(x, np.float32).astype("<f2")}
        if self.kind == "bfloat16":
            return {"": bf16_bits(x)}
        if self.kind == "int8":
            q, s = int8_quantise(x)
            return {"": q, ".scale": s.astype("<f4")}
        x = np.asarray(x)
        if x.size and (x.dtype.kind not in "iu" or x.min() < 0 or int(x.max()) >= 1 << self.bits):
            raise ValueError(f"token ids must be integers in [0, 2**{self.bits}), got [{x.min()}, {x.max()}]")
        if self.delta and x.size:
            if (np.diff(x, axis=-1) < 0).any():
                raise ValueError("delta-coded ids must be sorted within each row")
            x = np.concatenate([x[:, :1], np.diff(x, axis=-1)], axis=-1)
        if self.bits == 16:
            return {"": x.astype("<u2")}
        return {"": pack_ids(x.reshape(x.shape[0], max(1, self.cols)), self.bits)}

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        """Stored parts → the reader's array (float32 / int32 / the raw dtype)."""
        a = parts[""]
        if self.kind == "raw":  # floats widen to float32 (float16 log-probs), integers keep their type
            dt = np.dtype(self.dtype)
            return np.ascontiguousarray(a, dtype=np.float32 if dt.kind == "f" else dt.newbyteorder("="))
        if self.kind == "float16":
            return a.astype(np.float32)
        if self.kind == "bfloat16":
            return bf16_to_float32(a)
        if self.kind == "int8":
            return a.astype(np.float32) * np.asarray(parts[".scale"], np.float32)[:, None]
        out = a.astype(np.int32) if self.bits == 16 else unpack_ids(a, self.bits, max(1, self.cols))
        if self.bits != 16 and not self.cols:
            out = out[:, 0]
        return np.cumsum(out, axis=-1, dtype=np.int32) if self.delta and out.size else out


@dataclass(frozen=True)
class Field:
    """A declared field: ``name`` (the reader's key), ``axis`` (``row``: one value per kept row, on the
    shard's flat row axis; ``sample``: one array per sample, any shape of ``ndim`` dimensions, stored
    flat + shapes), ``codec``, ``ndim`` (sample fields), ``doc`` (meaning, shape, unit)."""

    name: str
    axis: Literal["row", "sample"]
    codec: Codec
    doc: str
    ndim: int = 1

    def stored(self) -> list[tuple[str, Part]]:
        return [(self.name + p.suffix, p) for p in self.codec.parts()]


def hidden_field_name(layer: int) -> str:
    """``hidden`` for layer -1 (the final post-norm state), ``hidden@L`` for the others."""
    return "hidden" if int(layer) == -1 else f"hidden@{int(layer)}"


# -------------------------------------------------------------------------------------------- spec
@dataclass
class CacheSpec:
    """What one cache holds (``index.json`` ``meta``; ``pipeline.config.CacheTeacherConfig`` names the
    same keys). ``hidden_layers`` index ``output_hidden_states`` as transformers returns it: 0 = the
    embeddings, ``i`` = the output of decoder layer ``i`` (1-based), -1 = the final post-norm state.
    ``vocab_size``: rows of the teacher's output head (sets the id bit width). ``image_dedup``: image
    rows go to the content-addressed image-row store (causal families) instead of each sample's rows."""

    hidden_size: int
    vocab_size: int = 32000
    positions: Literal["answer", "text", "all"] = "answer"
    hidden_layers: tuple = (-1,)
    hidden_dtype: Literal["float16", "bfloat16", "int8"] = "float16"
    logits: Literal["topk", "sampled", "none"] = "topk"
    top_k: int = 64
    logprob_dtype: Literal["float32", "float16"] = "float32"
    samples: int = 16
    sample_temperature: float = 1.0
    logit_stats: bool = True
    affinity: bool = False
    image_dedup: bool = True
    store: Literal["zarr", "webdataset"] = "zarr"

    def __post_init__(self):
        problems = []
        self.hidden_size, self.vocab_size = int(self.hidden_size), int(self.vocab_size)
        self.hidden_layers = tuple(int(x) for x in self.hidden_layers)
        if self.hidden_size <= 0 or self.vocab_size <= 1:
            problems.append(f"hidden_size and vocab_size must be positive, got {self.hidden_size}, {self.vocab_size}")
        if self.positions not in POSITIONS:
            problems.append(f"positions must be one of {tuple(POSITIONS)}, got {self.positions!r}")
        if len(set(self.hidden_layers)) != len(self.hidden_layers):
            problems.append(f"hidden_layers lists a layer twice: {list(self.hidden_layers)}")
        if self.hidden_dtype not in HIDDEN_DTYPES:
            problems.append(f"hidden_dtype must be one of {HIDDEN_DTYPES}, got {self.hidden_dtype!r}")
        if self.logits not in LOGITS:
            problems.append(f"logits must be one of {LOGITS}, got {self.logits!r}")
        if self.logits == "topk" and int(self.top_k) < 1:
            problems.append(f"top_k must be >= 1, got {self.top_k}")
        if self.logits == "sampled" and not (1 <= int(self.samples) <= 255):
            problems.append(f"samples must be in [1, 255], got {self.samples}")
        if not float(self.sample_temperature) > 0:
            problems.append(f"sample_temperature must be > 0, got {self.sample_temperature}")
        if self.logprob_dtype not in LOGPROB_DTYPES:
            problems.append(f"logprob_dtype must be one of {LOGPROB_DTYPES}, got {self.logprob_dtype!r}")
        if self.store not in STORES:
            problems.append(f"store must be one of {STORES}, got {self.store!r}")
        if problems:
            raise ValueError("; ".join(problems))
        self.top_k, self.samples = int(self.top_k), int(self.samples)
        self.sample_temperature = float(self.sample_temperature)

    # -- naming
    @property
    def ext(self) -> str:
        return "zarr" if self.store == "zarr" else "tar"

    def shard_name(self, i: int) -> str:
        """Shard ``i``'s file name, as the run directory names it (``part-NNNNN.zarr`` / ``.tar``)."""
        return f"part-{i:05d}.{self.ext}"

    @property
    def kinds(self) -> tuple:
        """Row kind codes kept (``positions``)."""
        return POSITIONS[self.positions]

    @property
    def image_rows_separate(self) -> bool:
        """Image rows are kept and stored once per unique image (``image_rows``), not per sample."""
        return KIND_IMAGE in self.kinds and self.image_dedup

    @property
    def stores_logit_stats(self) -> bool:
        """``logit_stats`` is kept with top-k logits (standardized top-k KD reads the std) or with the final
        hidden states (the exact path); a sampled logits-only cache does without (6 B/row of its ~40)."""
        return self.logits != "none" and self.logit_stats and (self.logits == "topk" or -1 in self.hidden_layers)

    @property
    def sampled_logprobs(self) -> bool:
        """The sampled tokens' teacher log-probs are stored: needed by the importance weights p/q when the
        proposal is not the teacher itself (``sample_temperature != 1``)."""
        return self.logits == "sampled" and self.sample_temperature != 1.0

    # -- the declarations
    def fields(self) -> list[Field]:
        """Every field this cache holds, in storage order."""
        ids = lambda cols: Codec("ids", cols, bits=id_bits(self.vocab_size))  # noqa: E731
        lp = Codec("raw", 0, dtype="<f4" if self.logprob_dtype == "float32" else "<f2")
        out = [Field("position", "row", Codec("raw", dtype="<i4"), "[T] int32: the row's position in the sequence"),
               Field("kind", "row", Codec("raw", dtype="u1"), "[T] uint8: 0 image, 1 prompt, 2 answer (KINDS)"),
               Field("token_ids", "row", ids(0), "[T] int32: the token at position + 1 (what the row predicts)")]
        for layer in self.hidden_layers:
            out.append(Field(hidden_field_name(layer), "row", Codec(self.hidden_dtype, self.hidden_size),
                             f"[T, H] float32: output_hidden_states[{layer}] at the row"
                             + (" (final post-norm)" if layer == -1 else "")))
        if self.logits == "topk":
            out += [Field("topk_ids", "row", ids(self.top_k), "[T, k] int32: the teacher's top-k token ids"),
                    Field("topk_logprobs", "row", Codec("raw", self.top_k, lp.dtype),
                          "[T, k] float32: their raw log-probs (T = 1); tail mass = 1 - sum(exp)")]
        elif self.logits == "sampled":
            # sorted draws, delta-coded: repeated draws (a confident teacher) store as zeros, and the
            # differences of spread ones need fewer bits than the ids (byte-shuffle alone does not see that)
            out.append(Field("sampled_ids", "row", Codec("ids", self.samples, bits=id_bits(self.vocab_size), delta=True),
                             "[T, s] int32: s tokens drawn with replacement from the teacher's distribution at "
                             "sample_temperature, sorted (a token's count = its multiplicity)"))
            if self.sampled_logprobs:
                out.append(Field("sampled_logprobs", "row", Codec("raw", self.samples, lp.dtype),
                                 "[T, s] float32: the teacher's raw log-prob (T = 1) of each drawn token"))
        if self.stores_logit_stats:
            out.append(Field("logit_stats", "row", Codec("raw", 2, "<f4"),
                             "[T, 2] float32: mean and std (Bessel) of the full logit row (with top-k logits or "
                             "the final hidden states: what standardized KD reads)"))
        if self.affinity:
            out.append(Field("affinity", "sample", Codec("float16"),
                             "[n_image, n_answer] float32: cosine similarity of the final hidden states at the "
                             "image positions and at the answer-token positions (stored float16)", ndim=2))
        if self.image_rows_separate:
            out.append(Field("image_key", "sample", Codec("raw", dtype="u1"),
                             "[32] uint8: the sample's entry in image_rows/ ([0] when it has no image)"))
        return out

    def row_fields(self) -> list[Field]:
        return [f for f in self.fields() if f.axis == "row"]

    def sample_fields(self) -> list[Field]:
        return [f for f in self.fields() if f.axis == "sample"]

    def bytes_per_row(self) -> dict[str, float]:
        """Uncompressed stored bytes per row, by row field."""
        return {f.name: f.codec.raw_bytes_per_row() for f in self.row_fields()}

    # -- meta
    def to_meta(self) -> dict:
        d = asdict(self)
        d["hidden_layers"] = list(self.hidden_layers)
        return d

    @classmethod
    def from_meta(cls, meta: dict) -> "CacheSpec":
        keys = list(cls.__dataclass_fields__)
        missing = [k for k in ("hidden_size", "vocab_size", "store") if k not in meta]
        if missing:
            raise ValueError(f"teacher cache meta lacks {missing}")
        return cls(**{k: meta[k] for k in keys if k in meta})


def check_rows(spec: CacheSpec, sample_id: str, rows: dict[str, Any], n: Optional[int] = None) -> dict[str, np.ndarray]:
    """Validate one sample's row fields (every declared row field present, ``[n] + tail`` shapes) and
    encode them into stored parts. Raises ``ValueError`` naming the sample and field."""
    out: dict[str, np.ndarray] = {}
    for f in spec.row_fields():
        if f.name not in rows:
            raise ValueError(f"{sample_id}: the cache declares field {f.name!r}, which the sample lacks")
        a = to_numpy(rows[f.name])
        if n is None:
            n = int(a.shape[0]) if a.ndim else -1
        want = (n,) + f.codec.tail
        if a.size == 0 and n == 0:
            a = a.reshape(want)
        if tuple(a.shape) != want:
            raise ValueError(f"{sample_id}: {f.name} must have shape {want}, got {tuple(a.shape)}")
        enc = f.codec.encode(a)
        for name, part in f.stored():
            out[name] = enc[part.suffix]
    extra = set(rows) - {f.name for f in spec.row_fields()}
    if extra:
        raise ValueError(f"{sample_id}: fields {sorted(extra)} are not declared by this cache")
    return out


def decode_rows(spec: CacheSpec, stored: dict[str, np.ndarray], fields: Optional[list[Field]] = None) -> dict[str, np.ndarray]:
    """Stored parts (by stored name) → the reader's arrays, by field name."""
    out = {}
    for f in fields if fields is not None else spec.row_fields():
        out[f.name] = f.codec.decode({p.suffix: stored[name] for name, p in f.stored()})
    return out


def to_numpy(x: Any) -> np.ndarray:
    """A numpy array of ``x`` (torch tensors moved to the CPU; half types widened to float32)."""
    if type(x).__module__.split(".")[0] == "torch":
        import torch

        x = x.detach().to("cpu")
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)
