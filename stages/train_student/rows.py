"""Which student position each cached teacher row belongs to (issue #21).

The cache holds rows of the *teacher's* sequence (``schemas.teacher_cache``: position, kind, next token);
the student sees the same conversation in its own prompt format and processor. Rows are matched **kind by
kind, in order**: the i-th answer row of the teacher ↔ the i-th answer row of the student, the same for
prompt rows and for image rows. That is exact when

- answer rows: the answer token ids agree (same tokenizer; checked since the first release);
- prompt rows: the prompt token ids agree — same prompt format and tokenizer — checked token by token
  (``prompt_mismatch`` otherwise: a student of another family renders other template tokens);
- image rows: the image expands into the same number of feature tokens (``image_token_count`` otherwise:
  a student tower of another resolution or patch size; the answer-row losses still apply to such a pair).

A sample that fails a check for a row kind some term reads is rejected with that reason; the trainer
leaves it out (``late.py``), never guessing an alignment.
"""
from __future__ import annotations

import numpy as np

from ...schemas.samples import Reject
from ...schemas.teacher_cache.fields import KIND_ANSWER, KIND_IMAGE, KINDS

REASON = {KIND_IMAGE: "image_token_count", 1: "prompt_mismatch", KIND_ANSWER: "token_mismatch"}


def align(cache: dict, enc, kinds: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(student positions ``[N] int64``, cache row indices ``[N] int64``) of the cache rows whose kind is in
    ``kinds``, paired kind by kind in order, sorted by student position. ``cache``: a reader sample
    (``position``, ``kind``, ``token_ids``); ``enc``: the student's ``models.adapter.Encoded``. Raises
    ``Reject`` (``image_token_count``, ``prompt_mismatch``, ``token_mismatch``) naming both counts or the
    first differing token."""
    s_pos, s_kind = enc.rows(kinds)
    s_pos, s_kind = np.asarray(s_pos, np.int64), np.asarray(s_kind, np.uint8)
    c_kind = np.asarray(cache["kind"])
    pairs_s, pairs_c = [], []
    for k in kinds:
        sp = s_pos[s_kind == k]
        ci = np.nonzero(c_kind == k)[0]
        if len(sp) != len(ci):
            raise Reject(REASON[k], f"{len(ci)} teacher {KINDS[k]} rows but {len(sp)} student ones"
                         + (" (the image expands into another number of tokens)" if k == KIND_IMAGE else ""))
        if k != KIND_IMAGE and len(sp):
            mine = np.asarray(enc.ids, np.int64)[sp + 1]
            theirs = np.asarray(cache["token_ids"], np.int64)[ci]
            bad = np.nonzero(mine != theirs)[0]
            if len(bad):
                j = int(bad[0])
                raise Reject(REASON[k], f"{KINDS[k]} row {j}: student next token {int(mine[j])}, teacher's "
                                        f"{int(theirs[j])} (another prompt format or tokenizer)")
        pairs_s.append(sp)
        pairs_c.append(ci)
    sp, ci = np.concatenate(pairs_s), np.concatenate(pairs_c)
    order = np.argsort(sp, kind="stable")
    return sp[order], ci[order]


def affinity_positions(cache: dict, enc) -> tuple[list[int], list[int]]:
    """(student image positions, student answer-token positions) for the affinity term; ``Reject``
    (``image_token_count``) when the student's image count differs from the cached block's rows."""
    img, ans = enc.image_positions, enc.answer_token_positions
    block = cache["affinity"]
    if block.shape != (len(img), len(ans)):
        raise Reject("image_token_count", f"the teacher's image x answer block is {block.shape[0]} x {block.shape[1]}, "
                                          f"the student's {len(img)} x {len(ans)} (the image expands into another "
                                          f"number of tokens; the answer-row losses still apply to such a pair)")
    return img, ans
