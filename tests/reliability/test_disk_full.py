"""A full disk during an age-up: the attempt fails saying so, the parent keeps serving, and once
space is freed the daemon retries and finishes on its own.

Two ways to fill the disk: ``EVOLUTION_FAULTS`` raising ENOSPC at a named point of the age-up
worker (each attempt a different one: a ledger append, a checkpoint save, the GGUF export, the
ledger append after the child is finished), and a real size-limited filesystem (tmpfs) under the
whole data root, filled to the brim and then emptied. The daemon runs in this process and ticks
its scheduler by hand; its workers are real processes.

A full disk while served chats are captured: ENOSPC injected at the ``capture`` point (the
experience inserted, not yet committed), and a real tmpfs under the ledger filled to the brim.
Chat keeps answering, each lost capture is counted in ``/status``, captures resume once space is
freed, and nothing half-written is kept.
"""

from __future__ import annotations

import json
import shutil

import pytest
from sqlalchemy import text
from starlette.testclient import TestClient

from evolution import faults
from evolution.config import DaemonConfig
from evolution.daemon import Daemon
from evolution.ledger import events as ev
from evolution.paths import DataRoot
from tests.conftest import SERVER_TOKEN
from tests.daemon_util import tick_until
from evolution.server import create_app
from tests.reliability.conftest import copy_root, fill, tmpfs, umount

pytestmark = pytest.mark.slow

CHILD = 2  # the lineage serves 1


def _request(daemon: Daemon):
    return daemon.intake.karma.requests()[-1]


def _parent_still_serves(daemon: Daemon, tally, area: str) -> None:
    report = daemon.ledger.verify()
    tally.lost(area, len(report.problems) + (_request(daemon).status not in ("pending", "running")))
    assert report.ok, report.problems
    assert daemon.host.current.gen == 1 and daemon.ledger.served_generation() == 1
    reply = daemon.host.call(lambda slot: slot.model.chat(dict(
        messages=[{"role": "user", "content": "What is your name?"}], max_tokens=4)))
    assert reply["choices"][0]["message"]["content"]
    kinds = {e.kind for e in daemon.ledger.entries(gen=CHILD)}
    assert ev.PROMOTED not in kinds and ev.REJECTED not in kinds


def _says_disk_full(text: str) -> None:
    assert "the disk is full" in text and "Free some space" in text, text


@pytest.fixture
def worker_faults(monkeypatch):
    """``worker_faults(spec)``: the fault plan of the age-up workers the daemon starts from now on."""
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.reset()
    faults.point("swap")  # this process reads its (empty) plan now, so only the workers see the one set below

    def set_plan(spec: str | None) -> None:
        if spec is None:
            monkeypatch.delenv(faults.ENV, raising=False)
        else:
            monkeypatch.setenv(faults.ENV, spec)

    yield set_plan
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.reset()


def test_enospc_at_each_write_of_an_age_up_fails_it_clearly_and_the_retry_finishes(daemon, worker_faults, tally):
    daemon.dcfg.retry_after_s, daemon.dcfg.max_attempts = 0.2, 6
    daemon.intake.karma.threshold = 1
    assert daemon.add_karma(1, "good answer", None).triggered is not None
    attempts = [("ledger_append=enospc@1", "disk full · ledger append (injected)", "data"),
                ("checkpoint_save=enospc@1", "disk full · checkpoint save (injected)", "train"),
                ("gguf_export=enospc@1", "disk full · GGUF export (injected)", "gguf_f16")]
    for n, (spec, area, stage) in enumerate(attempts, start=1):
        with tally.fault(area):
            worker_faults(spec)
            tick_until(daemon, lambda n=n: _request(daemon).attempts == n, f"attempt {n} to fail")
            req = _request(daemon)
            assert req.status == "pending", req
            _says_disk_full(req.outcome)
            assert f"the {stage} stage" in req.outcome or stage == "data", req.outcome
            _says_disk_full(daemon.status()["last_error"])
            assert daemon.status()["ageup"]["progress"]["state"] == "failed"
            _parent_still_serves(daemon, tally, area)
            if stage == "train":  # the checkpoint being saved never got its COMPLETE marker: it will not count
                work = daemon.root.staging_dir(CHILD) / "work"
                assert [c for c in work.glob("*/checkpoint-*") if not (c / "COMPLETE").is_file()]

    # The child is finished and moved into place; the worker cannot record it. The daemon can.
    with tally.fault("disk full · ledger append (injected)"):
        worker_faults("ledger_append=enospc@1")
        tick_until(daemon, lambda: _request(daemon).status == "done", "the request to finish")
        assert _request(daemon).gen == CHILD and _request(daemon).attempts == 3
        assert daemon.host.current.gen == CHILD and daemon.ledger.served_generation() == CHILD
        kinds = [e.kind for e in daemon.ledger.entries(gen=CHILD)]
        assert kinds.count(ev.EXPORTED) == kinds.count(ev.PROMOTED) == kinds.count(ev.GENERATION_CREATED) == 1
        assert daemon.root.generations() == [0, 1, CHILD] and not daemon.root.partial_generations()
        assert daemon.ledger.verify().ok


def test_a_really_full_disk_under_the_data_root(lineage, small_disk, monkeypatch, tally):
    src, cfg = lineage
    disk = small_disk("160m")
    root = DataRoot(copy_root(src.root, disk / "root"))
    monkeypatch.setenv("EVOLUTION_HOME", str(root.root))
    d = Daemon(root, cfg, DaemonConfig(api_token=SERVER_TOKEN, threshold=1, retry_after_s=3.0, max_attempts=6))
    d.prepare()
    try:
        filler = fill(disk, leave=6 << 20)  # room for the data and a checkpoint or two; not for the merged weights
        with tally.fault("disk full · age-up (tmpfs)"):
            assert d.add_karma(1, "good answer", None).triggered is not None
            # On a disk this full the daemon may not even record the retry: /status says what is wrong.
            tick_until(d, lambda: "the disk is full" in (d.status()["last_error"] or ""), "the age-up to fail")
            _says_disk_full(d.status()["last_error"])
            print("what the daemon said:", d.status()["last_error"].splitlines()[-1])
            _parent_still_serves(d, tally, "disk full · age-up (tmpfs)")
            filler.unlink()  # space freed: nobody touches the daemon, it retries by itself
            tick_until(d, lambda: _request(d).status == "done", "the retry to finish")
            assert d.host.current.gen == CHILD and d.ledger.served_generation() == CHILD
            assert d.ledger.verify().ok
            assert shutil.disk_usage(disk).free > 0
    finally:
        d.stop()


# -- a full disk while served chats are captured --------------------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "What is your name?"}], "max_tokens": 4}


@pytest.fixture
def capture_faults(monkeypatch):
    """``capture_faults(spec)``: this process's fault plan from now on (None: space freed)."""
    def set_plan(spec: str | None) -> None:
        if spec is None:
            monkeypatch.delenv(faults.ENV, raising=False)
        else:
            monkeypatch.setenv(faults.ENV, spec)
        faults.reset()

    yield set_plan
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.reset()


def _kept(daemon: Daemon) -> list[dict]:
    with daemon.ledger.reading() as conn:
        return [dict(r._mapping) for r in conn.execute(text("SELECT * FROM experiences ORDER BY id"))]


def _chat(client, stream: bool = False) -> tuple[str, str]:
    """One chat that must be answered in full: (completion id, reply)."""
    r = client.post("/v1/chat/completions", json=CHAT | {"stream": stream})
    assert r.status_code == 200, r.text[:500]
    if not stream:
        return r.json()["id"], r.json()["choices"][0]["message"]["content"]
    assert r.text.rstrip().endswith("data: [DONE]"), r.text[-500:]
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert not any("error" in c for c in chunks), chunks
    return chunks[0]["id"], "".join((c["choices"][0].get("delta") or {}).get("content") or "" for c in chunks)


def _nothing_half_written(daemon: Daemon, served: dict[str, str]) -> int:
    """Every kept experience is a chat served, whole and kept once; returns how many were kept."""
    rows = _kept(daemon)
    ids = [r["completion_id"] for r in rows]
    assert len(ids) == len(set(ids)) and set(ids) <= set(served), ids
    for r in rows:
        assert json.loads(r["messages"]) == CHAT["messages"] and r["reply"] == served[r["completion_id"]], r
    with daemon.ledger.reading() as conn:
        assert conn.execute(text("PRAGMA integrity_check")).scalar_one() == "ok"
    report = daemon.ledger.verify()
    assert report.ok, report.problems
    return len(rows)


def test_enospc_at_capture_keeps_the_chat_answering_counts_the_loss_and_resumes(client, daemon, capture_faults,
                                                                                tally):
    area = "disk full · capture (injected)"
    served: dict[str, str] = {}
    with tally.fault(area, 2):
        capture_faults("capture=enospc")
        for stream in (False, True):  # each answered in full; neither kept
            cid, reply = _chat(client, stream)
            assert reply
            served[cid] = reply
        exp = client.get("/status").json()["experiences"]
        assert exp["capture_failures"] == 2 and exp["experiences"] == 0, exp
        assert "the disk is full" in exp["last_capture_failure"], exp
        capture_faults(None)  # space freed
        for stream in (False, True):
            cid, reply = _chat(client, stream)
            served[cid] = reply
        kept = _nothing_half_written(daemon, served)
        tally.lost(area, 2 - kept)
        assert [r["completion_id"] for r in _kept(daemon)] == list(served)[2:]
        assert client.get("/status").json()["experiences"]["capture_failures"] == 2


def test_a_really_full_disk_under_the_ledger_during_capture(lineage, tmp_path, monkeypatch, tally):
    area = "disk full · capture (tmpfs)"
    src, cfg = lineage
    root = DataRoot(copy_root(src.root, tmp_path / "root"))
    saved = tmp_path / "ledger-files"
    shutil.move(root.ledger_dir, saved)
    disk = tmpfs(root.ledger_dir, "8m")
    try:
        for f in saved.iterdir():
            shutil.copy2(f, disk / f.name)
        monkeypatch.setenv("EVOLUTION_HOME", str(root.root))
        d = Daemon(root, cfg, DaemonConfig(api_token=SERVER_TOKEN, threshold=1000))
        d.prepare()
        try:
            with TestClient(create_app(d)) as client, tally.fault(area):
                served: dict[str, str] = {}
                for i in range(3):
                    cid, served[cid] = _chat(client, i % 2 == 1)
                assert len(_kept(d)) == 3
                filler = fill(disk)
                n = 0
                while client.get("/status").json()["experiences"]["capture_failures"] == 0:
                    assert n < 300, "the filled disk never refused a capture"
                    cid, served[cid] = _chat(client, n % 2 == 1)  # answered in full, kept or not
                    n += 1
                for i in range(4):  # still full: still answered, each loss counted
                    cid, served[cid] = _chat(client, i % 2 == 1)
                exp = client.get("/status").json()["experiences"]
                print(f"{n} capture(s) fit after the fill; then: {exp['last_capture_failure']}")
                assert "the disk is full" in exp["last_capture_failure"] and str(disk) in exp["last_capture_failure"]
                failures = exp["capture_failures"]
                assert failures >= 5
                filler.unlink()  # space freed: the next chats are kept again
                resumed = []
                for i in range(2):
                    cid, served[cid] = _chat(client, i % 2 == 1)
                    resumed.append(cid)
                kept = _nothing_half_written(d, served)
                tally.lost(area, len(served) - failures - kept)
                assert kept == len(served) - failures
                assert [r["completion_id"] for r in _kept(d)][-2:] == resumed
                assert client.get("/status").json()["experiences"]["capture_failures"] == failures
        finally:
            d.stop()
    finally:
        umount(disk)
