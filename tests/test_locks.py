"""Stage lock liveness (issue #22 class 1): a live holder is never taken over after a wall-clock
step; a dead holder's lock is taken over at once. Whether the holder lives is known here
independently: the test owns the holder process (running, or SIGKILLed and reaped)."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from llavadi.pipeline import locks
from llavadi.pipeline.locks import LockedError, StageLock

from conftest import cli

# a holder process: takes the lock, says so, optionally forks a child that outlives it, sleeps
HOLDER = r"""
import os, sys, time
from llavadi.pipeline.locks import StageLock
lk = StageLock(sys.argv[1], "ingest").acquire()
child = 0
if sys.argv[2] == "fork":
    ready = sys.argv[1] + ".child-ready"
    child = os.fork()
    if child == 0:  # fork() returned here after the at-fork hooks ran: the child's copy of the lock is closed
        open(ready, "w").close()
        time.sleep(120)
        os._exit(0)
    while not os.path.exists(ready):  # under load the child may not have run yet: wait until it has
        time.sleep(0.01)
print("held", child, flush=True)
time.sleep(120)
"""

# wall-clock steps: NTP slews by seconds, a VM resume or a fixed RTC by hours or days, both ways
STEPS_S = [-86400.0, -3600.0, -2.0, 2.0, 3600.0]


class Holder:
    def __init__(self, path, fork=False):
        self.p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), "fork" if fork else "-"],
                                  stdout=subprocess.PIPE, text=True)
        line = self.p.stdout.readline().split()
        assert line and line[0] == "held", "holder never took the lock"
        self.child = int(line[1])

    def kill(self):
        self.p.send_signal(signal.SIGKILL)
        self.p.wait()

    def cleanup(self):
        if self.p.poll() is None:
            self.kill()
        if self.child:
            try:
                os.kill(self.child, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def holder(tmp_path):
    made = []

    def make(path, fork=False):
        made.append(Holder(path, fork))
        return made[-1]
    yield make
    for h in made:
        h.cleanup()


def step_clock(monkeypatch, step_s):
    """What a wall-clock step does to psutil here: create_time() = boot time in wall-clock seconds
    (read now) + start ticks, so every process's reported start moves by the step (psutil#2526)."""
    real = psutil.Process.create_time
    monkeypatch.setattr(psutil.Process, "create_time", lambda self: real(self) + step_s)


def shift_recorded_start(path, step_s):
    """The same step seen from the lock file: its recorded start no longer equals create_time().
    Rewritten in place (same inode) as the holder's own file would read."""
    info = json.loads(path.read_text())
    info["proc_start"] -= step_s
    with open(path, "r+") as f:
        f.truncate(0)
        f.write(json.dumps(info))


@pytest.mark.parametrize("step_s", STEPS_S)
def test_live_holder_is_not_taken_over_after_a_clock_step(tmp_path, holder, monkeypatch, step_s):
    path = tmp_path / "_lock.json"
    h = holder(path)
    recorded = json.loads(path.read_text())
    step_clock(monkeypatch, step_s)
    # the bug's precondition holds: psutil now disagrees with the recorded start by the step
    assert abs(psutil.Process(h.p.pid).create_time() - recorded["proc_start"] - step_s) < 1.0
    with pytest.raises(LockedError, match=f"pid {h.p.pid}"):
        StageLock(path, "ingest").acquire()
    assert json.loads(path.read_text()) == recorded  # untouched
    h.kill()  # now dead: taken over at once, clock step or not
    lk = StageLock(path, "ingest").acquire()
    assert lk.took_over["pid"] == h.p.pid
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lk.release()
    assert not path.exists()


def test_second_ingest_refused_while_stepped_holder_runs_then_takes_over(tmp_path, synth, holder):
    train, root = synth
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    lock = run / "data" / "_lock.json"
    h = holder(lock)
    shift_recorded_start(lock, 3600.0)
    args = ("ingest", run, "--input", train, "--image-root", root, "--shard-size", "60", "--executor", "local")
    p = cli(*args, check=False)
    assert p.returncode == 2 and "already running" in p.stderr and f"pid {h.p.pid}" in p.stderr
    assert not (run / "data" / "_done").exists()  # it ran nothing
    h.kill()
    t0 = time.monotonic()
    p = cli(*args)
    assert "2 shards" in p.stdout and not lock.exists()
    assert time.monotonic() - t0 < 60  # no waiting on a dead holder


def test_forked_child_of_a_dead_holder_does_not_keep_the_stage(tmp_path, holder):
    path = tmp_path / "_lock.json"
    h = holder(path, fork=True)
    h.kill()
    assert psutil.pid_exists(h.child)  # its forked child lives on
    lk = StageLock(path, "ingest").acquire()
    assert lk.took_over["pid"] == h.p.pid
    lk.release()


def test_lock_records_identity_immune_to_the_clock(tmp_path):
    path = tmp_path / "_lock.json"
    with StageLock(path, "ingest"):
        info = json.loads(path.read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["flock"] is True
    # independent: psutil's (boot time + start) and os.sysconf's tick rate give the same tick
    ticks = (psutil.Process().create_time() - psutil.boot_time()) * os.sysconf("SC_CLK_TCK")
    assert abs(info["start_ticks"] - ticks) <= 1
    assert info["boot_id"] == open("/proc/sys/kernel/random/boot_id").read().strip()


def test_start_ticks_parse_a_command_name_with_spaces_and_parentheses():
    p = subprocess.Popen([sys.executable, "-c",
                          "open('/proc/self/comm','w').write('a) b (c'); print(1, flush=True); import time; time.sleep(30)"],
                         stdout=subprocess.PIPE, text=True)
    try:
        p.stdout.readline()
        assert psutil.Process(p.pid).name() == "a) b (c"
        ticks = (psutil.Process(p.pid).create_time() - psutil.boot_time()) * os.sysconf("SC_CLK_TCK")
        assert abs(locks._start_ticks(p.pid) - ticks) <= 1
    finally:
        p.kill()
        p.wait()


# ----------------------------------------------------------------- filesystems without flock
@pytest.fixture
def no_flock(monkeypatch):
    """A filesystem without flock (Lustre without -o flock): flock fails with ENOLCK."""
    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(locks.fcntl, "flock", refuse)


@pytest.mark.parametrize("step_s", STEPS_S)
def test_without_flock_live_holder_survives_a_clock_step(tmp_path, no_flock, monkeypatch, step_s):
    path = tmp_path / "_lock.json"
    mine = StageLock(path, "ingest").acquire()  # held by this live process, no kernel lock
    assert json.loads(path.read_text())["flock"] is False
    step_clock(monkeypatch, step_s)
    with pytest.raises(LockedError):
        StageLock(path, "ingest").acquire()
    mine.release()
    assert not path.exists()


def write_lock(path, **info):
    path.write_text(json.dumps({"host": socket.gethostname(), "started_at": "then", "stage": "ingest", **info}))


def test_without_flock_dead_or_reused_or_rebooted_holder_is_taken_over(tmp_path, no_flock):
    me = StageLock(tmp_path / "x", "ingest").info  # this process's identity as a lock records it
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cases = {
        "dead pid": dict(pid=dead.pid, boot_id=me["boot_id"], start_ticks=me["start_ticks"]),
        "pid reused (another start tick)": dict(pid=os.getpid(), boot_id=me["boot_id"],
                                                start_ticks=me["start_ticks"] - 7),
        "another boot": dict(pid=os.getpid(), boot_id="0" * 36, start_ticks=me["start_ticks"]),
        "legacy lock, pid reused": dict(pid=os.getpid(), proc_start=12.0),
    }
    for name, info in cases.items():
        path = tmp_path / f"{len(name)}_lock.json"
        write_lock(path, **info)
        lk = StageLock(path, "ingest").acquire()
        assert lk.took_over["pid"] == info["pid"], name
        lk.release()
    # and the same identity as this live process is alive
    path = tmp_path / "live_lock.json"
    write_lock(path, pid=os.getpid(), boot_id=me["boot_id"], start_ticks=me["start_ticks"])
    with pytest.raises(LockedError):
        StageLock(path, "ingest").acquire()


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    path = tmp_path / "_lock.json"
    write_lock(path, pid=1, host="elsewhere.example", flock=True)
    with pytest.raises(LockedError, match="elsewhere.example"):
        StageLock(path, "ingest").acquire()


def test_a_lock_being_written_is_live_and_named_once_written(tmp_path):
    # a holder between creating the file (flocked) and writing it: the second launch must not
    # judge the empty file stale, and names the holder once its content lands
    import fcntl
    import threading

    path = tmp_path / "_lock.json"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    late = threading.Timer(0.2, lambda: os.pwrite(fd, json.dumps(
        {"pid": 4242, "host": socket.gethostname(), "flock": True}).encode(), 0))
    late.start()
    try:
        with pytest.raises(LockedError, match="pid 4242"):
            StageLock(path, "ingest").acquire()
    finally:
        late.join()
        os.close(fd)
    lk = StageLock(path, "ingest").acquire()  # the kernel lock is gone with its fd: stale now
    assert lk.took_over["pid"] == 4242
    lk.release()
