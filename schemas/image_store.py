"""The run's image store: images that arrive *inside* an ingest input, written once, by content.

A Hugging Face ``datasets`` Parquet keeps each image in its row (``image`` = ``{bytes, path}``,
or a binary column; issue #22). The sample schema (design §4) stores an image as a path, so ingest
writes each such image once into the run, content-addressed::

    RUN/data/images/<h[:2]>/<h>.<ext>     h = sha256 of the bytes, ext = the format Pillow finds in them

and the sample row names it ``run:data/images/<h[:2]>/<h>.<ext>`` (a *store reference*; its
``image_sha256`` is ``h``). Every other ``image`` value is a path relative to ``ingest.image_root``.
``resolve`` turns either into a file path; every stage that opens an image goes through it.
Identical images are stored once. The store is part of the ``data/`` stage (``--force`` rebuilds
it); it may also hold images whose records were then rejected (undecodable, …).

A stored file is checked like any image file (it must decode to 8-bit RGB) and, since its name is
its hash, by hashing it: ``schemas.samples.check_image`` rejects a store file whose bytes no longer
match its name.
"""
from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import Optional

from ..pipeline import atomic

PREFIX = "run:"
STORE = "data/images"
_REF = re.compile(r"run:data/images/([0-9a-f]{2})/([0-9a-f]{64})\.[a-z0-9]{1,8}")
# file extension per Pillow format name (others: the format name in lower case)
_EXT = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "TIFF": "tif", "BMP": "bmp"}


def is_ref(rel) -> bool:
    """Does an ``image`` value name the run's store (rather than a file under ``image_root``)?"""
    return isinstance(rel, str) and rel.startswith(PREFIX)


def ref_sha256(rel: str) -> Optional[str]:
    """The sha256 a well-formed store reference names (its file's content hash); None otherwise."""
    m = _REF.fullmatch(rel)
    return m.group(2) if m and m.group(1) == m.group(2)[:2] else None


def resolve(image_root: str | Path | None, rel: str, run_dir: str | Path | None) -> Path:
    """The file an ``image`` value names: a store reference under ``run_dir``, anything else under
    ``image_root`` (``rel`` alone when that is None). ``ValueError`` for a store reference without
    a run directory."""
    if is_ref(rel):
        if run_dir is None:
            raise ValueError(f"{rel} names a run's image store, but no run directory was given")
        return Path(run_dir) / rel[len(PREFIX):]
    return Path(image_root or "") / rel


def _ext(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            fmt = im.format or ""
    except Exception:  # noqa: BLE001 - not an image: stored anyway, ingest then rejects its records
        return "bin"
    return _EXT.get(fmt) or (re.sub(r"[^a-z0-9]", "", fmt.lower())[:8] or "bin")


def put(run_dir: str | Path, data: bytes) -> tuple[str, str]:
    """Write ``data`` into the store of ``run_dir`` unless a file with the same bytes is there;
    returns ``(store reference, sha256 hex)``. Atomic (temp + fsync + rename): a killed writer
    leaves no partial image. An existing file that does not hash to its name is rewritten."""
    h = hashlib.sha256(data).hexdigest()
    rel = f"{STORE}/{h[:2]}/{h}.{_ext(data)}"
    path = Path(run_dir) / rel
    try:
        same = path.stat().st_size == len(data) and atomic.sha256_file(path) == h
    except OSError:
        same = False
    if not same:
        atomic.write_bytes(path, data)
    return PREFIX + rel, h
