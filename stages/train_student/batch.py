"""A micro-batch as the terms read it (issue #21): the student's forward inputs plus, per row set, the flat
student positions and the teacher's cached fields at the matched rows (``rows.align``).

``collate(adapter, items, plan, load_image)`` → ``{"inputs", "sets", "aff", "sample_ids", "rejects"}``:

* ``inputs``: the student's forward inputs for B conversations right-padded to L tokens
  (``models.adapter.ModelAdapter.collate``: ``input_ids [B, L] int64``, ``attention_mask``, image tensors);
* ``sets[key]`` (``key`` = the kinds joined by ","; ``row_key``) for every row set of the plan:
  ``rows [N] int64`` (flat index ``b·L + position`` into the student's ``[B·L, H]`` hidden states),
  ``sample [N] int64`` (b), ``kind [N] uint8``, ``token_ids [N] int64`` (the token each row predicts: the
  CE labels at answer rows) and each cache field the plan names at those rows (``topk_ids`` int64,
  floats float32, ``hidden`` / ``hidden@L`` ``[N, Ht]``);
* ``aff``: per sample with an image, ``{"img": [n_i] int64, "ans": [n_a] int64 (flat positions), "block":
  [n_i, n_a] float32, "sample": b}`` (when the plan reads the affinity);
* ``sample_ids`` (the kept samples, in b order) and ``rejects`` (``{"id", "reason", "detail"}`` of the items left
  out: their image failed to load, the student's processor cannot take them, or a row set does not align).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...schemas.samples import Reject
from .memo import MEMO, encoded_bytes
from .rows import affinity_positions, align

INT_FIELDS = ("kind", "token_ids", "topk_ids", "sampled_ids")


def row_key(kinds) -> str:
    return ",".join(str(k) for k in kinds)


@dataclass(frozen=True)
class CollatePlan:
    """What to collate (picklable, for DataLoader workers): ``sets`` = ((kinds, fields), …), ``affinity``."""

    sets: tuple = ()
    affinity: bool = False


def collate(adapter, items: list[dict], plan: CollatePlan, load_image) -> dict:
    """``items``: stream samples (``{"id", "row", "conv", "cache"}``); ``load_image(row, decode=True)`` the sample's image or
    None (raises ``Reject``); with ``decode=False`` it only checks the file. See the module docstring for the result."""
    encs, kept, aligned, rejects = [], [], [], []
    for it in items:
        try:  # one record's problem, found inside the DataLoader: that record is left out, not the run
            enc = _encode(adapter, it, load_image)
            al = {kinds: align(it["cache"], enc, kinds) for kinds, _ in plan.sets}
            if plan.affinity and it["cache"]["affinity"].size:
                al["aff"] = affinity_positions(it["cache"], enc)
        except Reject as r:
            rejects.append({"id": it["id"], "reason": r.reason, "detail": r.detail})
            continue
        encs.append(enc)
        kept.append(it)
        aligned.append(al)
    if not kept:
        return {"sample_ids": [], "rejects": rejects}
    inputs = adapter.collate([e.inputs for e in encs])
    L = int(inputs["input_ids"].shape[1])
    sets = {}
    for kinds, fields in plan.sets:
        pos = [al[kinds][0] for al in aligned]
        idx = [al[kinds][1] for al in aligned]
        out = {"rows": torch.from_numpy(np.concatenate([b * L + p for b, p in enumerate(pos)]).astype(np.int64)),
               "sample": torch.from_numpy(np.concatenate([np.full(len(p), b) for b, p in enumerate(pos)]).astype(np.int64))}
        for f in fields:
            a = np.concatenate([it["cache"][f][i] for it, i in zip(kept, idx)])
            out[f] = torch.from_numpy(a.astype(np.int64) if f in INT_FIELDS else np.ascontiguousarray(a, np.float32))
        sets[row_key(kinds)] = out
    aff = []
    if plan.affinity:
        for b, (it, al) in enumerate(zip(kept, aligned)):
            if "aff" in al:
                img, ans = al["aff"]
                aff.append({"img": torch.tensor([b * L + p for p in img], dtype=torch.long),
                            "ans": torch.tensor([b * L + p for p in ans], dtype=torch.long),
                            "block": torch.from_numpy(np.ascontiguousarray(it["cache"]["affinity"], np.float32)),
                            "sample": b})
    return {"inputs": inputs, "sets": sets, "aff": aff, "sample_ids": [it["id"] for it in kept], "rejects": rejects}


def _encode(adapter, it: dict, load_image):
    """The sample's ``Encoded``: from ``memo.MEMO`` when it holds it (the image is still read and checked against
    its sha256: ``load_image(row, decode=False)`` raises ``Reject`` when it changed), else the student's
    processor on the loaded image (then memoised)."""
    key = it.get("encode_key")
    enc = MEMO.get(key) if key is not None else None
    if enc is not None:
        load_image(it["row"], decode=False)
        return enc
    enc = adapter.encode(it["conv"], load_image(it["row"]))
    if key is not None:
        MEMO.put(key, enc, encoded_bytes(enc))
    return enc


def to_device(obj, device):
    """Tensors of a (nested) micro-batch moved to ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_device(v, device) for v in obj]
    return obj
