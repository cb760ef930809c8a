"""Sample shards (design §4): Parquet, one row per conversation, LLaVA convention.

| column          | type                                   | meaning |
|-----------------|----------------------------------------|---------|
| id              | string                                 | unique across the run |
| image           | string, null for text-only rows        | path relative to ``image_root``, or ``run:data/images/…`` (an image that came inside the input: ``schemas.image_store``) |
| conversations   | list<struct<from: string, value: string>> | alternating human/gpt, starting with human; ``<image>`` marks the image once |
| image_sha256    | string, null for text-only rows        | sha256 of the image file's bytes |
| source          | string                                 | input file name + record position (``file.json#12``) |

``regenerate`` adds columns (see its module); readers ignore columns they do not know.
"""
from __future__ import annotations

import hashlib
import itertools
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
    "not_utf8": "the record's bytes are not UTF-8, or a string it carries into a shard (id, image path, turn) "
                "holds an unpaired surrogate: a JSON \\udXXX escape, or a file name in another encoding",
    "not_an_object": "the record is not a JSON object",
    "missing_id": "no usable 'id'",
    "duplicate_id": "an earlier record has the same id (the first one is kept)",
    "bad_conversations": "'conversations' is not a list of {from, value} objects",
    "bad_roles": "turns must alternate human/gpt, start with human and end with gpt",
    "empty_turn": "a turn's value is empty",
    "image_token_mismatch": "'<image>' must appear exactly once iff an image is referenced",
    "bad_image_field": "'image' is not a non-empty relative path",
    "missing_image": "the image file does not exist under image_root (or in the run's image store), cannot be "
                     "read, or a stored image no longer hashes to its name",
    "undecodable_image": "the image file cannot be decoded",
    "unsupported_image": "the image decodes but has no faithful 8-bit RGB form (schemas.images rules)",
    "too_long": "the conversation is longer than ingest.max_chars",
    "unwritable_record": "the record passed every check but the shard writer (Arrow) could not encode it; "
                         "detail: its error (the rest of the shard is written)",
}

# Reject reasons of every later stage that joins a sample row to its image (``sample_image``):
# ``missing_image``, ``undecodable_image``, ``unsupported_image`` as above, plus this one.
IMAGE_REASONS = {
    "image_changed": "the image file's sha256 differs from the one ingest recorded: the picture was changed "
                     "(or another image root holds a different file of that name) after the sample was made",
}

# A rejects-file line names the record and the problem, never carries it (issue #22: rejects of
# records with embedded images were larger than the images): each value is cut to this many
# characters, with its full size noted.
REJECT_VALUE_CHARS = {"id": 200, "detail": 1000, "raw": 300}


def cut(s: str, limit: int) -> str:
    """``s`` itself, or its first ``limit`` characters and a note of its full length."""
    return s if len(s) <= limit else f"{s[:limit]}… [cut: {len(s)} chars]"


def describe(v, limit: int = 200) -> str:
    """A short text for a value a reject names: bytes as their size only; strings, containers and
    other values as a repr of at most about ``limit`` characters, a cut one with its full size noted
    (characters, or items of a list / dict)."""
    if isinstance(v, (bytes, bytearray, memoryview)):
        return f"<{len(v)} bytes>"
    if isinstance(v, str):
        return repr(v) if len(v) <= limit else f"{v[:limit]!r}… [cut: {len(v)} chars]"
    if isinstance(v, (dict, list, tuple)):
        is_dict = isinstance(v, dict)
        parts, n = [], 0
        for x in itertools.islice(v.items() if is_dict else v, limit):
            inner = max(20, limit // 4)  # so that a nested value's own size note survives the cut
            parts.append(f"{x[0]!r}: {describe(x[1], inner)}" if is_dict else describe(x, inner))
            n += len(parts[-1]) + 2
            if n > limit:
                break
        body = ", ".join(parts)
        o, c = "{}" if is_dict else "[]"
        if len(parts) < len(v) or len(body) > limit:
            return f"{o}{body[:limit]}…{c} [cut: {type(v).__name__} of {len(v)} items]"
        return o + body + c
    return cut(repr(v), limit)


def reject_entry(source: Optional[str], rid, reason: str, detail: str, raw: Optional[str] = None) -> dict:
    """One line of a rejects file: ``{source, id, reason, detail[, raw]}``, each value cut to
    ``REJECT_VALUE_CHARS`` (the size noted), so a reject is small whatever the record holds."""
    e = {"source": source, "id": None if rid is None else cut(str(rid), REJECT_VALUE_CHARS["id"]),
         "reason": reason, "detail": cut(str(detail), REJECT_VALUE_CHARS["detail"])}
    if raw:
        e["raw"] = cut(raw, REJECT_VALUE_CHARS["raw"])
    return e


def _check_text(s: str, where: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Reject("not_utf8", f"{where} holds an unpaired surrogate ({e.reason})") from None


def normalise_id(rec: dict) -> str:
    rid = rec.get("id")
    if isinstance(rid, bool) or rid is None or not isinstance(rid, (str, int)):
        raise Reject("missing_id", f"id is {describe(rid)}")
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


def _read_image(image_root, rel, run_dir=None) -> tuple[bytes, Optional[str]]:
    """(the bytes of the image ``rel`` names, the sha256 its name promises or None) or ``Reject``
    (``bad_image_field``, ``missing_image``). ``rel`` is a path under ``image_root``, or a reference into
    the run's image store (``schemas.image_store``: images that came embedded in the input), resolved
    under ``run_dir``."""
    from . import image_store

    if not isinstance(rel, str) or not rel.strip():
        raise Reject("bad_image_field", f"image is {describe(rel)}")
    want = None
    if image_store.is_ref(rel):
        want = image_store.ref_sha256(rel)
        if want is None or run_dir is None:
            raise Reject("bad_image_field", f"image {describe(rel)} starts with {image_store.PREFIX!r}, which names "
                                            f"a run's image store, but is not a reference into this run's store")
        path, where = image_store.resolve(None, rel, run_dir), f"the run's image store ({run_dir})"
    else:
        if Path(rel).is_absolute() or ".." in Path(rel).parts or "\0" in rel:
            # never read outside image_root, whatever a record says
            raise Reject("bad_image_field", f"image {describe(rel)} is not a relative path inside image_root")
        if image_root is None:
            raise Reject("missing_image", "record references an image file but no image_root is set: "
                                          "pass --image-root DIR")
        path, where = Path(image_root) / rel, str(image_root)
    try:
        return path.read_bytes(), want
    except FileNotFoundError:
        raise Reject("missing_image", f"{describe(rel)} not found under {where}") from None
    except (IsADirectoryError, PermissionError, OSError) as e:
        raise Reject("missing_image", f"{describe(rel)}: {type(e).__name__}: {e.strerror or e}") from None


def _decode(data: bytes, rel: str):
    from .images import ImageLoadError, decode_rgb

    try:
        return decode_rgb(data, rel)
    except ImageLoadError as e:
        raise Reject(e.reason, e.detail) from None


def _damaged(rel: str, sha: str) -> Reject:
    return Reject("missing_image", f"{rel}: the stored file's bytes no longer hash to its name (sha256 {sha}): "
                                   f"damaged after ingest wrote it; rerun ingest with --force")


def check_image(image_root: Optional[Path], rel, decode: bool, run_dir: Optional[Path] = None) -> str:
    """Return the sha256 of the image file, or raise ``Reject`` (``_read_image``; a store file whose bytes
    no longer hash to its name is ``missing_image``). With ``decode``, the image goes through
    ``schemas.images.decode_rgb`` — the conversion every later stage applies — so a record is kept only if
    its image becomes 8-bit RGB (reasons ``undecodable_image``, ``unsupported_image``)."""
    data, want = _read_image(image_root, rel, run_dir)
    sha = hashlib.sha256(data).hexdigest()
    if want is not None and sha != want:
        raise _damaged(rel, sha)
    if decode:
        _decode(data, rel)
    return sha


def sample_image(image_root: Optional[str | Path], row: dict, *, run_dir: Optional[str | Path] = None,
                 decode: bool = True, root_hint: str = ""):
    """The image of a sample row as every stage after ingest must see it: the file ``image_root /
    row["image"]`` (or the run's image store entry under ``run_dir``), checked against the ``image_sha256``
    ingest recorded, then (``decode``) ``schemas.images.decode_rgb`` of those same bytes (read once: the
    picture checked is the picture used). Returns a PIL ``"RGB"`` image (uint8), or None for a text-only
    row or when ``decode`` is False.

    Raises ``Reject`` — one record's problem, never the stage's: ``missing_image`` (no image root, or no
    readable file there; ``root_hint`` — e.g. "set train_student.cache_image_root" — is appended to say how
    to point at the right folder; a damaged store file), ``image_changed`` (the file's sha256 differs from
    the recorded one: the image was edited after ingest, or the root holds another file of that name),
    ``undecodable_image`` / ``unsupported_image`` (``schemas.images`` rules), ``bad_image_field``. A row
    without a recorded sha256 (written by an ingest that did not record it) is not checked."""
    from . import image_store

    rel = row.get("image")
    if rel is None:
        return None
    hint = f"; {root_hint}" if root_hint else ""
    if not image_root and not image_store.is_ref(rel):
        raise Reject("missing_image", f"{rel}: no image root is known for this sample{hint}")
    try:
        data, want = _read_image(image_root, rel, run_dir)
    except Reject as r:
        raise Reject(r.reason, r.detail + hint) from None
    sha = hashlib.sha256(data).hexdigest()
    if want is not None and sha != want:
        raise _damaged(rel, sha)
    recorded = row.get("image_sha256")
    if recorded and sha != recorded:
        raise Reject("image_changed", f"{rel} under {image_root} is not the image this sample was made from "
                                      f"(sha256 differs from the one ingest recorded){hint}")
    return _decode(data, rel) if decode else None


def check_encodable(row: dict) -> None:
    """Every string a row carries into a shard must be valid UTF-8, as Arrow writes strings (issue
    #22). Python strings can hold unpaired surrogates that no UTF-8 writer accepts: a JSON
    ``"\\udce9"`` escape, or a file name in another encoding listed from disk (``os.listdir``'s
    surrogateescape turns the Latin-1 byte of ``café.png`` into ``caf\\udce9.png``). Raises
    ``Reject("not_utf8")`` naming the field and the offending bytes."""
    stack = list(row.items())
    while stack:
        where, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raw = v[e.start:e.end].encode("utf-8", "surrogateescape" if where == "image" else "backslashreplace")
                hint = (" (a file name in another encoding? rename it to UTF-8, e.g. with convmv, and fix the record)"
                        if where == "image" else "")
                raise Reject("not_utf8", f"{where} {describe(v)} is not valid UTF-8 at character {e.start} "
                                         f"({raw!r}){hint}") from None
        elif isinstance(v, dict):
            stack.extend((f"{where}.{k}", x) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((f"{where}[{i}]", x) for i, x in enumerate(v))


def validate_record(rec, image_root: Optional[Path], max_chars: int, decode_images: bool = True,
                    run_dir: Optional[Path] = None) -> dict:
    """A raw LLaVA record → a sample row (without ``source``), or raise ``Reject``. ``run_dir``:
    the run whose image store a store reference (``schemas.image_store``) points into."""
    if not isinstance(rec, dict):
        raise Reject("not_an_object", f"record is {type(rec).__name__}")
    rid = normalise_id(rec)
    image = rec.get("image")
    has_image = image is not None
    turns = validate_conversations(rec.get("conversations"), has_image, max_chars)
    row = {"id": rid, "image": image if has_image else None, "conversations": turns, "image_sha256": None}
    check_encodable(row)  # before any file is opened by that name
    if has_image:
        row["image_sha256"] = check_image(image_root, image, decode_images, run_dir)
    return row


# what Arrow raises for a Python value it cannot put in a column (a surrogate, a wrong type, an
# out-of-range number)
_UNWRITABLE = (pa.ArrowException, UnicodeError, TypeError, ValueError, OverflowError)


def write_samples(rows: list[dict], path: Path, schema: pa.Schema = SAMPLE_SCHEMA) -> list[tuple[dict, str]]:
    """Write rows to ``path`` (the caller renames it into place). Deterministic bytes. A row Arrow
    cannot encode never fails the shard (issue #22): the others are written, and the unwritable
    ones come back as ``[(row, error text)]`` for the caller to reject."""
    try:
        table, bad = pa.Table.from_pylist(rows, schema=schema), []
    except _UNWRITABLE:
        good, bad = [], []
        for r in rows:  # find the offenders one by one: only on this rare path
            try:
                pa.Table.from_pylist([r], schema=schema)
                good.append(r)
            except _UNWRITABLE as e:
                bad.append((r, f"{type(e).__name__}: {e}"))
        table = pa.Table.from_pylist(good, schema=schema)
    pq.write_table(table, path, compression="zstd", write_statistics=False)
    return bad


def iter_samples(path: Path | str, batch_size: int = 256, columns: Optional[list[str]] = None) -> Iterator[dict]:
    """Stream rows of a sample shard as dicts (never loads the whole file)."""
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
        yield from batch.to_pylist()
