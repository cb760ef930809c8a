"""One launch per stage per run directory.

``StageLock`` creates ``<stage>/_lock.json`` with O_EXCL, holding pid, host, the process start
time and the launch time, and keeps a kernel lock (``fcntl.flock``) on that file for as long as the
launching process holds the stage. A second launch is refused (``LockedError`` names the holder).

Whether a holder on this host is alive is decided by nothing a wall-clock step can change
(issue #22: psutil's ``create_time()`` is boot time *in wall-clock seconds* + start ticks, so an NTP
step or a VM resume moves it and a live holder looked like a reused pid; psutil#2526, #2541):

1. the file's flock: if it can be taken, no process holds it, so the holder is dead (the kernel
   drops a flock when its process dies, however it dies — SIGKILL included) and its lock is taken
   over at once; if it cannot, the holder is alive;
2. where the filesystem offers no flock (Lustre without ``-o flock``, some FUSE mounts), or for a
   lock written without one: the holder's start time in clock ticks since boot
   (``/proc/PID/stat`` field 22) and the kernel's boot id. A pid reused by a later process has
   another start tick; a reboot another boot id; a clock step changes neither;
3. without ``/proc`` (macOS, where 1 rarely fails): psutil's start time within 1 s, as before.

A lock from another host is never guessed stale: the message says how to remove it.
Forked children of the holder do not keep its flock (``os.register_at_fork`` closes their copy):
the stage is held exactly as long as the launching process lives.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

import psutil


class LockedError(RuntimeError):
    pass


# flock fds this process holds; a forked child closes its copies so that it never keeps a stage
# locked after the launcher died (closing a duplicate does not release the parent's lock)
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def _flock(fd: int) -> Optional[bool]:
    """Try an exclusive flock without waiting: True taken, False held by another open file,
    None the filesystem has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return None  # ENOLCK, ENOSYS, EOPNOTSUPP, EINVAL: no flock on this filesystem


def _boot_id() -> Optional[str]:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> Optional[int]:
    """Start of process ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22; the
    command name, field 2, may hold spaces and parentheses, so fields are counted after its
    last ``)``); None without /proc or such a process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def _proc_start(pid: int) -> Optional[float]:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return None


def _same_process_alive(info: dict) -> bool:
    """Fallback without a usable flock: is the process recorded in ``info`` (same host) running?"""
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if not psutil.pid_exists(pid):
        return False
    ticks, boot = info.get("start_ticks"), info.get("boot_id")
    if isinstance(ticks, int) and boot and _boot_id() is not None:
        # ticks since boot: immune to wall-clock steps; another boot or another tick = another process
        return boot == _boot_id() and _start_ticks(pid) == ticks
    started, recorded = _proc_start(pid), info.get("proc_start")
    if started is None:
        return False
    # no /proc: psutil's start time (follows the wall clock, so a clock step reads as pid reuse here)
    return recorded is None or abs(started - recorded) < 1.0


class StageLock:
    """``with StageLock(stage_dir / "_lock.json", "ingest"):`` — holds the stage or raises
    ``LockedError`` (a live holder, or another launch racing for the same lock)."""

    def __init__(self, lock_file: Path, stage: str):
        self.path = Path(lock_file)
        self.stage = stage
        pid = os.getpid()
        self.info = {
            "pid": pid,
            "host": socket.gethostname(),
            "proc_start": _proc_start(pid),  # wall clock, for people reading the file
            "boot_id": _boot_id(),
            "start_ticks": _start_ticks(pid),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stage": stage,
        }
        self.took_over: Optional[dict] = None
        self._fd: Optional[int] = None

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return False
        got = _flock(fd)
        if got is False:  # a racing launch opened our new file and is judging it: start again
            os.close(fd)
            return False
        info = dict(self.info, flock=got is True)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        if got and not _is_file_at(fd, self.path):
            # a racer took the file over (it saw it empty, before our flock): ours is orphaned
            os.close(fd)
            return False
        self.info = info
        self._fd = fd
        if got:
            _HELD.add(fd)
        else:
            os.close(fd)  # no flock here: the recorded identity is what others check
            self._fd = None
        return True

    def acquire(self) -> "StageLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._try_create():
                return self
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # released meanwhile
            try:
                holder = _read_info(fd)
                if self._holder_alive(fd, holder):
                    for _ in range(20):  # created a moment ago, still being written: wait to name it
                        if holder:
                            break
                        time.sleep(0.05)
                        holder = _read_info(fd)
                    raise LockedError(
                        f"stage {self.stage!r} of this run is already running "
                        f"(pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started_at')}). "
                        f"Wait for it to finish. If that process is really gone, delete {self.path}.")
                if not _is_file_at(fd, self.path):
                    continue  # replaced since we opened it: judge the new one
                # stale: move it aside atomically (only one taker wins the rename), then create
                aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
                try:
                    os.replace(self.path, aside)
                    self.took_over = holder
                    aside.unlink(missing_ok=True)
                except FileNotFoundError:
                    pass
            finally:
                os.close(fd)
        raise LockedError(f"could not take the lock {self.path}; another launch is racing for it")

    def _holder_alive(self, fd: int, holder: dict) -> bool:
        got = _flock(fd)
        if got is False:
            return True  # a process holds the kernel lock: alive, on any host whose locks we see
        if holder.get("host") != socket.gethostname():
            return bool(holder)  # cannot tell across hosts: assume alive (an empty file is stale)
        if got and holder.get("flock"):
            return False  # its holder kept a flock on this file; the kernel dropped it: dead
        return _same_process_alive(holder)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _HELD.discard(fd)
            try:
                if _is_file_at(fd, self.path):
                    self.path.unlink(missing_ok=True)
            finally:
                os.close(fd)  # drops the flock
            return
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return
        if holder.get("pid") == self.info["pid"] and holder.get("host") == self.info["host"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "StageLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_info(fd: int) -> dict:
    """The lock file's JSON; {} while empty or half-written (a process killed mid-write)."""
    try:
        info = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _is_file_at(fd: int, path: Path) -> bool:
    """Does ``path`` still name the file open as ``fd`` (not removed or replaced since)?"""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
