"""A full disk during an age-up: the attempt fails saying so, the parent keeps serving, and once
space is freed the daemon retries and finishes on its own.

Two ways to fill the disk: ``EVOLUTION_FAULTS`` raising ENOSPC at a named point of the age-up
worker (each attempt a different one: a ledger append, a checkpoint save, the GGUF export, the
ledger append after the child is finished), and a real size-limited filesystem (tmpfs) under the
whole data root, filled to the brim and then emptied. The daemon runs in this process and ticks
its scheduler by hand; its workers are real processes.
"""

from __future__ import annotations

import shutil

import pytest

from evolution import faults
from evolution.config import DaemonConfig
from evolution.daemon import Daemon
from evolution.ledger import events as ev
from evolution.paths import DataRoot
from tests.conftest import SERVER_TOKEN
from tests.daemon_util import tick_until
from tests.reliability.conftest import copy_root, fill

pytestmark = pytest.mark.slow

CHILD = 2  # the lineage serves 1


def _request(daemon: Daemon):
    return daemon.karma.requests()[-1]


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
    daemon.karma.threshold = 1
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
