"""kill -9 and a full disk at a ledger append: no karma lost or counted twice, the chain verifies.

Karma grants are the ledger's busiest writers: with a threshold of 1 every grant opens an age-up
request and appends a ``karma_threshold_crossed`` entry, all in one transaction. A child process
grants karma until ``EVOLUTION_FAULTS`` kills it at a random append (before its commit) or
commit (before the exported head is written); the test then does what a client does after a
dropped connection — sends the unanswered grant again with the same idempotency key — and
checks the totals to the unit.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import pytest
from sqlalchemy import text

from evolution import faults
from evolution.errors import DiskFull
from evolution.intake.karma import DONE, Karma
from evolution.ledger import KARMA_THRESHOLD_CROSSED, Ledger
from evolution.paths import DataRoot
from tests.conftest import SERVER_TOKEN
from tests.reliability.conftest import fill

GRANTER = """
import sys
from evolution.intake.karma import DONE, Karma
from evolution.ledger import Ledger
from evolution.paths import DataRoot

trial, n = sys.argv[1], int(sys.argv[2])
with Ledger.open(DataRoot.from_env()) as ledger:
    karma = Karma(ledger, threshold=1)
    for j in range(n):
        key = f"{trial}-{j}"
        print("try", key, flush=True)
        grant = karma.add(1, reason="kill trial", key=key, source="test")
        karma.mark(grant.triggered.id, DONE)
        print("ack", key, flush=True)
"""
TRIALS = 40  # 20 per point; ~0.2 s each
SEED = 6


@pytest.fixture
def fresh_faults(monkeypatch):
    """``set_faults(spec)`` for this process (the hook reads the variable once; this makes it read again)."""
    def set_faults(spec: str | None) -> None:
        if spec is None:
            monkeypatch.delenv(faults.ENV, raising=False)
        else:
            monkeypatch.setenv(faults.ENV, spec)
        faults.reset()

    yield set_faults
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.reset()


def _count(led: Ledger, sql: str) -> int:
    with led.reading() as conn:
        return conn.execute(text(sql)).scalar_one()


def test_kill_9_at_random_ledger_appends_loses_no_karma_and_counts_none_twice(_isolated_home, tally, monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    root = DataRoot(_isolated_home)
    rng = random.Random(SEED)
    keys: set[str] = set()
    for trial in range(TRIALS):
        point = ("ledger_append", "ledger_commit")[trial % 2]
        hit = rng.randint(1, 6)
        area = f"kill -9 · ledger {point.split('_')[1]}"
        with tally.fault(area):
            proc = subprocess.run([sys.executable, "-c", GRANTER, f"t{trial}", "10"], capture_output=True, text=True,
                                  timeout=120, check=False, env=os.environ | {faults.ENV: f"{point}=kill@{hit}"})
            assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
            said = [line.split() for line in proc.stdout.splitlines()]
            acked = [k for verb, k in said if verb == "ack"]
            [unanswered] = [k for verb, k in said if verb == "try" and k not in acked]
            assert len(acked) == hit - 1
            keys.update(acked)
            with Ledger.open(root) as led:
                karma = Karma(led, threshold=1)
                retry = karma.add(1, reason="kill trial", key=unanswered, source="test")  # the client tries again
                assert retry.duplicate is (point == "ledger_commit")  # committed before the kill: counted once
                karma.mark(retry.triggered.id, DONE)
                keys.add(unanswered)
                total = karma.state().total
                tally.lost(area, int(len(keys) - total))
                assert total == len(keys)
                assert _count(led, "SELECT COUNT(*) FROM karma_events") == len(keys)
                assert len(led.entries(kind=KARMA_THRESHOLD_CROSSED)) == len(keys) == len(karma.requests())
                report = led.verify()
                assert report.ok, report.problems
                assert report.head.seq <= report.last_seq  # the head may lag a crash, never lead


def test_a_full_disk_at_a_ledger_append_records_nothing_and_says_what_to_do(ledger, fresh_faults, tally):
    karma = Karma(ledger, threshold=2)
    karma.add(1, key="a")
    with tally.fault("disk full · ledger append (injected)"):
        fresh_faults("ledger_append=enospc")
        with pytest.raises(DiskFull, match=r"the disk is full: could not write to the ledger .*Free some space"):
            karma.add(1, key="b")  # would cross the threshold: grant, request and ledger entry in one transaction
        state = karma.state()
        assert (state.total, state.open_request, karma.requests()) == (1.0, None, [])
        fresh_faults(None)  # space freed
        assert karma.add(1, key="b").triggered is not None
        assert karma.state().total == 2 and len(ledger.entries(kind=KARMA_THRESHOLD_CROSSED)) == 1
        assert ledger.verify().ok


def test_a_full_disk_after_the_commit_reports_success_and_the_head_only_lags(ledger, fresh_faults, tally):
    karma = Karma(ledger, threshold=1)
    karma.mark(karma.add(1, key="a").triggered.id, DONE)
    with tally.fault("disk full · ledger head (injected)"):
        fresh_faults("ledger_commit=enospc")  # the head file cannot be written; the grant is committed
        grant = karma.add(1, key="b")
        assert grant.triggered is not None and not grant.duplicate  # a caller told "failed" would retry it
        fresh_faults(None)
        assert karma.add(1, key="b").duplicate and karma.state().total == 2
        report = ledger.verify()
        assert report.ok, report.problems
        assert (report.head.seq, report.last_seq) == (1, 2) and "past the exported head" in report.warnings[0]


def test_a_really_full_disk_under_the_ledger(small_disk, tally, monkeypatch):
    disk = small_disk("8m")
    monkeypatch.setenv("EVOLUTION_HOME", str(disk))
    root = DataRoot(disk).prepare()
    with tally.fault("disk full · ledger append (tmpfs)"), Ledger.open(root) as led:
        karma = Karma(led, threshold=3)
        for i in range(4):
            karma.add(1, key=f"k{i}")
        filler = fill(disk)
        refused = 0
        for i in range(4, 40):  # until SQLite finds no page to grow into
            try:
                karma.add(1, key=f"k{i}")
            except DiskFull as exc:
                assert "Free some space" in str(exc) and str(disk) in str(exc), exc
                refused = i
                break
        assert refused, "the filled disk never refused a write"
        before = karma.state().total
        filler.unlink()  # space freed: the same grant goes through, once
        karma.add(1, key=f"k{refused}")
        total = karma.state().total
        tally.lost("disk full · ledger append (tmpfs)", int(refused + 1 - total))
        assert before == refused and total == refused + 1
        assert _count(led, "SELECT COUNT(*) FROM karma_events") == refused + 1
        report = led.verify()
        assert report.ok, report.problems


def test_over_http_a_full_disk_is_a_507_and_the_served_model_stays(client, daemon, fresh_faults, tally):
    auth = {"Authorization": f"Bearer {SERVER_TOKEN}"}
    with tally.fault("disk full · ledger append (injected)"):
        fresh_faults("ledger_append=enospc")
        r = client.post("/rollback", json={"to": 0}, headers=auth)
        assert r.status_code == 507 and "disk is full" in r.json()["error"]["message"], r.text
        assert daemon.host.current.gen == 1 and daemon.ledger.served_generation() == 1
        assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                         "max_tokens": 4}).status_code == 200
        fresh_faults(None)
        assert client.post("/rollback", json={"to": 0}, headers=auth).status_code == 200
        assert daemon.host.current.gen == 0 and daemon.ledger.served_generation() == 0
