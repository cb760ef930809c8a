"""The size estimate's probe (``pipeline/estimate.py``): the teacher run on a few input rows through
cache-teacher's own code into a scratch cache beside the run, its bytes on disk read per stored array, so
the estimate multiplies exact uncompressed sizes by measured compression ratios. Kept in
``cache_teacher/stats/estimate_probe.json`` while the config and teacher stay the same."""
from __future__ import annotations

import tempfile
from pathlib import Path

from ..pipeline import atomic
from ..pipeline.cache_plan import cache_spec
from ..pipeline.config import LlavadiConfig
from ..pipeline.estimate import CACHE_DIR, PROBE_FILE, load_probe, probe_key, source_rows
from ..pipeline.rundir import StageDir
from ..pipeline.stage import ShardTask, StageContext
from ..schemas.samples import write_samples
from ..schemas.teacher_cache import ImageRowStore, iter_cache_shard
from ..schemas.teacher_cache.sizes import image_part_bytes, raw_part_bytes, shard_part_bytes


def run_probe(run_dir: Path | str, cfg: LlavadiConfig) -> dict:
    """``{"key", "samples", "own_rows", "parts" (stored array → bytes on disk), "framing", "sample_bytes",
    "affinity" (values), "images", "image_rows", "image_parts", "image_framing"}`` of a scratch cache of
    ``cache_teacher.estimate_probe_samples`` rows (evenly spaced over the input) made with the HF forcer
    (the vLLM forcer gives the same values up to float noise, and this runs in the launching process)."""
    from ..models.engines.forcing import make_forcer
    from .cache_teacher import STAGE

    run_dir = Path(run_dir)
    spec = cache_spec(cfg)
    known = load_probe(run_dir, cfg, spec)
    if known:
        return known
    _, picks, _ = source_rows(run_dir, cfg, cfg.cache_teacher.estimate_probe_samples)
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".probe{atomic.TMP_MARK}", dir=run_dir) as tmp:
        tmp = Path(tmp)
        write_samples(picks, tmp / "input.parquet")
        sd = StageDir(tmp, CACHE_DIR, spec.ext)
        sd.mkdirs()
        ctx = StageContext(run_dir=tmp, stage=sd, cfg=cfg, fingerprint="probe")
        forcer = make_forcer("hf", cfg.teacher, spec, cfg.cache_teacher.sample_seed)
        out = STAGE.process(ctx, forcer, ShardTask(0, str(tmp / "input.parquet")))
        ImageRowStore(sd.path, spec).finalize()
        parts, framing = shard_part_bytes(out.data_file)
        iparts, iframing, images, irows = image_part_bytes(sd.path)
        affinity = sum(int(s["affinity"].size) for s in iter_cache_shard(out.data_file)) if spec.affinity else 0
    row_names = set(raw_part_bytes(spec))
    probe = {"key": probe_key(cfg, spec), "samples": out.counts["out"], "own_rows": out.counts["rows"],
             "parts": parts, "framing": framing, "affinity": affinity,
             "sample_bytes": sum(v for k, v in parts.items() if k not in row_names and k != "affinity"),
             "images": images, "image_rows": irows, "image_parts": iparts, "image_framing": iframing}
    target = run_dir / CACHE_DIR / PROBE_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(target, probe)
    return probe
