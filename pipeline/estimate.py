"""Size of a teacher cache before it is made (issues #15 item 4, #20): what ``llavadi cache-teacher RUN
--dry-run`` and ``llavadi status RUN`` print, and the free-space check a launch makes before work.

expected size = Σ over stored arrays (exact uncompressed bytes × compression ratio) + framing + teacher head

- **Rows, samples, images** are counted from the input, the source stage's shards (``regenerate/`` or
  ``data/`` per ``cache_teacher.source``), with the teacher's ``models.ModelAdapter`` — the calls that give
  cache-teacher its rows (``conversation()``; with ``positions`` text/all or ``affinity`` also ``encode()``
  with the image: the processor's own image-token count, anyres included). At most
  ``cache_teacher.estimate_rows`` input rows are counted (evenly spaced, the same rows every time), the
  rest extrapolated. Image rows stored once per image (``positions: all``) are counted per distinct
  ``image_sha256`` of the input. A row the adapter rejects counts as a rejected sample with no rows. Not
  foreseen: rows cache-teacher rejects later for their image (``missing_image``, ``image_changed``,
  ``processor_error``), length (``too_long``) or a model error, so the estimate errs on the large side.
- **Uncompressed bytes** per row and per sample follow from the field declarations
  (``schemas.teacher_cache.CacheSpec.fields``): exact.
- **Compression ratio** of every stored array and the stores' framing are measured by a **probe**
  (``stages/cache_probe.py``): the teacher run on ``cache_teacher.estimate_probe_samples`` input rows through
  the stage's own code into a scratch cache, its bytes on disk read per array
  (``schemas.teacher_cache.sizes``). ``--dry-run`` runs the probe; a launch runs it only when the
  uncompressed size does not fit the free space; ``status`` uses the last probe
  (``cache_teacher/stats/estimate_probe.json``, kept while the config and teacher are the same). Without a
  probe the estimate is the uncompressed size, an upper bound, and says so.
- **Teacher head**: ``teacher_head.safetensors`` = the output projection [V, H] in the checkpoint's dtype,
  sized from the safetensors headers (no weights read).

Free space: ``shutil.disk_usage`` of the nearest existing folder of ``RUN/cache_teacher``. A launch whose
still-to-do shards (plus the head, when not yet written) need more than that is refused before work unless
``cache_teacher.ignore_space_check=true``.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable, Optional

from .cache_plan import EstimateUnavailable, cache_spec, head_size
from .config import LlavadiConfig
from .rundir import StageDir

CACHE_DIR = "cache_teacher"
HEAD_FILE = "teacher_head.safetensors"  # = stages.cache_teacher.HEAD_FILE (pipeline never imports stages)
PROBE_FILE = "stats/estimate_probe.json"
# framing when no probe measured it (seen on Zarr 3.1 / numcodecs 0.16): WebDataset per sample — a 512 B
# tar header, the member padded to 512 B (256 B on average), the blob's magic + length and JSON header
# (~300 B) and 16 B of Blosc header per part; per Zarr shard its metadata files — ~1.3 kB per sharded row
# array, ~0.75 kB per per-sample array, ~0.6 kB for the group (the spec); an image-row entry's blob header
WDS_SAMPLE_FRAMING = 512 + 256 + 300
ZARR_ROW_ARRAY_FRAMING, ZARR_SAMPLE_ARRAY_FRAMING, ZARR_GROUP_FRAMING = 1300, 750, 600
BLOB_FRAMING = 300
__all__ = ["EstimateUnavailable", "estimate_cache", "render_lines", "space_problems", "status_estimate",
           "dry_run_report", "human", "head_size", "probe_key"]


def free_space(run_dir: Path | str) -> tuple[int, str]:
    """(free bytes, folder measured): ``shutil.disk_usage`` of ``RUN/cache_teacher`` or its nearest
    existing parent (the disk the cache will be written to)."""
    p = Path(run_dir) / CACHE_DIR
    while not p.exists() and p != p.parent:
        p = p.parent
    return int(shutil.disk_usage(p).free), str(p)


def sample_positions(total: int, k: int) -> list[int]:
    """``k`` row positions evenly spaced over ``0..total-1`` (all rows when ``k`` is 0 or ≥ total)."""
    if k <= 0 or k >= total:
        return list(range(total))
    return [int((j + 0.5) * total / k) for j in range(k)]


def read_rows(path: Path, local: list[int],
              columns=("id", "image", "conversations", "image_sha256", "source")) -> list[dict]:
    """Rows at the sorted positions ``local`` of one Parquet sample shard, streamed (stops after the last).
    Raises ``EstimateUnavailable`` for a shard that cannot be read: the stage's upstream check names
    that shard and its fix, and the estimate must not pre-empt it with a traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out, base, want = [], 0, iter(local)
    nxt = next(want, None)
    try:
        f = pq.ParquetFile(path)
        cols = [c for c in columns if c in f.schema_arrow.names]
        for batch in f.iter_batches(batch_size=1024, columns=cols):
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


def source_rows(run_dir: Path, cfg: LlavadiConfig, k: int) -> tuple[dict, list[dict], dict]:
    """(rows per done source shard, up to ``k`` rows evenly spaced over all of them, the source manifest)."""
    src = StageDir(run_dir, cfg.cache_teacher.source)
    manifest = src.read_manifest()
    if manifest is None:
        raise EstimateUnavailable(f"{src.path} does not exist yet")
    shards = {i: (src.read_done(i) or {}).get("counts", {}).get("out", 0) for i in src.done_indices()}
    if not shards:
        raise EstimateUnavailable(f"{src.path} has no finished shard yet")
    picks, start = [], 0
    it = iter(sample_positions(sum(shards.values()), k))
    p = next(it, None)
    for i, n in shards.items():
        local = []
        while p is not None and p < start + n:
            local.append(p - start)
            p = next(it, None)
        if local:
            picks += read_rows(src.data_file(i), local)
        start += n
    return shards, picks, manifest


def distinct_images(run_dir: Path, cfg: LlavadiConfig) -> int:
    """Distinct ``image_sha256`` values of the source's done shards (one column read per shard)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    src = StageDir(run_dir, cfg.cache_teacher.source)
    cols = [pq.read_table(src.data_file(i), columns=["image_sha256"]).column(0) for i in src.done_indices()]
    if not cols:
        return 0
    import pyarrow as pa

    return int(pc.count_distinct(pa.chunked_array([c for col in cols for c in col.chunks]), mode="only_valid").as_py())


def count(run_dir: Path, cfg: LlavadiConfig, spec, adapter) -> dict:
    """Rows by kind, samples, affinity values and sample-id bytes of the counted input rows (module doc)."""
    from ..schemas.samples import Reject
    from ..schemas.teacher_cache import KIND_IMAGE

    shards, picks, manifest = source_rows(run_dir, cfg, cfg.cache_teacher.estimate_rows)
    need_encode = spec.positions != "answer" or spec.affinity
    c = {"kinds": [0, 0, 0], "samples": 0, "image_samples": 0, "image_rows": 0, "affinity": 0, "id_bytes": 0,
         "answer_tokens": 0, "rejected": {}}
    for row in picks:
        try:
            conv = adapter.conversation(row["conversations"], row["image"] is not None)
            answers = sum(b - a for a, b in conv.spans)
            if need_encode:
                from ..schemas.images import load_rgb

                try:
                    image = load_rgb(cfg.ingest.image_root, row["image"]) if row["image"] is not None else None
                except Exception as e:  # noqa: BLE001
                    raise Reject("image_error", str(e)) from None
                enc = adapter.encode(conv, image)
                _, kinds = enc.rows((0, 1, 2))
                for k in kinds:
                    c["kinds"][k] += 1
                n_img = kinds.count(KIND_IMAGE)
                c["image_samples"] += 1 if n_img else 0
                c["image_rows"] += n_img
                c["affinity"] += n_img * answers
            else:
                c["kinds"][2] += answers
        except Reject as r:
            c["rejected"][r.reason] = c["rejected"].get(r.reason, 0) + 1
            continue
        c["samples"] += 1
        c["answer_tokens"] += answers
        c["id_bytes"] += len(row["id"].encode("utf-8"))
    total = sum(shards.values())
    c.update(shards=shards, total=total, counted=len(picks), scale=total / len(picks) if picks else 0.0,
             manifest=manifest)
    return c


def probe_key(cfg: LlavadiConfig, spec) -> str:
    """What a probe's ratios depend on: the cache spec, the teacher's weights identity and the source."""
    from ..models.engines.common import weights_identity

    blob = json.dumps({"spec": spec.to_meta(), "teacher": weights_identity(cfg.teacher.model),
                       "dtype": cfg.teacher.dtype, "source": cfg.cache_teacher.source,
                       "n": cfg.cache_teacher.estimate_probe_samples}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_probe(run_dir: Path, cfg: LlavadiConfig, spec) -> Optional[dict]:
    p = Path(run_dir) / CACHE_DIR / PROBE_FILE
    try:
        probe = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return probe if probe.get("key") == probe_key(cfg, spec) else None


def estimate_cache(run_dir: Path | str, cfg: LlavadiConfig, adapter=None,
                   probe: Optional[Callable[[], dict]] = None) -> dict:
    """The expected teacher cache of ``run_dir`` under ``cfg`` (module doc), as a JSON-able dict:
    ``rows_by_kind`` / ``samples`` / ``images`` / ``answer_tokens`` (expected), ``bytes_per_row`` (stored
    array → uncompressed bytes per row), ``ratios`` (array → measured compressed/raw, when probed),
    ``compressed`` (a probe was used), ``bytes_expected``, ``bytes_remaining``, ``bytes_written``,
    ``free_bytes``, ``fits`` and the counting details. ``probe``: a callable returning a fresh probe (the
    stage's); without one a stored probe of the same config is used if there is one. Raises
    :class:`EstimateUnavailable` when there is nothing to count."""
    from ..schemas.teacher_cache.sizes import raw_part_bytes

    run_dir = Path(run_dir)
    src = StageDir(run_dir, cfg.cache_teacher.source)
    if src.read_manifest() is None:
        raise EstimateUnavailable(f"{src.path} does not exist yet")
    t = cfg.teacher.model
    if not t or not (Path(t) / "config.json").exists():
        raise EstimateUnavailable("teacher.model is not set to a model directory")
    head = head_size(t)
    spec = cache_spec(cfg, head)
    if adapter is None:
        from ..models.engines.common import teacher_adapter

        adapter = teacher_adapter(cfg.teacher)
    c = count(run_dir, cfg, spec, adapter)
    s = c["scale"]
    kinds = [k * s for k in c["kinds"]]
    own_rows = sum(kinds[k] for k in spec.kinds if not (k == 0 and spec.image_rows_separate))
    images = float(distinct_images(run_dir, cfg)) if spec.image_rows_separate and c["image_samples"] else 0.0
    img_rows = images * (c["image_rows"] / c["image_samples"]) if c["image_samples"] else 0.0
    samples, n_shards = c["samples"] * s, len(c["shards"])
    aff_values = c["affinity"] * s if spec.affinity else 0.0
    pr = probe() if probe is not None else load_probe(run_dir, cfg, spec)
    raw = raw_part_bytes(spec)
    ratio = dict.fromkeys(raw, 1.0)
    img_ratio = dict(ratio)
    n_parts = len(raw) + 3 + 2 * len(spec.sample_fields())
    if pr:
        for name, b in raw.items():
            if pr["own_rows"] and name in pr["parts"]:
                ratio[name] = pr["parts"][name] / (pr["own_rows"] * b)
            if pr["image_rows"] and name in pr["image_parts"]:
                img_ratio[name] = pr["image_parts"][name] / (pr["image_rows"] * b)
        sample_b = pr["sample_bytes"] / max(1, pr["samples"])
        aff_b = pr["parts"].get("affinity", 0) / pr["affinity"] if pr.get("affinity") else 2.0
        per_sample_framing = pr["framing"] / max(1, pr["samples"]) if spec.store == "webdataset" else 0.0
        per_shard_framing = pr["framing"] if spec.store == "zarr" else 0.0
        entry_framing = pr["image_framing"] / pr["images"] if pr.get("images") else BLOB_FRAMING
    else:  # uncompressed: every stored array's raw bytes, framing from the constants above
        sample_b = (16 + (c["id_bytes"] / c["samples"] if c["samples"] else 0.0)
                    + (36 if spec.image_rows_separate else 0) + (8 if spec.affinity else 0))
        aff_b = 2.0
        per_sample_framing = WDS_SAMPLE_FRAMING + 16 * n_parts if spec.store == "webdataset" else 0.0
        per_shard_framing = (ZARR_ROW_ARRAY_FRAMING * len(raw) + ZARR_SAMPLE_ARRAY_FRAMING * (n_parts - len(raw))
                             + ZARR_GROUP_FRAMING) if spec.store == "zarr" else 10240.0
        entry_framing = BLOB_FRAMING + 16 * len(raw)
    row_bytes = sum(raw[k] * ratio[k] for k in raw)
    img_row_bytes = sum(raw[k] * img_ratio[k] for k in raw)
    shard_total = own_rows * row_bytes + samples * (sample_b + per_sample_framing) + aff_values * aff_b
    image_total = img_rows * img_row_bytes + images * entry_framing

    def shard_bytes(n_rows: int) -> float:
        f = n_rows / c["total"] if c["total"] else 0.0
        return f * (shard_total + image_total) + per_shard_framing

    cache = StageDir(run_dir, CACHE_DIR, spec.ext)
    done = set(cache.done_indices())
    todo = [i for i in c["shards"] if i not in done]
    expected = sum(shard_bytes(n) for n in c["shards"].values()) + head["bytes"]
    remaining = sum(shard_bytes(c["shards"][i]) for i in todo) + (0 if (cache.path / HEAD_FILE).exists() else head["bytes"])
    written = 0
    for i in done:
        try:
            st = json.loads(cache.stats_file(i).read_text())
            written += int(st.get("bytes") or 0) + int(st.get("image_bytes_written") or 0)
        except (OSError, ValueError):
            pass
    free, where = free_space(run_dir)
    return {"source": cfg.cache_teacher.source, "source_complete": bool(c["manifest"].get("complete")),
            "source_shards": n_shards, "rows": c["total"], "rows_counted": c["counted"],
            "exact": c["counted"] == c["total"], "samples": round(samples), "answer_tokens": round(c["answer_tokens"] * s),
            "answer_tokens_per_sample": round(c["answer_tokens"] / c["samples"], 2) if c["samples"] else 0.0,
            "rows_by_kind": {"image": round(kinds[0]), "prompt": round(kinds[1]), "answer": round(kinds[2])},
            "rows_stored": round(own_rows), "images": round(images), "image_rows_stored": round(img_rows),
            "rejected_counted": dict(sorted(c["rejected"].items())), "spec": spec.to_meta(),
            "bytes_per_row": raw, "bytes_per_row_total": sum(raw.values()), "bytes_per_row_disk": round(row_bytes, 1),
            "ratios": {k: round(v, 4) for k, v in ratio.items()} if pr else {}, "compressed": bool(pr),
            "probe_samples": pr["samples"] if pr else 0, "head": head,
            "bytes_expected": int(round(expected)), "shards": n_shards, "shards_done": len(done & set(c["shards"])),
            "bytes_remaining": int(round(remaining)), "bytes_written": written, "free_bytes": free,
            "free_path": where, "fits": int(round(remaining)) <= free}


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
    sp = e["spec"]
    how = ("every row counted" if e["exact"] else
           f"{e['rows_counted']:,} of {e['rows']:,} input rows counted (evenly spaced, cache_teacher.estimate_rows), "
           f"extrapolated")
    rej = ", ".join(f"{k}={v}" for k, v in e["rejected_counted"].items())
    k = e["rows_by_kind"]
    per_row = " + ".join(f"{name} {b:g} B" for name, b in e["bytes_per_row"].items())
    h = e["head"]
    size = (f"compressed as measured on {e['probe_samples']} probe sample(s)" if e["compressed"] else
            "UNCOMPRESSED (no probe: an upper bound; `llavadi cache-teacher RUN --dry-run` measures compression)")
    lines = [
        f"cache-teacher estimate (input {e['source']}/, {e['source_shards']} shard(s){'' if e['source_complete'] else ', INCOMPLETE'}):",
        f"  samples            {e['samples']:,} ({e['answer_tokens']:,} answer tokens, {e['answer_tokens_per_sample']} per "
        f"sample; {how}{'; rejected while counting: ' + rej if rej else ''})",
        f"  rows (positions={sp['positions']})  {e['rows_stored']:,} in the shards (answer {k['answer']:,}, prompt "
        f"{k['prompt']:,}, image {k['image']:,})"
        + (f"; image rows once per image: {e['images']:,} images, {e['image_rows_stored']:,} rows" if e["images"] else ""),
        f"  bytes per row      {e['bytes_per_row_total']:g} B uncompressed = {per_row}; {e['bytes_per_row_disk']:g} B on disk",
        f"  teacher head       {human(h['bytes'])} ({h['vocab_size']}×{h['hidden_size']} {h['dtype']})",
        f"  expected cache     {human(e['bytes_expected'])} ({sp['store']}, {size})",
        f"  still to write     {human(e['bytes_remaining'])} ({e['shards'] - e['shards_done']} of {e['shards']} shard(s)"
        + (f"; {human(e['bytes_written'])} written so far" if e["shards_done"] else "") + ")",
        f"  free space         {human(e['free_bytes'])} at {e['free_path']}" + ("" if e["fits"] else "  — DOES NOT FIT"),
    ]
    return lines


def space_problems(run_dir: Path | str, cfg: LlavadiConfig, adapter=None,
                   probe: Optional[Callable[[], dict]] = None) -> list[str]:
    """A launch's free-space check (cache-teacher's preflight): the uncompressed size first (no teacher
    run); when that does not fit, the compressed estimate (``probe``); one problem naming the sizes and
    ``cache_teacher.ignore_space_check`` when the still-to-do shards cannot fit, else none (also when there
    is nothing to estimate from: the other preflight checks report that)."""
    if cfg.cache_teacher.ignore_space_check:
        return []
    try:
        e = estimate_cache(run_dir, cfg, adapter)
        if not e["fits"] and probe is not None and cfg.cache_teacher.estimate_probe_samples and not e["compressed"]:
            e = estimate_cache(run_dir, cfg, adapter, probe)
    except EstimateUnavailable:
        return []
    if e["fits"]:
        return []
    how = "counted" if e["exact"] else f"extrapolated from {e['rows_counted']:,} of {e['rows']:,} rows"
    size = "compressed as a probe measured it" if e["compressed"] else "uncompressed"
    return [f"not enough disk space: the teacher cache needs about {human(e['bytes_remaining'])} for its "
            f"{e['shards'] - e['shards_done']} shard(s) still to do ({e['rows_stored']:,} rows, {how}, {size}, + "
            f"teacher head) but {e['free_path']} has {human(e['free_bytes'])} free. Free space there or use a run "
            f"directory on a larger disk; to launch anyway set cache_teacher.ignore_space_check=true"]


def status_estimate(run_dir: Path | str, cache_complete: bool) -> Optional[dict]:
    """For ``llavadi status``: the estimate while the run's cache-teacher has not finished (None once
    it has, or while the run has no ``config.yaml``, no ``teacher.model`` or no source shards yet);
    ``{"unavailable": why}`` when it cannot be made. Uses the last probe, never runs the teacher."""
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


def dry_run_report(run_dir: Path | str, cfg: LlavadiConfig, probe: Optional[Callable[[], dict]] = None) -> str:
    """``cache-teacher --dry-run``'s estimate: :func:`render_lines` as YAML comments, so the output
    (resolved config + estimate) still parses as YAML."""
    try:
        e = estimate_cache(run_dir, cfg, probe=probe if cfg.cache_teacher.estimate_probe_samples else None)
    except EstimateUnavailable as ex:
        e = {"unavailable": str(ex)}
    lines = render_lines(e)
    if "unavailable" not in e and not e["fits"] and not cfg.cache_teacher.ignore_space_check:
        lines.append("  a launch would be refused: set cache_teacher.ignore_space_check=true to launch anyway")
    return "\n".join("# " + line for line in lines)
