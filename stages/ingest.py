"""``llavadi ingest``: LLaVA JSON (a list, parsed streaming), JSONL or Parquet → ``data/``
Parquet sample shards (``schemas.samples``), bad records to ``data/rejects/`` with a reason.

How shards are cut: the driver streams every input in order (a 1 GB JSON list is never
loaded whole: ``_JsonList`` splits it into records, one in memory at a time), drops duplicate
ids (first one wins) and spills each run of ``shard_size`` raw records to
``data/_staging/chunk-NNNNN.jsonl``. Workers validate the records of one chunk (roles,
``<image>``, image exists and decodes to RGB by ``schemas.images``, sha256) and write
``part-NNNNN.parquet``. Shard boundaries depend only on the inputs and ``shard_size``, so a
relaunch rebuilds the same chunks, skips done shards and produces identical bytes.

Reading JSON (issue #13): any valid JSON is read — integers of any size, floats of any length
or exponent, nesting up to ``MAX_JSON_DEPTH`` — by one parser (``loads_record``) for ``.json``
elements and ``.jsonl`` lines alike. Only ``id``, ``image`` and ``conversations`` are kept;
other fields (``meta``, hashes, …) are read, never stored, and never cost a record. A broken
stretch of a ``.json`` list costs only the records it spans (``_JsonList``), each counted. The
reader lives in ``stages/ingest_reader.py`` (eval reads held-out files with it too).

Images inside a Parquet (issue #22): a Hugging Face ``datasets`` Parquet keeps each image in its
row (``{bytes, path}``). The driver writes each such image once into the run's content-addressed
store (``schemas.image_store``) as it reads it, so a chunk carries only the reference, and the
workers check it like any image file. A record is valid only when every string it carries into
the shard is writable UTF-8 (``check_encodable``); a row the Parquet writer still refuses is
rejected (``unwritable_record``) and the rest of the shard written. Rejects never carry payloads
(``schemas.samples.reject_entry``).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

from ..pipeline import atomic, remote
from ..pipeline.config import LlavadiConfig
from ..pipeline.stage import ShardOutput, ShardTask, StageContext
from ..schemas import image_store
from ..schemas.samples import Reject, reject_entry, validate_record, write_samples
from .ingest_reader import RAW_PREVIEW_CHARS, _first_byte, _id_key, _kind, _parse_int, read_raw

KEPT_FIELDS = ("id", "image", "conversations")  # what a sample row is made of; other fields are dropped

class IngestStage:
    name = "ingest"
    dir_name = "data"
    ext = "parquet"
    upstream = None

    def preflight(self, cfg: LlavadiConfig, run_dir: Path) -> list[str]:
        c = cfg.ingest
        p = []
        if not c.inputs:
            p.append("no input: pass --input FILE (LLaVA .json list, .jsonl or .parquet)")
        for f in c.inputs:
            try:
                exists = remote.is_file(f)
            except RuntimeError as e:  # a URL whose fsspec backend is not installed
                p.append(str(e))
                continue
            if not exists:
                p.append(f"input {f} does not exist or is not a file")
            elif _kind(f) is None:
                p.append(f"input {f}: unknown type; use .json (a list of records), .jsonl or .parquet")
            elif _kind(f) == "json" and _first_byte(f) not in (b"[",):
                p.append(f"input {f} is not a JSON list of records (LLaVA format); "
                         f"for one record per line name it .jsonl")
        if c.image_root is None:
            if any(needs_image_root(f) for f in c.inputs if remote.is_file(f)):
                p.append("no image root: pass --image-root DIR (the folder record 'image' paths are relative to)")
        elif not os.path.isdir(c.image_root):
            p.append(f"image root {c.image_root} is not a directory")
        return p

    def material(self, cfg: LlavadiConfig, run_dir: Path) -> dict:
        c = asdict(cfg.ingest)
        c["inputs"] = [remote.canonical(f) for f in cfg.ingest.inputs]
        c["image_root"] = os.path.abspath(cfg.ingest.image_root) if cfg.ingest.image_root else None
        # a changed input file changes the shards: its size is a cheap identity (hashing a
        # 1 GB JSON on every launch is not)
        c["input_bytes"] = [remote.size(f) for f in cfg.ingest.inputs]
        return c

    def plan(self, ctx: StageContext, is_done: Callable[[int], bool]) -> Iterator[ShardTask | int]:
        size = ctx.cfg.ingest.shard_size
        seen: set[int] = set()  # 64-bit hashes of ids: flat-ish memory for 665k+ records
        chunk: list[dict] = []
        index = 0

        def flush():
            nonlocal index, chunk
            i, rows = index, chunk
            index, chunk = index + 1, []
            if is_done(i):
                return i
            path = ctx.stage.staging / f"chunk-{i:05d}.jsonl"
            atomic.write_bytes(path, b"".join(_staged(r) for r in rows))
            return ShardTask(i, str(path))

        skip = is_done(0)  # is the chunk being filled done already (its records are not staged)?
        for f in ctx.cfg.ingest.inputs:
            for item in read_raw(f):
                if "record" in item and "text" not in item and not skip:  # a Parquet row
                    item = {**item, "record": _stored(item["record"], ctx.run_dir)}
                if "record" in item:
                    key = _id_key(item["record"])
                    if key is not None:
                        h = _stable_hash(key)
                        if h in seen:
                            item = {"source": item["source"], "reject": "duplicate_id", "id": key,
                                    "detail": f"id {key!r} already seen", "raw": key[:RAW_PREVIEW_CHARS]}
                        else:
                            seen.add(h)
                chunk.append(None if skip else item)  # a done chunk keeps no record (nor image) in memory
                if len(chunk) == size:
                    yield flush()
                    skip = is_done(index)
        if chunk:
            yield flush()

    def setup(self, ctx: StageContext):
        return None

    def process(self, ctx: StageContext, state, task: ShardTask) -> ShardOutput:
        c = ctx.cfg.ingest
        root = Path(c.image_root) if c.image_root else None
        rows, rejects = [], []
        reasons: dict[str, int] = {}
        n_in = 0
        with open(task.payload, "rb") as f:
            for line in f:
                item = json.loads(line, parse_int=_parse_int)  # a record's depth was checked when read
                n_in += 1
                try:
                    if "reject" in item:
                        raise Reject(item["reject"], item.get("detail", ""))
                    row = validate_record(item["record"], root, c.max_chars, c.check_images, ctx.run_dir)
                except Reject as r:
                    reasons[r.reason] = reasons.get(r.reason, 0) + 1
                    rec = item.get("record")
                    rejects.append(reject_entry(item["source"], _id_key(rec) if rec is not None else item.get("id"),
                                                r.reason, r.detail, item.get("raw")))
                    continue
                row["source"] = item["source"]
                rows.append(row)
        out = ctx.stage.data_file(task.index)
        tmp = atomic.tmp_name(out)
        try:
            unwritable = write_samples(rows, tmp)  # validation's safety net: one row never fails a shard
            for row, err in unwritable:
                reasons["unwritable_record"] = reasons.get("unwritable_record", 0) + 1
                rejects.append(reject_entry(row["source"], row["id"], "unwritable_record", err))
            dropped = {id(row) for row, _ in unwritable}
            rows = [r for r in rows if id(r) not in dropped]
            atomic.commit(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        atomic.write_jsonl(ctx.stage.rejects_file(task.index), rejects)
        n_img = sum(r["image"] is not None for r in rows)
        n_turns = sum(len(r["conversations"]) for r in rows)
        counts = {"in": n_in, "out": len(rows), "rejected": dict(sorted(reasons.items()))}
        return ShardOutput(out, counts, stats={"with_image": n_img, "text_only": len(rows) - n_img, "turns": n_turns})

    def cleanup(self, ctx: StageContext, task: ShardTask) -> None:
        Path(task.payload).unlink(missing_ok=True)


def needs_image_root(path: str) -> bool:
    """Can records of this input name image files (under ``--image-root``)? JSON: yes. Parquet: unless
    its ``image`` column holds the images themselves (``datasets``' ``{bytes, path}`` struct, or
    binary) or there is no ``image`` column (footer read only)."""
    if _kind(path) != "parquet":
        return True
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with remote.open_binary(path) as f:
            schema = pq.read_schema(f)
    except Exception:  # noqa: BLE001 - an unreadable file is reported when it is read
        return True
    if "image" not in schema.names:
        return False
    t = schema.field("image").type
    if pa.types.is_struct(t):
        return t.get_field_index("bytes") < 0
    return not (pa.types.is_binary(t) or pa.types.is_large_binary(t))


def _stored(rec, run_dir: Path):
    """A Parquet row → the fields a sample keeps, its embedded image (if any) written into the
    run's image store (``schemas.image_store``) and named by its store reference. Embedded = the
    ``datasets`` Image layout ``{"bytes": …, "path": …}`` with bytes, or a binary value; a
    ``{"bytes": None, "path": p}`` image is the file ``p`` under ``image_root``."""
    if not isinstance(rec, dict):
        return rec
    out = {k: rec[k] for k in KEPT_FIELDS if k in rec}
    img = out.get("image")
    if isinstance(img, dict) and img.keys() <= {"bytes", "path"}:
        img = img.get("bytes") if img.get("bytes") is not None else img.get("path")
        out["image"] = img if img is not None else out["image"]  # both null: judged as given (bad_image_field)
    if isinstance(img, (bytes, bytearray)):
        out["image"] = image_store.put(run_dir, bytes(img))[0]
    return out


def _staged(item: dict) -> bytes:
    """One line of a staging chunk. A JSON/JSONL record travels as its own bytes (no re-encoding:
    numbers keep their exact text, whatever their size); Parquet rows and rejects as JSON."""
    if "text" in item:
        return b'{"source": ' + json.dumps(item["source"]).encode() + b', "record": ' + item["text"] + b"}\n"
    return json.dumps(item, ensure_ascii=True, default=_jsonable).encode() + b"\n"


def _jsonable(o):
    # Parquet values JSON has no type for (binary, decimal, date/time): their text; the sample
    # schema keeps none of them, and an id of such a type is judged on that text
    if isinstance(o, (bytes, bytearray)):
        return o.decode("utf-8", "replace")
    return o.isoformat() if hasattr(o, "isoformat") else str(o)


def _stable_hash(key: str) -> int:
    """64-bit hash of an id that is the same in every process (Python's ``hash`` is salted)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


STAGE = IngestStage()
