"""Prepared training samples kept in memory for the next epoch (``train_student.sample_memo_mb``).

A run that streams its samples more than once (``max_steps`` beyond one epoch: a small labelled set, the
demo's 300 conversations × 89 epochs) used to render, tokenise and run the student's processor on every
sample again in every epoch — on the demo's student that preparation was ~2/3 of a training step
(measured: 45 of 66 ms per step of 32 samples). The memo keeps, per process:

* ``("conv", student, conversation)`` → the rendered ``models.adapter.TextConversation``;
* ``("enc", student, conversation, image sha256)`` → the processor's ``models.adapter.Encoded``.

Keys hold everything the value depends on — the student's processor files (``data._adapter_key``: path,
sizes, mtimes), the conversation as the row stores it (with sampled answer ids where a row has them) and
the image as ingest recorded it — so the same value serves later epochs, a resumed run (which recomputes it:
a fresh process starts empty, the values are equal) and other runs of the same process (``llavadi sweep``'s
arms, which share student and cache). An image is still read and checked against its sha256 on every use
(``schemas.samples.sample_image`` with ``decode=False``), so a changed file is a reject as before; a row
whose image has no recorded sha256 is never memoised.

Memory: entries are added until ``limit`` bytes (tensor bytes + an estimate for token lists) and never
evicted — a shuffled epoch visits every sample once, so an evicting cache would miss on all of them; with a
full memo the first samples keep hitting. Off (limit 0) for a run of one epoch or less, so streaming a large
cache stays flat in memory. DataLoader workers (``num_workers`` > 0) are new processes each epoch: they fill
their own copies and gain nothing.
"""
from __future__ import annotations

import json
from typing import Any, Optional

import torch

_ENTRY_OVERHEAD = 512  # bytes per entry beyond its arrays: dict slot, key tuple, dataclass


class SampleMemo:
    """A bounded dict: ``get(key)`` → value or None; ``put(key, value, nbytes)`` adds while it fits."""

    def __init__(self, limit: int = 0):
        self.limit, self.used = int(limit), 0
        self._d: dict = {}

    def configure(self, limit: int) -> None:
        """Set the byte limit; a limit below what is held empties the memo."""
        self.limit = int(limit)
        if self.used > self.limit:
            self._d.clear()
            self.used = 0

    def get(self, key) -> Any:
        return self._d.get(key) if self.limit else None

    def put(self, key, value, nbytes: int) -> None:
        n = int(nbytes) + _ENTRY_OVERHEAD
        if self.limit and key not in self._d and self.used + n <= self.limit:
            self._d[key] = value
            self.used += n

    def __len__(self) -> int:
        return len(self._d)


MEMO = SampleMemo()  # this process's; train() sizes it (data.py and batch.py read it)


def conversation_key(row: dict) -> str:
    """What a rendered conversation depends on in a sample row: its turns, whether it has an image, and the
    sampled answer ids an on-policy round's rows carry."""
    return json.dumps([row["conversations"], row.get("image") is not None, row.get("answer_token_ids")],
                      sort_keys=True, default=_plain)


def _plain(o):
    return o.tolist() if hasattr(o, "tolist") else list(o)  # numpy arrays / scalars from a shard


def conv_bytes(conv) -> int:
    return len(conv.text) + 36 * len(conv.ids)


def encoded_bytes(enc) -> int:
    return 36 * len(enc.ids) + sum(v.element_size() * v.nelement() for v in enc.inputs.values() if torch.is_tensor(v))


def encode_key(student_key: tuple, conv_key: str, row: dict) -> Optional[tuple]:
    """The memo key of a sample's processor outputs, or None when its image has no recorded sha256."""
    if row.get("image") is not None and not row.get("image_sha256"):
        return None
    return ("enc", student_key, conv_key, row.get("image_sha256"))
