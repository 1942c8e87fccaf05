"""Retrieval's index under faults: ``kill -9`` of the daemon while it writes the index, and a full disk there.

The index is derived data (``evolution.retrieval``): what the user taught is committed to the ledger's database
before the index is written, so a crash or a full disk mid-write loses no lesson; chats are answered meanwhile
(without notes, or from the previous index), and the index is rebuilt once the daemon runs again or space is back.
"""

from __future__ import annotations

import httpx
import pytest
from starlette.testclient import TestClient

from evolution import faults
from evolution.intake import Intake
from evolution.ledger import Ledger
from evolution.paths import DataRoot
from evolution.server import create_app
from tests.conftest import SERVER_TOKEN
from tests.daemon_util import DaemonProc

pytestmark = pytest.mark.slow

LESSON = [{"role": "user", "content": "Where do I keep my spare key?"},
          {"role": "assistant", "content": "Your spare key is under the blue flowerpot."}]
ASK = {"messages": [{"role": "user", "content": "Where is my spare key kept?"}], "max_tokens": 8, "temperature": 0}


def test_kill_9_while_the_index_is_written_loses_no_lesson_and_the_restart_rebuilds_it(taught_base, _isolated_home,
                                                                                        monkeypatch):
    # the first write is at start (an empty index), the second after the posted transcript
    monkeypatch.setenv(faults.ENV, "retrieval_index=kill@2")
    args = ("--start-gen", "0", "--base", str(taught_base), "--threshold", "1000")
    d = DaemonProc(_isolated_home, *args).start()
    try:
        d.wait_serving(0, 300)
        with pytest.raises(httpx.TransportError):  # the daemon dies answering it
            httpx.post(d.url + "/conversations", headers=d.auth(), json={"messages": LESSON}, timeout=60)
        d.proc.wait(30)
    finally:
        d.stop()
    assert d.proc.returncode == -9
    root = DataRoot(_isolated_home)
    with Ledger.open(root) as ledger:
        assert [m for _, m in Intake(ledger).conversations.after(0)] == [LESSON]  # committed before the index
        assert ledger.verify().ok
    monkeypatch.delenv(faults.ENV)
    d2 = DaemonProc(_isolated_home, *args, port=d.port).start()
    try:
        d2.wait_serving(0, 120)
        r = httpx.post(d2.url + "/v1/chat/completions", json=ASK, timeout=60)
        assert r.status_code == 200 and r.headers["x-evolution-notes"] == "1"
    finally:
        assert d2.stop() == 0
    assert not (root.home / "index" / "retrieval.sqlite.tmp").exists()


def test_a_full_disk_while_the_index_is_written_keeps_chat_up_and_catches_up_after(daemon, monkeypatch):
    monkeypatch.setenv(faults.ENV, "retrieval_index=enospc")
    faults.reset()
    try:
        with TestClient(create_app(daemon)) as client:
            auth = {"Authorization": f"Bearer {SERVER_TOKEN}"}
            assert client.post("/conversations", json={"messages": LESSON}, headers=auth).status_code == 201
            assert daemon.retrieval.counts["errors"] >= 1
            r = client.post("/v1/chat/completions", json=ASK)
            assert r.status_code == 200 and r.headers["X-Evolution-Notes"] == "0"  # answered, from the old index
            assert not (daemon.retrieval.index.path.parent / "retrieval.sqlite.tmp").exists()
            monkeypatch.delenv(faults.ENV)
            faults.reset()
            daemon.tick()  # space again
            r = client.post("/v1/chat/completions", json=ASK)
            assert r.status_code == 200 and r.headers["X-Evolution-Notes"] == "1"
    finally:
        monkeypatch.delenv(faults.ENV, raising=False)
        faults.reset()
