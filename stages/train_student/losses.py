"""Distillation losses for ``llavadi train-student`` (pure PyTorch): this module re-exports the public
names of

* ``divergences.py`` -- the conventions every KD path shares (precision, kinds, the zero-probability rule,
  temperature, standardization, reduction), the per-row divergences, the teacher's top-k + tail buckets;
* ``kd.py`` -- the reference KD losses: ``topk_kd_loss``, ``dense_kd_loss``, ``chunked_exact_kd_loss``,
  ``sampled_kd_loss``; and ``teacher_argmax`` (the exact path's CE target on the teacher's argmax);
* ``fused.py`` -- ``fused_head_loss``: the student's head, CE and KD in one blockwise pass, with per-row
  weights for each term;
* ``features.py`` -- ``FeatureProjector``, ``feature_loss``, ``affinity_loss``.

Every function takes **answer positions only** (``affinity_loss`` also a sample's image positions),
flattened to rows: ``N`` answer tokens, vocabulary ``V``, top-k width ``k``, draws per row ``s``, hidden
sizes ``Hs`` (student) / ``Ht`` / ``H`` (teacher).

==========================  ===================  ==========================================
argument                    shape                dtype
==========================  ===================  ==========================================
``student_logits``          ``[N, V]``           float64 / float32 / float16 / bfloat16
``teacher_logits``          ``[N, V]``           float64 / float32 / float16 / bfloat16 (``-inf`` = p 0)
``topk_ids``                ``[N, k]``           int32 / int64 (distinct ids per row)
``topk_logprobs``           ``[N, k]``           float64 / float32 / float16, raw log-probs at T = 1
                                                 (``-inf`` = a zero-probability entry)
``teacher_logit_std``       ``[N]`` or ``[N,1]`` float32 / float64 (the cache's ``logit_stats[:, 1]``)
``student_hidden``          ``[N, Hs]``          any float (the student's final hidden state)
``student_head_weight``     ``[V, Hs]``          any float (the student's ``lm_head.weight``)
``teacher_hidden``          ``[N, Ht]``          any float (the cache's ``hidden``)
``teacher_head_weight``     ``[V, Ht]``          any float (``teacher_head.safetensors``)
``sampled_ids``             ``[N, s]``           int32 / int64 (the cache's draws, repeats allowed)
``sample_weights``          ``[N, s]``           any float >= 0 (None: ``1 / s`` per draw)
``ce_row_weight``           ``[N]``              any float (None: 1 per row)
``kd_row_weight``           ``[N]``              any float (None: 1 per row)
==========================  ===================  ==========================================
"""
from __future__ import annotations

from .divergences import KD_KINDS, P_FLOOR, REDUCTIONS, TAIL_EPS
from .features import FEATURE_KINDS, PROJECTOR_KINDS, FeatureProjector, affinity_loss, feature_loss
from .fused import fused_head_loss
from .kd import chunked_exact_kd_loss, dense_kd_loss, sampled_kd_loss, teacher_argmax, topk_kd_loss

__all__ = ["topk_kd_loss", "dense_kd_loss", "chunked_exact_kd_loss", "sampled_kd_loss", "teacher_argmax",
           "fused_head_loss", "FeatureProjector", "feature_loss", "affinity_loss", "KD_KINDS", "FEATURE_KINDS",
           "PROJECTOR_KINDS", "REDUCTIONS", "TAIL_EPS", "P_FLOOR"]
