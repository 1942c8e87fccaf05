"""The one thread that makes a process's llama.cpp calls: requests in arrival order, background work between them.

llama.cpp's OpenMP team belongs to the thread that started it (see ``evolution.serving``), so every decode of
the process runs here. Requests (``submit``) run one at a time in the order they came. Background work
(``background``: the canary of a generation loading beside the served one) is a generator that does a
slice of work — a few prompt tokens or a few generated ones, ``SLICE_S`` of compute — at each ``next()``; its
slices run between requests, and never more of them than keeps a waiting request's extra wait within
``MAX_WAIT_S``. So a swap costs a request at most that, not the new model's whole canary. At least one slice
runs per request, so background work still finishes under unbroken load (a slice longer than ``MAX_WAIT_S``,
a large model's single token, is then what a request waits).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future
from typing import Any

SLICE_S = 0.04
"""How much compute one background slice aims at (``LlamaCppModel.chat_in_slices`` stops before exceeding it)."""
MAX_WAIT_S = 0.08
"""The most background work a waiting request sits behind (the swap target: ≤ 100 ms extra for any request)."""


class LlamaThread:
    """One worker thread: ``submit`` for requests (first come, first served), ``background`` for sliced work."""

    def __init__(self, name: str = "llama", max_wait_s: float = MAX_WAIT_S):
        self.max_wait_s = max_wait_s
        self._cv = threading.Condition()
        self._requests: deque[tuple[Future, Callable, tuple, float]] = deque()  # (future, fn, args, bg clock then)
        self._background: deque[tuple[Future, Generator]] = deque()
        self._bg_clock = 0.0  # seconds of background work run so far
        self._last_slice = 0.0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args: Any) -> Future:
        """Run ``fn(*args)`` on the thread after the requests before it; its result (or exception) in the future."""
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the llama thread is shut down")
            self._requests.append((fut, fn, args, self._bg_clock))
            self._cv.notify()
        return fut

    def background(self, steps: Generator) -> Future:
        """Run the generator ``steps`` a slice (one ``next()``) at a time between requests; the future gets the
        value it returns."""
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the llama thread is shut down")
            self._background.append((fut, steps))
            self._cv.notify()
        return fut

    def _slice_allowed(self) -> bool:
        if not self._background:
            return False
        if not self._requests:
            return True
        waited = self._bg_clock - self._requests[0][3]  # the oldest request has waited the longest
        return waited == 0 or waited + self._last_slice <= self.max_wait_s

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._requests and not self._background and not self._closed:
                    self._cv.wait()
                if not self._closed and self._slice_allowed():
                    fut, steps = self._background.popleft()
                    job = None
                elif self._requests:
                    fut, fn, args, _ = self._requests.popleft()
                    job = (fn, args)
                else:  # closed: requests already queued were run; background work is abandoned
                    for fut, steps in self._background:
                        steps.close()
                        fut.set_exception(RuntimeError("the llama thread shut down before this work finished"))
                    self._background.clear()
                    return
            if job is not None:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(job[0](*job[1]))
                    except BaseException as exc:  # noqa: BLE001 — handed to the caller
                        fut.set_exception(exc)
                continue
            t0 = time.perf_counter()
            try:
                next(steps)
            except StopIteration as stop:
                fut.set_result(stop.value)
                steps = None
            except BaseException as exc:  # noqa: BLE001 — handed to the caller
                fut.set_exception(exc)
                steps = None
            took = time.perf_counter() - t0
            with self._cv:
                self._bg_clock += took
                self._last_slice = took
                if steps is not None:
                    self._background.append((fut, steps))

    def shutdown(self, wait: bool = True) -> None:
        """Run the requests already submitted, abandon background work, and stop."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()
