"""fsspec URLs for inputs, shards and caches.

Where the pipeline reads, a path may be a local path, a ``file://`` URL, or any URL an installed
fsspec backend serves (``s3://`` with ``s3fs``, ``gs://`` with ``gcsfs``, ``hf://``, ``http(s)://``…):

- ``ingest`` inputs (``--input``) are streamed through fsspec;
- ``train_student.cache_from`` / ``eval`` ``cache_from``: a run directory (local or URL) whose
  finished ``cache_teacher/`` stage — and the sample shards it was made from — are pulled into
  this run before training: students on other machines stream the teacher's shards from
  wherever the teacher wrote them. Every pulled shard is checked against the sha256 its
  ``_done`` marker recorded, and a rerun pulls only what is missing.

Where the pipeline *writes* (the run directory), the path must be on a POSIX filesystem (local
disk, NFS, Lustre, a FUSE mount of a bucket): shards are committed by an atomic rename, which
object stores do not offer. ``file://`` URLs are accepted there too.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from . import atomic

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")


def scheme(s: str) -> Optional[str]:
    """``"s3"`` for ``s3://b/k``; None for a plain path."""
    m = _SCHEME.match(str(s))
    return m.group(1).lower() if m else None


def is_remote(s: str) -> bool:
    return scheme(s) not in (None, "file")


def local_path(s: str) -> str:
    """A plain path or ``file://`` URL as a local path; a remote URL raises ``ValueError``."""
    sc = scheme(s)
    if sc is None:
        return str(s)
    if sc == "file":
        return str(s)[len("file://"):] or "/"
    raise ValueError(f"{s} is a {sc}:// URL; this path must be local (or file://)")


def canonical(s: str) -> str:
    """Stable identity for fingerprints: local paths and file:// URLs absolute, other URLs as given."""
    return str(s) if is_remote(s) else os.path.abspath(local_path(s))


def filesystem(url: str):
    """``(fsspec filesystem, path inside it)``; a missing backend is named with its install."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(str(url))
    except (ImportError, ValueError) as e:
        raise RuntimeError(f"cannot open {url}: {e}. Install the fsspec backend for "
                           f"{scheme(url)}:// (e.g. `pip install s3fs` for s3://, gcsfs for gs://)") from e


def open_binary(url: str):
    """A readable binary file object for a path or URL (a context manager)."""
    if not is_remote(url):
        return open(local_path(url), "rb")
    fs, path = filesystem(url)
    return fs.open(path, "rb")


def is_file(url: str) -> bool:
    if not is_remote(url):
        return os.path.isfile(local_path(url))
    fs, path = filesystem(url)
    return fs.isfile(path)


def size(url: str) -> Optional[int]:
    try:
        if not is_remote(url):
            return os.path.getsize(local_path(url))
        fs, path = filesystem(url)
        return int(fs.size(path))
    except (OSError, FileNotFoundError):
        return None


def pull_stage(src_run: str, name: str, run_dir: Path) -> int:
    """Copy stage directory ``name`` of the run at ``src_run`` (path or URL) into ``run_dir/name``.

    Metadata (``.json``/``.jsonl``: markers, manifest, index, rejects) is always copied; a data
    file already here with the same size is kept (a rerun pulls only the shards that are missing)
    because every shard is then verified against the sha256 of its freshly pulled ``_done`` marker
    (``CorruptShardError`` names a bad one). Each file lands by temp + rename, so a killed pull
    leaves no partial file; the source's lock and scratch are skipped. Returns files copied."""
    from .rundir import CorruptShardError, StageDir

    src = str(src_run).rstrip("/")
    if not is_remote(src):
        src = local_path(src)
    fs, base = filesystem(f"{src}/{name}")
    if not fs.exists(f"{base}/_stage.json"):
        raise FileNotFoundError(f"{src}/{name} has no _stage.json: not a finished llavadi stage directory")
    dest = Path(run_dir) / name
    copied = 0
    files = sorted(p for p in fs.find(base) if not p.endswith("_lock.json") and "/_staging/" not in p
                   and atomic.TMP_MARK not in p)
    for p in files:
        rel = p[len(base):].lstrip("/")
        out = dest / rel
        remote_size = fs.size(p)
        if out.exists() and out.stat().st_size == remote_size and not rel.endswith((".json", ".jsonl")):
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = atomic.tmp_name(out)
        try:
            fs.get_file(p, str(tmp))
            atomic.commit(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        copied += 1
    sd = StageDir(Path(run_dir), name)
    for i in sd.done_indices():
        try:
            sd.verify_shard(i)
        except CorruptShardError as e:
            raise CorruptShardError(f"pulled from {src}/{name}: {e} If the source stage is sound, it was "
                                    f"being written during the pull: rerun the same command to pull again.") from e
    return copied


def run_image_root(run: str) -> tuple[Optional[str], str]:
    """(``ingest.image_root`` of the run at ``run`` (path or URL) as its ``config.yaml`` records it, where
    that came from): the folder that run's sample images were read from. (None, why) when the file or the
    key is missing."""
    import yaml

    src = str(run).rstrip("/")
    cfg_file = f"{src}/config.yaml"
    try:
        with open_binary(cfg_file if is_remote(src) else local_path(cfg_file)) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, FileNotFoundError):
        return None, f"none ({cfg_file} cannot be read)"
    root = ((data if isinstance(data, dict) else {}).get("ingest") or {}).get("image_root")
    if not root:
        return None, f"none ({cfg_file} names no ingest.image_root)"
    return str(root), f"ingest.image_root of {cfg_file}"


def samples_image_root(override: Optional[str], override_key: str, source_run: Optional[str],
                       own: Optional[str]) -> tuple[Optional[str], str]:
    """(image folder of a stage's samples, where it came from), the one rule of every stage that joins
    samples to their images: ``override`` (the stage's ``…image_root`` key, named ``override_key``) if set;
    else, when the samples come from another run (``source_run``: ``train_student.cache_from``, the run of
    ``eval --cache``), that run's own ``ingest.image_root`` (``run_image_root``); else ``own`` (this run's
    ``ingest.image_root``)."""
    if override:
        return override, override_key
    if source_run:
        return run_image_root(source_run)
    return own, "ingest.image_root"
