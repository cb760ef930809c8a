"""Size of a teacher cache before it is made (issue #15 item 4): what ``llavadi cache-teacher RUN
--dry-run`` and ``llavadi status RUN`` print, and the free-space check a launch makes before work.

expected size = answer tokens × bytes per token + samples × bytes per sample + the teacher head file

- **Answer tokens** are counted from the input, the source stage's shards (``regenerate/`` or
  ``data/`` per ``cache_teacher.source``), by rendering and tokenising each conversation with the
  teacher's ``models.ModelAdapter`` — ``conversation()``, the same call that gives cache-teacher its
  answer spans, so a counted row yields exactly the answer tokens cache-teacher caches for it. At
  most ``cache_teacher.estimate_rows`` rows are counted (evenly spaced over the whole input, the
  same rows every time); beyond that the mean per counted row is multiplied by the input's row
  count and the estimate says it was extrapolated. A row the adapter rejects (``token_mismatch``,
  ``image_placement``) counts as a rejected sample with no tokens. Not foreseen: rows that
  cache-teacher rejects later for their image (``missing_image``, ``image_changed``, ``processor_error``) or length
  (``too_long``), so the estimate errs on the large side.
- **Bytes per token** and **per sample** are the cache format's uncompressed array sizes
  (``schemas.teacher_cache.token_array_bytes`` / ``sample_array_bytes``): hidden H × 2 B
  (float16/bfloat16) or H × 1 B + a 4 B scale (int8), top-k ids 4 B × k, top-k log-probs 4 or 2 B × k,
  ``logit_stats`` 8 B, the token id 4 B; per sample two int64 offsets + the id's bytes. The
  WebDataset store adds its tar framing per sample (:data:`WDS_SAMPLE_OVERHEAD`).
  Blosc/zstd compression is not modelled: on disk a shard is smaller than the estimate (the
  tests measure the ratio; random-weight teachers' hidden states compress least).
- **Teacher head**: ``teacher_head.safetensors`` = the output projection [V, H] in the
  checkpoint's dtype, sized from the safetensors headers (no weights read).

Free space: ``shutil.disk_usage`` of the nearest existing folder of ``RUN/cache_teacher`` (run
directories are local, NFS or FUSE paths: the CLI refuses object-store URLs). A launch whose
still-to-do shards (plus the head, when not yet written) need more than that is refused before
work unless ``cache_teacher.ignore_space_check=true``.

Reads the run directory only; writes nothing. Imports nothing heavy until there is something to count.
"""
from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from typing import Optional

from .config import LlavadiConfig
from .rundir import StageDir

CACHE_DIR = "cache_teacher"
HEAD_FILE = "teacher_head.safetensors"  # = stages.cache_teacher.HEAD_FILE (pipeline never imports stages)
# WebDataset framing per sample: a 512 B tar header, the member padded to 512 B (256 B on average),
# the blob's magic + length (8 B), its JSON header (~230 B with 20-character ids) and a 16 B Blosc
# header per segment (6) — about 1.1 kB, an average, not a bound. Per shard the tar adds its trailer
# member, the end-of-archive blocks and padding to a 10 240 B record (≤ 12.3 kB; a Zarr shard's
# metadata files are about as large): neither is counted, < 0.1 % of a shard of a few thousand samples.
WDS_SAMPLE_OVERHEAD = 512 + 256 + 8 + 230 + 6 * 16
_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                   "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class EstimateUnavailable(RuntimeError):
    """Nothing to estimate from yet (no source shards, no teacher); the message says why."""


def free_space(run_dir: Path | str) -> tuple[int, str]:
    """(free bytes, folder measured): ``shutil.disk_usage`` of ``RUN/cache_teacher`` or its nearest
    existing parent (the disk the cache will be written to)."""
    p = Path(run_dir) / CACHE_DIR
    while not p.exists() and p != p.parent:
        p = p.parent
    return int(shutil.disk_usage(p).free), str(p)


def head_size(model_dir: str | Path) -> dict:
    """``{"vocab_size", "hidden_size", "dtype", "bytes"}`` of the output projection that
    cache-teacher copies into ``teacher_head.safetensors`` (``lm_head.weight`` [+ bias], else the tied
    ``embed_tokens.weight``, as ``models.engines.common.output_head`` picks it), read from the
    safetensors headers only. ``bytes`` = tensor bytes + the file's header (its JSON ≈ 200 B)."""
    from ..models.engines.common import safetensors_files

    d = Path(model_dir)
    headers = {}
    for f in safetensors_files(d):
        with open(d / f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            headers[f] = json.loads(fh.read(n))
    found = {}
    for suffix, name in (("lm_head.weight", "weight"), ("lm_head.bias", "bias")):
        for h in headers.values():
            key = next((k for k in h if k != "__metadata__" and k.endswith(suffix)), None)
            if key:
                found[name] = h[key]
                break
    if "weight" not in found:  # tied embeddings
        for h in headers.values():
            key = next((k for k in h if k != "__metadata__" and k.endswith("embed_tokens.weight")), None)
            if key:
                found["weight"] = h[key]
                break
    if "weight" not in found:
        raise EstimateUnavailable(f"no lm_head / embed_tokens weight in {d}'s safetensors")
    V, H = (int(x) for x in found["weight"]["shape"])
    nbytes = sum(math.prod(t["shape"]) * _ST_DTYPE_BYTES.get(t["dtype"], 4) for t in found.values())
    return {"vocab_size": V, "hidden_size": H, "dtype": found["weight"]["dtype"], "bytes": int(nbytes) + 8 + 256}


def _sample_positions(total: int, k: int) -> list[int]:
    """``k`` row positions evenly spaced over ``0..total-1`` (all rows when ``k`` is 0 or ≥ total)."""
    if k <= 0 or k >= total:
        return list(range(total))
    return [int((j + 0.5) * total / k) for j in range(k)]


def _read_rows(path: Path, local: list[int]) -> list[dict]:
    """Rows at the sorted positions ``local`` of one Parquet sample shard, streamed (stops after the last).
    Raises ``EstimateUnavailable`` for a shard that cannot be read: the stage's upstream check names
    that shard and its fix, and the estimate must not pre-empt it with a traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out, base, want = [], 0, iter(local)
    nxt = next(want, None)
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=["id", "image", "conversations"]):
            n = batch.num_rows
            take = []
            while nxt is not None and nxt < base + n:
                take.append(nxt - base)
                nxt = next(want, None)
            if take:
                out += batch.take(take).to_pylist()
            base += n
            if nxt is None:
                break
    except (OSError, pa.ArrowException) as e:
        raise EstimateUnavailable(f"{path} cannot be read ({type(e).__name__})") from None
    return out


def estimate_cache(run_dir: Path | str, cfg: LlavadiConfig, adapter=None) -> dict:
    """The expected teacher cache of ``run_dir`` under ``cfg`` (module doc), as a JSON-able dict:

    ``source``, ``rows`` (input rows in the source's done shards), ``rows_counted``, ``exact``
    (every row counted), ``samples`` / ``answer_tokens`` (expected; counted or extrapolated),
    ``rejected_counted`` (reason → rows among those counted), the spec (``hidden_size``, ``top_k``,
    dtypes, ``store``), ``bytes_per_token`` (array → bytes) and ``bytes_per_token_total``,
    ``bytes_per_sample``, ``head`` (:func:`head_size`), ``bytes_arrays`` (every stored array,
    uncompressed), ``bytes_framing`` (WebDataset tar framing), ``bytes_expected`` (their sum + the head),
    ``shards`` / ``shards_done`` / ``bytes_remaining`` (shards with no ``_done`` marker yet, + the
    head file when absent), ``bytes_written`` (done shards on disk, from their stats), ``free_bytes``
    / ``free_path`` and ``fits``. Raises :class:`EstimateUnavailable` when there is nothing to count.
    ``adapter``: the teacher's ``ModelAdapter`` when the caller has one (else it is built)."""
    from ..schemas.samples import Reject
    from ..schemas.teacher_cache import CacheSpec, sample_array_bytes, token_array_bytes

    run_dir = Path(run_dir)
    c = cfg.cache_teacher
    src = StageDir(run_dir, c.source)
    manifest = src.read_manifest()
    if manifest is None:
        raise EstimateUnavailable(f"{src.path} does not exist yet")
    shards = {i: (src.read_done(i) or {}).get("counts", {}).get("out", 0) for i in src.done_indices()}
    if not shards:
        raise EstimateUnavailable(f"{src.path} has no finished shard yet")
    t = cfg.teacher.model
    if not t or not (Path(t) / "config.json").exists():
        raise EstimateUnavailable("teacher.model is not set to a model directory")
    head = head_size(t)
    spec = CacheSpec(hidden_size=head["hidden_size"], top_k=c.top_k, hidden_dtype=c.hidden_dtype,
                     logprob_dtype=c.logprob_dtype, store=c.store)
    if adapter is None:
        from ..models.engines.common import teacher_adapter

        adapter = teacher_adapter(cfg.teacher)

    # count: evenly spaced rows over the concatenation of the shards, in shard order
    total = sum(shards.values())
    positions = _sample_positions(total, c.estimate_rows)
    by_shard: dict[int, list[int]] = {}
    start = 0
    it = iter(positions)
    p = next(it, None)
    for i, n in shards.items():
        while p is not None and p < start + n:
            by_shard.setdefault(i, []).append(p - start)
            p = next(it, None)
        start += n
    tokens = kept = id_bytes = 0
    rejected: dict[str, int] = {}
    for i, local in by_shard.items():
        for row in _read_rows(src.data_file(i), local):
            try:
                conv = adapter.conversation(row["conversations"], row["image"] is not None)
            except Reject as r:
                rejected[r.reason] = rejected.get(r.reason, 0) + 1
                continue
            tokens += sum(b - a for a, b in conv.spans)
            kept += 1
            id_bytes += sample_array_bytes(row["id"])
    counted = len(positions)
    scale = total / counted if counted else 0.0
    per_token = token_array_bytes(spec)
    bpt = sum(per_token.values())
    bps = id_bytes / kept if kept else 16.0
    framing = WDS_SAMPLE_OVERHEAD if c.store == "webdataset" else 0
    # per shard, in proportion to its rows (exact per shard when every row was counted)
    exp_tokens, exp_samples = tokens * scale, kept * scale

    def shard_bytes(n_rows: int) -> float:
        f = n_rows / total if total else 0.0
        return f * (exp_tokens * bpt + exp_samples * (bps + framing)) + 16  # + the offsets arrays' extra entry

    cache = StageDir(run_dir, CACHE_DIR, spec.ext)
    done = set(cache.done_indices())
    todo = [i for i in shards if i not in done]
    expected = sum(shard_bytes(n) for n in shards.values()) + head["bytes"]
    remaining = sum(shard_bytes(shards[i]) for i in todo) + (0 if (cache.path / HEAD_FILE).exists() else head["bytes"])
    written = 0
    for i in done:
        try:
            written += int(json.loads(cache.stats_file(i).read_text()).get("bytes") or 0)
        except (OSError, ValueError):
            pass
    free, where = free_space(run_dir)
    return {"source": c.source, "source_complete": bool(manifest.get("complete")),
            "source_shards": len(shards), "rows": total, "rows_counted": counted, "exact": counted == total,
            "samples": round(exp_samples), "answer_tokens": round(exp_tokens),
            "answer_tokens_per_sample": round(tokens / kept, 2) if kept else 0.0,
            "rejected_counted": dict(sorted(rejected.items())),
            "hidden_size": spec.hidden_size, "top_k": spec.top_k, "hidden_dtype": spec.hidden_dtype,
            "logprob_dtype": spec.logprob_dtype, "store": spec.store,
            "bytes_per_token": per_token, "bytes_per_token_total": bpt, "bytes_per_sample": round(bps, 1),
            "bytes_framing_per_sample": framing, "head": head, "compressed": False,
            "bytes_arrays": int(round(exp_tokens * bpt + exp_samples * bps + 16 * len(shards))),
            "bytes_framing": int(round(exp_samples * framing)), "bytes_expected": int(round(expected)),
            "shards": len(shards), "shards_done": len(done & set(shards)), "bytes_remaining": int(round(remaining)),
            "bytes_written": written, "free_bytes": free, "free_path": where, "fits": remaining <= free}


def human(n: float) -> str:
    """Bytes in decimal units (1 GB = 10⁹ B), as ``df -H`` prints them."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


def render_lines(e: dict) -> list[str]:
    """``estimate_cache``'s dict as the lines the CLI prints."""
    if "unavailable" in e:
        return [f"cache-teacher estimate: not available ({e['unavailable']})"]
    parts = {"token_ids": "token id 4 B",
             "hidden": f"hidden {e['hidden_size']}×{e['bytes_per_token']['hidden'] // e['hidden_size']} B ({e['hidden_dtype']})",
             "hidden_scale": "int8 scale 4 B",
             "topk_ids": f"top-k ids 4 B×{e['top_k']}",
             "topk_logprobs": f"top-k log-probs {e['bytes_per_token']['topk_logprobs'] // e['top_k']} B×{e['top_k']} ({e['logprob_dtype']})",
             "logit_stats": "logit stats 8 B"}
    how = ("every row counted" if e["exact"] else
           f"{e['rows_counted']:,} of {e['rows']:,} rows counted (evenly spaced, cache_teacher.estimate_rows), "
           f"extrapolated")
    rej = ", ".join(f"{k}={v}" for k, v in e["rejected_counted"].items())
    h = e["head"]
    lines = [
        f"cache-teacher estimate (input {e['source']}/, {e['source_shards']} shard(s){'' if e['source_complete'] else ', INCOMPLETE'}):",
        f"  answer tokens      {e['answer_tokens']:,} in {e['samples']:,} samples "
        f"({e['answer_tokens_per_sample']} per sample; {how}{'; rejected while counting: ' + rej if rej else ''})",
        f"  bytes per token    {e['bytes_per_token_total']:,} B = " + " + ".join(parts[k] for k in e["bytes_per_token"]),
        f"  bytes per sample   {e['bytes_per_sample']:,} B (offsets + id)"
        + (f" + {e['bytes_framing_per_sample']:,} B WebDataset tar framing" if e["bytes_framing_per_sample"] else ""),
        f"  teacher head       {human(h['bytes'])} ({h['vocab_size']}×{h['hidden_size']} {h['dtype']})",
        f"  expected cache     {human(e['bytes_expected'])} ({e['store']}, uncompressed: before Blosc/zstd, which makes it smaller on disk)",
        f"  still to write     {human(e['bytes_remaining'])} ({e['shards'] - e['shards_done']} of {e['shards']} shard(s)"
        + (f"; {human(e['bytes_written'])} written so far" if e["shards_done"] else "") + ")",
        f"  free space         {human(e['free_bytes'])} at {e['free_path']}" + ("" if e["fits"] else "  — DOES NOT FIT"),
    ]
    return lines


def space_problems(run_dir: Path | str, cfg: LlavadiConfig, adapter=None) -> list[str]:
    """A launch's free-space check (cache-teacher's preflight): one problem naming the sizes and
    ``cache_teacher.ignore_space_check`` when the still-to-do shards cannot fit, else none (also
    when there is nothing to estimate from: the other preflight checks report that)."""
    if cfg.cache_teacher.ignore_space_check:
        return []
    try:
        e = estimate_cache(run_dir, cfg, adapter)
    except EstimateUnavailable:
        return []
    if e["fits"]:
        return []
    how = "counted" if e["exact"] else f"extrapolated from {e['rows_counted']:,} of {e['rows']:,} rows"
    return [f"not enough disk space: the teacher cache needs about {human(e['bytes_remaining'])} for its "
            f"{e['shards'] - e['shards_done']} shard(s) still to do ({e['answer_tokens']:,} answer tokens, {how}, "
            f"× {e['bytes_per_token_total']:,} B/token uncompressed + ids + teacher head) but {e['free_path']} has "
            f"{human(e['free_bytes'])} free. Free space there or use a run directory on a larger disk; compression "
            f"makes the cache smaller than this estimate, so to launch anyway set cache_teacher.ignore_space_check=true"]


def status_estimate(run_dir: Path | str, cache_complete: bool) -> Optional[dict]:
    """For ``llavadi status``: the estimate while the run's cache-teacher has not finished (None once
    it has, or while the run has no ``config.yaml``, no ``teacher.model`` or no source shards yet);
    ``{"unavailable": why}`` when it cannot be made."""
    run_dir = Path(run_dir)
    if cache_complete or not (run_dir / "config.yaml").exists():
        return None
    try:
        from .session import resolve

        cfg = resolve(run_dir)
        if not cfg.teacher.model or not StageDir(run_dir, cfg.cache_teacher.source).path.exists():
            return None  # no teacher chosen yet, or nothing to count
        return estimate_cache(run_dir, cfg)
    except EstimateUnavailable as e:
        return {"unavailable": str(e)}
    except Exception as e:  # noqa: BLE001 - status never fails on its estimate
        return {"unavailable": f"{type(e).__name__}: {e}"}


def dry_run_report(run_dir: Path | str, cfg: LlavadiConfig) -> str:
    """``cache-teacher --dry-run``'s estimate: :func:`render_lines` as YAML comments, so the output
    (resolved config + estimate) still parses as YAML."""
    try:
        e = estimate_cache(run_dir, cfg)
    except EstimateUnavailable as ex:
        e = {"unavailable": str(ex)}
    lines = render_lines(e)
    if "unavailable" not in e and not e["fits"] and not cfg.cache_teacher.ignore_space_check:
        lines.append("  a launch would be refused: set cache_teacher.ignore_space_check=true to launch anyway")
    return "\n".join("# " + line for line in lines)
