"""``llavadi ingest``: LLaVA JSON (a list, parsed streaming), JSONL or Parquet → ``data/``
Parquet sample shards (``schemas.samples``), bad records to ``data/rejects/`` with a reason.

How shards are cut: the driver streams every input in order (a 1 GB JSON list is never
loaded whole: ``ijson``), drops duplicate ids (first one wins) and spills each run of
``shard_size`` raw records to ``data/_staging/chunk-NNNNN.jsonl``. Workers validate the records
of one chunk (roles, ``<image>``, image exists and decodes, sha256) and write
``part-NNNNN.parquet``. Shard boundaries depend only on the inputs and ``shard_size``, so a
relaunch rebuilds the same chunks, skips done shards and produces identical bytes.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..pipeline import atomic, remote
from ..pipeline.config import LlavadiConfig
from ..pipeline.stage import ShardOutput, ShardTask, StageContext
from ..schemas.samples import Reject, validate_record, write_samples

INPUT_KINDS = {".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
RAW_PREVIEW_CHARS = 300  # how much of an unparsable record the rejects file keeps


def _kind(path: str) -> Optional[str]:
    return INPUT_KINDS.get(Path(path).suffix.lower())


def _first_byte(path: str) -> bytes:
    with remote.open_binary(path) as f:
        while True:
            b = f.read(1)
            if not b or not b.isspace():
                return b


def read_raw(path: str) -> Iterator[dict]:
    """Yield ``{"source", "record"}`` or ``{"source", "reject", "detail", "raw"}`` per record,
    streaming. A JSON list that breaks mid-file yields one reject for the rest of the file (JSON
    cannot be resynchronised after a syntax error)."""
    name = Path(path).name
    kind = _kind(path)
    if kind == "jsonl":
        with remote.open_binary(path) as f:
            for lineno, line in enumerate(f, start=1):
                src = f"{name}:{lineno}"
                if not line.strip():
                    continue
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield {"source": src, "reject": "not_utf8", "detail": str(e),
                           "raw": line[:RAW_PREVIEW_CHARS].decode("utf-8", "replace")}
                    continue
                try:
                    rec = json.loads(text)
                except (json.JSONDecodeError, RecursionError) as e:
                    detail = "nested too deeply to parse" if isinstance(e, RecursionError) else str(e)
                    yield {"source": src, "reject": "malformed_json", "detail": detail, "raw": text[:RAW_PREVIEW_CHARS]}
                    continue
                yield {"source": src, "record": rec}
    elif kind == "json":
        import ijson

        i = -1
        with remote.open_binary(path) as f:
            try:
                for i, rec in enumerate(ijson.items(f, "item", use_float=True)):
                    yield {"source": f"{name}#{i}", "record": rec}
            except (ijson.JSONError, UnicodeDecodeError, ValueError, RecursionError) as e:
                reason = "not_utf8" if isinstance(e, UnicodeDecodeError) or "utf" in str(e).lower() else "malformed_json"
                yield {"source": f"{name}#{i + 1}", "reject": reason,
                       "detail": f"{e}; the rest of {name} after record {i + 1} cannot be read", "raw": ""}
    elif kind == "parquet":
        import pyarrow.parquet as pq

        with remote.open_binary(path) as f:
            pf = pq.ParquetFile(f)
            i = 0
            for batch in pf.iter_batches(batch_size=1024):
                for rec in batch.to_pylist():
                    yield {"source": f"{name}#{i}", "record": rec}
                    i += 1
    else:  # preflight refuses these; kept for direct callers
        raise ValueError(f"{path}: unknown input type")


def _id_key(rec) -> Optional[str]:
    if isinstance(rec, dict) and isinstance(rec.get("id"), (str, int)) and not isinstance(rec.get("id"), bool):
        return str(rec["id"])
    return None


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
            atomic.write_bytes(path, b"".join(json.dumps(r, ensure_ascii=True).encode() + b"\n" for r in rows))
            return ShardTask(i, str(path))

        for f in ctx.cfg.ingest.inputs:
            for item in read_raw(f):
                if "record" in item:
                    key = _id_key(item["record"])
                    if key is not None:
                        h = _stable_hash(key)
                        if h in seen:
                            item = {"source": item["source"], "reject": "duplicate_id",
                                    "detail": f"id {key!r} already seen", "raw": key[:RAW_PREVIEW_CHARS]}
                        else:
                            seen.add(h)
                chunk.append(item)
                if len(chunk) == size:
                    yield flush()
        if chunk:
            yield flush()

    def setup(self, ctx: StageContext):
        return None

    def process(self, ctx: StageContext, state, task: ShardTask) -> ShardOutput:
        c = ctx.cfg.ingest
        root = Path(c.image_root) if c.image_root else None
        rows, rejects = [], []
        reasons: dict[str, int] = {}
        n_in = n_img = n_turns = 0
        with open(task.payload, "rb") as f:
            for line in f:
                item = json.loads(line)
                n_in += 1
                try:
                    if "reject" in item:
                        raise Reject(item["reject"], item.get("detail", ""))
                    row = validate_record(item["record"], root, c.max_chars, c.check_images)
                except Reject as r:
                    reasons[r.reason] = reasons.get(r.reason, 0) + 1
                    rec = item.get("record")
                    rid = _id_key(rec) if rec is not None else None
                    rejects.append({"source": item["source"], "id": rid, "reason": r.reason, "detail": r.detail,
                                    **({"raw": item["raw"]} if item.get("raw") else {})})
                    continue
                row["source"] = item["source"]
                rows.append(row)
                n_img += row["image"] is not None
                n_turns += len(row["conversations"])
        out = ctx.stage.data_file(task.index)
        tmp = atomic.tmp_name(out)
        try:
            write_samples(rows, tmp)
            atomic.commit(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        atomic.write_jsonl(ctx.stage.rejects_file(task.index), rejects)
        counts = {"in": n_in, "out": len(rows), "rejected": dict(sorted(reasons.items()))}
        return ShardOutput(out, counts, stats={"with_image": n_img, "text_only": len(rows) - n_img, "turns": n_turns})

    def cleanup(self, ctx: StageContext, task: ShardTask) -> None:
        Path(task.payload).unlink(missing_ok=True)


def _stable_hash(key: str) -> int:
    """64-bit hash of an id that is the same in every process (Python's ``hash`` is salted)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


STAGE = IngestStage()
