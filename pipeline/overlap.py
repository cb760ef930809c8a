"""Overlapped producer/consumer steps for a stage's shard loop (cache-teacher: a reader thread prepares
the next window while the caller runs the teacher, and a writer thread encodes the window before):
bounded queues, errors handed across, early stop within ``_POLL_S``. Stage-agnostic."""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

_END = object()
_POLL_S = 0.1  # how often a blocked thread looks at the stop flag


class Prefetch:
    """Run the generator ``make()`` in a daemon thread, at most ``depth`` items ahead of the
    consumer (a bounded queue). Iterating yields its items in order and re-raises its
    exception; ``stop`` ends the thread early (a blocked ``put`` gives up within ``_POLL_S``)."""

    def __init__(self, make: Callable[[], Iterator], depth: int, name: str):
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make,), name=name, daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def _run(self, make) -> None:
        try:
            for item in make():
                if not self._put((True, item)):
                    return
            self._put((True, _END))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put((False, e))

    def __iter__(self):
        while True:
            ok, item = self._q.get()
            if not ok:
                self._thread.join()
                raise item
            if item is _END:
                self._thread.join()
                return
            yield item

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Sink:
    """Apply ``fn`` to each ``put`` item in a daemon thread, in order, with at most ``depth``
    items waiting. ``put``/``finish`` re-raise ``fn``'s first exception (items after it are
    dropped); ``finish`` waits until every item is done; ``stop`` abandons the rest."""

    def __init__(self, fn: Callable[[object], None], depth: int, name: str):
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        while not self._stop.is_set():
            try:
                item = self._q.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if item is _END:
                return
            try:
                fn(item)
            except BaseException as e:  # noqa: BLE001 - handed to the producer
                self._error = e
                return

    def _check(self) -> None:
        if self._error is not None:
            self._thread.join()
            raise self._error

    def put(self, item) -> None:
        while True:
            self._check()
            if not self._thread.is_alive():
                raise RuntimeError(f"{self._thread.name} has stopped")
            try:
                self._q.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                pass

    def finish(self) -> None:
        self.put(_END)
        self._thread.join()
        self._check()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
