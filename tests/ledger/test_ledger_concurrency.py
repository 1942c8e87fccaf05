"""8 processes x 500 appends at once: nothing lost, seqs gap-free, the chain verifies."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from evolution.ledger import KARMA_THRESHOLD_CROSSED, Ledger
from evolution.paths import DataRoot

WORKERS, APPENDS = 8, 500


def _append_many(home: str, url: str | None, worker: int, barrier) -> None:
    led = Ledger.open(DataRoot(Path(home)), url)
    barrier.wait()
    for i in range(APPENDS):
        led.append(KARMA_THRESHOLD_CROSSED, None, {"worker": worker, "i": i, "karma": i, "threshold": 1})
    led.close()


def test_concurrent_appends_lose_nothing(data_root, ledger_url):
    Ledger.open(data_root, ledger_url).close()  # migrate once; the race on first open is covered below
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    home = str(data_root.root)
    procs = [ctx.Process(target=_append_many, args=(home, ledger_url, w, barrier)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * WORKERS

    with Ledger.open(data_root, ledger_url) as led:
        entries = led.entries()
        assert [e.seq for e in entries] == list(range(1, WORKERS * APPENDS + 1))
        seen = {(e.payload["worker"], e.payload["i"]) for e in entries}
        assert seen == {(w, i) for w in range(WORKERS) for i in range(APPENDS)}
        for w in range(WORKERS):  # each writer's own appends keep their order
            mine = [e.payload["i"] for e in entries if e.payload["worker"] == w]
            assert mine == list(range(APPENDS))
        report = led.verify()
        assert report.ok, report.problems
        assert report.head.seq == WORKERS * APPENDS


def _open_and_append(home: str, url: str | None, worker: int, barrier) -> None:
    barrier.wait()
    with Ledger.open(DataRoot(Path(home)), url) as led:
        led.append(KARMA_THRESHOLD_CROSSED, None, {"worker": worker, "karma": 1, "threshold": 1})


def test_concurrent_first_open_migrates_once(data_root, ledger_url):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_open_and_append, args=(str(data_root.root), ledger_url, w, barrier)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 4
    with Ledger.open(data_root, ledger_url) as led:
        assert len(led.entries()) == 4 and led.verify().ok
