"""Sample shards (design §4): Parquet, one row per conversation, LLaVA convention.

| column          | type                                   | meaning |
|-----------------|----------------------------------------|---------|
| id              | string                                 | unique across the run |
| image           | string, null for text-only rows        | path relative to ``image_root`` |
| conversations   | list<struct<from: string, value: string>> | alternating human/gpt, starting with human; ``<image>`` marks the image once |
| image_sha256    | string, null for text-only rows        | sha256 of the image file's bytes |
| source          | string                                 | input file name + record position (``file.json#12``) |

``regenerate`` adds columns (see its module); readers ignore columns they do not know.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_TOKEN = "<image>"
HUMAN, GPT = "human", "gpt"

TURN_TYPE = pa.struct([("from", pa.string()), ("value", pa.string())])
SAMPLE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.string()),
    ("conversations", pa.list_(TURN_TYPE)),
    ("image_sha256", pa.string()),
    ("source", pa.string()),
])


class Reject(Exception):
    """A record-level problem: ``reason`` is a stable machine key, ``detail`` a human text."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


# Reject reasons of ingest (stable keys: they appear in rejects/ files, _done counts, status).
REASONS = {
    "malformed_json": "the record is not valid JSON (or is nested deeper than ingest's MAX_JSON_DEPTH)",
    "unreadable_json": "a stretch of a .json list whose record boundaries are lost (one per record in it) or "
                       "a list the file ends without closing",
    "not_utf8": "the record's bytes are not UTF-8",
    "not_an_object": "the record is not a JSON object",
    "missing_id": "no usable 'id'",
    "duplicate_id": "an earlier record has the same id (the first one is kept)",
    "bad_conversations": "'conversations' is not a list of {from, value} objects",
    "bad_roles": "turns must alternate human/gpt, start with human and end with gpt",
    "empty_turn": "a turn's value is empty",
    "image_token_mismatch": "'<image>' must appear exactly once iff an image is referenced",
    "bad_image_field": "'image' is not a non-empty relative path",
    "missing_image": "the image file does not exist under image_root",
    "undecodable_image": "the image file cannot be decoded",
    "unsupported_image": "the image decodes but has no faithful 8-bit RGB form (schemas.images rules)",
    "too_long": "the conversation is longer than ingest.max_chars",
}

# Reject reasons of every later stage that joins a sample row to its image (``sample_image``):
# ``missing_image``, ``undecodable_image``, ``unsupported_image`` as above, plus this one.
IMAGE_REASONS = {
    "image_changed": "the image file's sha256 differs from the one ingest recorded: the picture was changed "
                     "(or another image root holds a different file of that name) after the sample was made",
}


def _check_text(s: str, where: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Reject("not_utf8", f"{where} holds an unpaired surrogate ({e.reason})") from None


def normalise_id(rec: dict) -> str:
    rid = rec.get("id")
    if isinstance(rid, bool) or rid is None or not isinstance(rid, (str, int)):
        raise Reject("missing_id", f"id is {rid!r}")
    rid = str(rid)
    if not rid.strip():
        raise Reject("missing_id", "id is empty")
    _check_text(rid, "id")
    return rid


def validate_conversations(conv, has_image: bool, max_chars: int) -> list[dict]:
    """Return the turns as ``[{"from", "value"}]`` or raise ``Reject``."""
    if not isinstance(conv, list) or not conv:
        raise Reject("bad_conversations", f"conversations is {type(conv).__name__}" + (" (empty)" if conv == [] else ""))
    turns = []
    total = 0
    for i, t in enumerate(conv):
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or "value" not in t:
            raise Reject("bad_conversations", f"turn {i} is not an object with string 'from' and 'value'")
        v = t["value"]
        if not isinstance(v, str):
            raise Reject("bad_conversations", f"turn {i} value is {type(v).__name__}, not a string")
        want = HUMAN if i % 2 == 0 else GPT
        if t["from"] != want:
            raise Reject("bad_roles", f"turn {i} is from {t['from']!r}, expected {want!r}")
        if not v.strip():
            raise Reject("empty_turn", f"turn {i} ({t['from']}) is empty")
        _check_text(v, f"turn {i}")
        total += len(v)
        turns.append({"from": t["from"], "value": v})
    if len(turns) % 2:
        raise Reject("bad_roles", f"{len(turns)} turns: the last human turn has no gpt answer")
    if total > max_chars:
        raise Reject("too_long", f"{total} characters > ingest.max_chars={max_chars}")
    for i, t in enumerate(turns):  # the one placement rule every stage applies (models.prompts.place_image)
        if t["from"] != HUMAN and IMAGE_TOKEN in t["value"]:
            raise Reject("image_placement", f"turn {i} ({t['from']}) contains {IMAGE_TOKEN}: only a human turn may "
                                            f"(it is moved to the front of the first human turn)")
    n_img = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    if has_image and n_img != 1:
        raise Reject("image_token_mismatch", f"image referenced but '<image>' appears {n_img} times")
    if not has_image and n_img:
        raise Reject("image_token_mismatch", f"no image referenced but '<image>' appears {n_img} times")
    return turns


def _read_image(image_root, rel) -> bytes:
    """The bytes of ``image_root / rel`` or ``Reject`` (``bad_image_field``, ``missing_image``)."""
    if not isinstance(rel, str) or not rel.strip():
        raise Reject("bad_image_field", f"image is {rel!r}")
    if Path(rel).is_absolute() or ".." in Path(rel).parts or "\0" in rel:
        # never read outside image_root, whatever a record says
        raise Reject("bad_image_field", f"image {rel[:200]!r} is not a relative path inside image_root")
    path = Path(image_root) / rel
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise Reject("missing_image", f"{rel} not found under {image_root}") from None
    except (IsADirectoryError, PermissionError, OSError) as e:
        raise Reject("missing_image", f"{rel}: {e}") from None


def _decode(data: bytes, rel: str):
    from .images import ImageLoadError, decode_rgb

    try:
        return decode_rgb(data, rel)
    except ImageLoadError as e:
        raise Reject(e.reason, e.detail) from None


def check_image(image_root: Path, rel, decode: bool) -> str:
    """Return the sha256 of the image file, or raise ``Reject``. With ``decode``, the image goes
    through ``schemas.images.decode_rgb`` — the conversion every later stage applies — so a
    record is kept only if its image becomes 8-bit RGB (reasons ``undecodable_image``,
    ``unsupported_image``)."""
    data = _read_image(image_root, rel)
    if decode:
        _decode(data, rel)
    return hashlib.sha256(data).hexdigest()


def sample_image(image_root: Optional[str | Path], row: dict, *, decode: bool = True, root_hint: str = ""):
    """The image of a sample row as every stage after ingest must see it: the file
    ``image_root / row["image"]``, checked against the ``image_sha256`` ingest recorded, then
    (``decode``) ``schemas.images.decode_rgb`` of those same bytes (read once: the picture checked
    is the picture used). Returns a PIL ``"RGB"`` image (uint8), or None for a text-only row or
    when ``decode`` is False.

    Raises ``Reject`` — one record's problem, never the stage's: ``missing_image`` (no image root,
    or no readable file there; ``root_hint`` — e.g. "set train_student.cache_image_root" — is
    appended to say how to point at the right folder), ``image_changed`` (the file's sha256 differs
    from the recorded one: the image was edited after ingest, or the root holds another file of that
    name), ``undecodable_image`` / ``unsupported_image`` (``schemas.images`` rules), ``bad_image_field``.
    A row without a recorded sha256 (written by an ingest that did not record it) is not checked."""
    rel = row.get("image")
    if rel is None:
        return None
    hint = f"; {root_hint}" if root_hint else ""
    if not image_root:
        raise Reject("missing_image", f"{rel}: no image root is known for this sample{hint}")
    try:
        data = _read_image(image_root, rel)
    except Reject as r:
        raise Reject(r.reason, r.detail + hint) from None
    want = row.get("image_sha256")
    if want and hashlib.sha256(data).hexdigest() != want:
        raise Reject("image_changed", f"{rel} under {image_root} is not the image this sample was made from "
                                      f"(sha256 differs from the one ingest recorded){hint}")
    return _decode(data, rel) if decode else None


def validate_record(rec, image_root: Optional[Path], max_chars: int, decode_images: bool = True) -> dict:
    """A raw LLaVA record → a sample row (without ``source``), or raise ``Reject``."""
    if not isinstance(rec, dict):
        raise Reject("not_an_object", f"record is {type(rec).__name__}")
    rid = normalise_id(rec)
    image = rec.get("image")
    has_image = image is not None
    turns = validate_conversations(rec.get("conversations"), has_image, max_chars)
    sha = None
    if has_image:
        if image_root is None:
            raise Reject("missing_image", "record references an image but no image_root is set")
        sha = check_image(image_root, image, decode_images)
    return {"id": rid, "image": image if has_image else None, "conversations": turns, "image_sha256": sha}


def write_samples(rows: list[dict], path: Path, schema: pa.Schema = SAMPLE_SCHEMA) -> None:
    """Write rows to ``path`` (the caller renames it into place). Deterministic bytes."""
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path, compression="zstd", write_statistics=False)


def iter_samples(path: Path | str, batch_size: int = 256, columns: Optional[list[str]] = None) -> Iterator[dict]:
    """Stream rows of a sample shard as dicts (never loads the whole file)."""
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
        yield from batch.to_pylist()
