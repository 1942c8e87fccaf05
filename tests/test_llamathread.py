"""The llama thread: requests in order, a new model's canary in slices between them, never a long wait."""

from __future__ import annotations

import os
import threading
import time

import pytest

from evolution.llamathread import LlamaThread


def _slices(log: list, n: int, seconds: float, result="done"):
    for i in range(n):
        time.sleep(seconds)
        log.append(f"B{i}")
        yield
    return result


def _blocked(thread: LlamaThread) -> threading.Event:
    """Hold the thread in a request until the returned event is set, so that work queues up behind it."""
    release = threading.Event()
    thread.submit(release.wait)
    return release


def test_requests_run_in_order_with_their_results_and_errors():
    t = LlamaThread()
    try:
        futures = [t.submit(lambda i=i: i * i) for i in range(5)]
        assert [f.result(5) for f in futures] == [0, 1, 4, 9, 16]
        with pytest.raises(ZeroDivisionError):
            t.submit(lambda: 1 / 0).result(5)
        assert t.submit(lambda: "still serving").result(5) == "still serving"
    finally:
        t.shutdown()


def test_a_waiting_request_sits_behind_at_most_one_slice_longer_than_the_bound():
    """Slices of 50 ms under a bound of 80 ms: each request waits for one slice at most, and the slices that
    are left run once nobody waits."""
    t, log = LlamaThread(max_wait_s=0.08), []
    try:
        release = _blocked(t)
        requests = [t.submit(log.append, f"R{i}") for i in range(3)]
        work = t.background(_slices(log, 6, 0.05))
        release.set()
        assert work.result(10) == "done"
        for r in requests:
            r.result(5)
        assert log == ["B0", "R0", "R1", "R2", "B1", "B2", "B3", "B4", "B5"]
    finally:
        t.shutdown()


def test_background_work_waited_for_by_no_request_longer_than_the_bound():
    """Short slices (5 ms) under a bound of 80 ms: however many run between requests, the background seconds a
    request waited through, from its submission to its start, stay within the bound plus one slice."""
    t = LlamaThread(max_wait_s=0.08)
    spans: list[tuple[str, float, float]] = []

    def slices():
        for _ in range(60):
            s = time.perf_counter()
            time.sleep(0.005)
            spans.append(("bg", s, time.perf_counter()))
            yield

    def request(submitted):
        spans.append(("req", submitted, time.perf_counter()))
        time.sleep(0.01)

    try:
        release = _blocked(t)
        futures = [t.submit(request, time.perf_counter()) for _ in range(4)]
        work = t.background(slices())
        release.set()
        for _ in range(6):
            futures.append(t.submit(request, time.perf_counter()))
            time.sleep(0.01)
        work.result(10)
        for f in futures:
            f.result(5)
    finally:
        t.shutdown()
    slice_s = max(b - a for kind, a, b in spans if kind == "bg")
    for kind, submitted, started in spans:
        if kind == "req":
            waited = sum(b - a for k, a, b in spans if k == "bg" and a >= submitted and b <= started)
            assert waited <= 0.08 + slice_s, waited
    assert sum(k == "bg" for k, *_ in spans) == 60


def test_background_work_finishes_under_unbroken_load():
    t, log = LlamaThread(max_wait_s=0.0), []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            t.submit(time.sleep, 0.01).result(5)

    clients = [threading.Thread(target=client) for _ in range(4)]
    try:
        for c in clients:
            c.start()
        assert t.background(_slices(log, 5, 0.01, result=42)).result(20) == 42
    finally:
        stop.set()
        for c in clients:
            c.join()
        t.shutdown()
    assert log == [f"B{i}" for i in range(5)]


def test_an_error_in_background_work_reaches_its_caller_and_the_thread_goes_on():
    def failing():
        yield
        raise RuntimeError("canary broke")

    t = LlamaThread()
    try:
        with pytest.raises(RuntimeError, match="canary broke"):
            t.background(failing()).result(5)
        assert t.submit(lambda: "ok").result(5) == "ok"
    finally:
        t.shutdown()


def test_shutdown_runs_queued_requests_and_abandons_background_work():
    t, log = LlamaThread(max_wait_s=0.0), []
    release = _blocked(t)
    queued = t.submit(log.append, "R")
    work = t.background(_slices(log, 3, 0.0))
    closer = threading.Thread(target=t.shutdown)
    closer.start()
    time.sleep(0.05)
    release.set()
    closer.join(5)
    assert queued.result(1) is None and log[-1] == "R"
    with pytest.raises(RuntimeError, match="shut down"):
        work.result(1)
    with pytest.raises(RuntimeError, match="shut down"):
        t.submit(print)


def test_a_canary_in_slices_answers_what_one_chat_answers():
    """The embedded GGUF's greedy reply is the same computed in slices as in one call, and took several slices."""
    from evolution.base import embedded_gguf
    from evolution.llamacpp import LlamaCppBackend

    gguf = embedded_gguf()
    fd = os.open(gguf, os.O_RDONLY)
    try:
        model = LlamaCppBackend(512, 1).load(gguf, fd)
        args = {"messages": [{"role": "system", "content": "You are Ada."},
                             {"role": "user", "content": "Hello! Who are you?"}],
                "max_tokens": 12, "temperature": 0.0}
        whole = model.chat(args)["choices"][0]["message"]["content"]
        steps, n = model.chat_in_slices(args, 0.02), 0
        while True:
            try:
                next(steps)
                n += 1
            except StopIteration as stop:
                sliced = stop.value
                break
        model.close()
    finally:
        os.close(fd)
    assert sliced == whole and whole.strip()
    assert n >= 3
