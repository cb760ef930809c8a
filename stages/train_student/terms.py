"""The loss as declared terms (issue #21, design §6): ``total = Σ weight_t · value_t``.

Each term is a small declaration: the cache fields and row kinds it reads, what it needs of the student,
its weight, and how it is normalised (``train_student.reduction``: ``token`` = the mean over the term's rows
in the global batch, ``sample`` = the mean over each sample's rows, then over the samples that have any).
The trainer never names a term: it asks the terms which rows to collate (``row_sets``), which cache fields
a preflight must find (``problems``), and sums what ``evaluate`` returns.

========  =========================================  ==============================  ===========================
term      rows (kinds)                               cache fields                    student
========  =========================================  ==============================  ===========================
``ce``    answer                                     ``token_ids`` (``topk_ids`` or  LM head at the rows
                                                     ``hidden`` for teacher_argmax)
``kd``    ``kd.positions``                           ``kd.source``: ``topk_ids`` +    LM head at the rows (one
                                                     ``topk_logprobs`` (+ stats) |   fused pass with ``ce``)
                                                     ``hidden`` + head | ``sampled``
``feat``  ``feature.positions``, per layer pair      ``hidden@<teacher layer>``      ``output_hidden_states``
                                                                                     [student layer] → projector
``aff``   image × answer-token positions             ``affinity``                    final hidden states
========  =========================================  ==============================  ===========================

Losses at image rows need the same image-token count in teacher and student, at prompt rows the same
prompt token ids (``rows.align``): checked per sample; a mismatch rejects the sample with a reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ...schemas.teacher_cache.fields import KINDS, POSITIONS, hidden_field_name

ANSWER = POSITIONS["answer"]


@dataclass
class Term:
    """One loss term. ``name`` (metrics key), ``weight``, ``kinds`` (row kinds it reads; empty for a
    per-sample term), ``fields`` (cache fields it reads), ``cache_key`` (the ``cache_teacher`` setting that makes
    the cache hold them, for refusals), ``layer`` (student hidden layer it reads; None = the LM head's rows),
    ``params`` (term-specific settings)."""

    name: str
    weight: float
    kinds: tuple
    fields: tuple
    cache_key: str
    layer: Optional[int] = None
    params: dict = field(default_factory=dict)

    @property
    def head(self) -> bool:
        """Computed through the student's LM head (CE and KD share one fused pass over their rows)."""
        return self.name in ("ce", "kd")


def build_terms(c, cache_meta: dict) -> list[Term]:
    """The terms of ``train_student`` config ``c`` with a non-zero weight, in a fixed order (ce, kd, feat…, aff)."""
    out = []
    if c.ce_weight > 0:
        fields = ("token_ids",)
        if c.ce_target == "teacher_argmax":
            fields = ("topk_ids",) if "topk_ids" in _have(cache_meta) else ("hidden",)
        out.append(Term("ce", c.ce_weight, ANSWER, fields, "cache_teacher.logits=topk (or hidden_layers=[-1])",
                        params={"target": c.ce_target}))
    if c.kd_weight > 0:
        k = c.kd
        src = k.resolved_source
        t_prop = float(cache_meta.get("sample_temperature", 1.0))  # the cache's proposal temperature
        fields = {"topk": ("topk_ids", "topk_logprobs") + (("logit_stats",) if k.standardize else ()),
                  "exact": ("hidden",),
                  "sampled": ("sampled_ids",) + (("sampled_logprobs",) if t_prop != 1.0 else ())}[src]
        key = {"topk": "cache_teacher.logits=topk", "exact": "cache_teacher.hidden_layers=[-1]",
               "sampled": "cache_teacher.logits=sampled"}[src]
        out.append(Term("kd", c.kd_weight, POSITIONS[k.positions], fields, key,
                        params={"kind": k.kind, "beta": k.beta, "temperature": k.temperature, "source": src,
                                "standardize": k.standardize, "chunk_size": k.chunk_size,
                                "sample_temperature": t_prop}))
    if c.feature_weight > 0:
        for s_layer, t_layer in c.feature.layers:
            name = "feat" if len(c.feature.layers) == 1 else f"feat[{s_layer},{t_layer}]"
            key = f"cache_teacher.hidden_layers=[{t_layer}] (or any list containing {t_layer})"
            out.append(Term(name, c.feature_weight, POSITIONS[c.feature.positions], (hidden_field_name(t_layer),), key,
                            layer=int(s_layer),
                            params={"kind": c.feature.kind, "projector": c.feature.projector,
                                    "teacher_layer": int(t_layer)}))
    if c.affinity_weight > 0:
        out.append(Term("aff", c.affinity_weight, (), ("affinity",), "cache_teacher.affinity=true"))
    return out


def _have(meta: dict) -> set:
    return {f["name"] for f in meta.get("fields", [])}


def problems(terms: list[Term], meta: dict, run_dir) -> list[str]:
    """Before training: every term's cache fields and row kinds are in the cache (``meta``: the index's), else
    one problem per term naming the ``cache_teacher`` key to set and the command to rerun."""
    have = _have(meta)
    kept = set(POSITIONS.get(meta.get("positions", "answer"), ANSWER))
    rerun = f"and rerun `llavadi cache-teacher {run_dir} --force`"
    out = []
    for t in terms:
        missing = [f for f in t.fields if f not in have]
        if missing:
            out.append(f"train_student: the {t.name} term reads {', '.join(missing)}, which this cache does not hold "
                       f"(it holds {', '.join(sorted(have)) or 'nothing'}): set {t.cache_key} {rerun}")
        lacking = [KINDS[k] for k in t.kinds if k not in kept]
        if lacking:
            pos = "all" if 0 in t.kinds else "text"
            out.append(f"train_student: the {t.name} term reads {'/'.join(lacking)} rows, which this cache does not "
                       f"keep (cache_teacher.positions={meta.get('positions', 'answer')}): set "
                       f"cache_teacher.positions={pos} {rerun}")
    return out


def home(t: Term, terms: list[Term]) -> tuple:
    """The row set a term is evaluated on: CE shares KD's rows when both are on (one fused head pass; CE
    weighs only the answer rows among them), every other row term its own kinds; () for a per-sample term."""
    if t.name == "ce":
        kd = next((x for x in terms if x.name == "kd"), None)
        return kd.kinds if kd is not None else t.kinds
    return t.kinds


def row_sets(terms: list[Term]) -> dict[tuple, tuple]:
    """The row sets the collate builds: kinds → the cache fields the terms evaluated there read (always with
    ``kind`` and ``token_ids``)."""
    sets: dict[tuple, list] = {}
    for t in terms:
        kinds = home(t, terms)
        if kinds:
            sets.setdefault(kinds, ["kind", "token_ids"])
            sets[kinds] += [f for f in t.fields if f not in sets[kinds]]
    return {k: tuple(v) for k, v in sets.items()}


def needs_images(terms: list[Term]) -> bool:
    """Whether a term reads image rows or the image × answer block (image-token counts must agree)."""
    return any(0 in t.kinds or t.name == "aff" for t in terms)
