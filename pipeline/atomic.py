"""Crash-safe file writes: write to a unique temporary name in the same directory, fsync,
then ``os.replace`` — a reader (or a relaunch after SIGKILL) sees either nothing or the whole
file, never a prefix."""
from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

from . import faults

TMP_MARK = ".tmp-"


def tmp_name(final: Path) -> Path:
    """Temporary sibling of ``final``; unique per process so two writers never collide."""
    return final.with_name(f"{final.name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp: Path, final: Path) -> None:
    """fsync ``tmp`` then rename it over ``final``."""
    faults.maybe_inject_current("commit")  # tests: a write failing like a full disk (ENOSPC)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_bytes(final: Path, data: bytes) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(final)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        commit(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(final: Path, obj: Any) -> None:
    write_bytes(final, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def write_jsonl(final: Path, rows: list[dict]) -> None:
    write_bytes(final, b"".join(_jsonl_line(r) for r in rows))


def _jsonl_line(r: dict) -> bytes:
    try:
        return (json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n").encode()
    except UnicodeEncodeError:
        # an unpaired surrogate (e.g. the id of a not_utf8 reject) has no UTF-8 form: this line is
        # written \u-escaped, valid UTF-8 JSON that reads back to the same strings
        return (json.dumps(r, sort_keys=True) + "\n").encode()


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def sha256_path(path: Path) -> str:
    """Checksum of a file, or of a directory store (e.g. Zarr): relative names + file hashes,
    in sorted order."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


def remove_stale_tmp(directory: Path) -> int:
    """Delete leftovers of writers that died before their rename. Call under the stage lock."""
    n = 0
    if not directory.exists():
        return 0
    for p in directory.rglob(f"*{TMP_MARK}*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            n += 1
        elif p.is_dir():
            import shutil

            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and every directory holding them (``path`` included)."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in sorted({p.parent for p in path.rglob("*")} | {path}):
        fsync_dir(d)


def replace_dir(tmp: Path, final: Path) -> None:
    """Make the fully written directory ``tmp`` appear as ``final`` in one rename (after an fsync of its
    tree); an older ``final`` is removed only now, so a crash leaves one of the two complete."""
    import shutil

    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def publish_dir(tmp: Path, final: Path, keep: int) -> None:
    """``replace_dir``, then keep only the newest ``keep`` siblings named like ``final``
    (``step_*`` checkpoints; names sort by age)."""
    import shutil

    replace_dir(tmp, final)
    prefix = final.name.split("_")[0] + "_"
    for old in sorted(p for p in final.parent.glob(f"{prefix}*") if TMP_MARK not in p.name)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
