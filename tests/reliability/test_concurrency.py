"""Concurrency at full scale: 8 writer processes × 1,000 karma grants, and chat during repeated swaps.

Writers are separate processes (what several agents, the CLI and the daemon are), each with
its own connections; on SQLite they contend for the database file's lock. The total must come
out exact and no writer may see "database is locked". PostgreSQL too when
``EVOLUTION_TEST_PG_URL`` is set (``tests/ledger/conftest.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from evolution.karma import Karma
from evolution.ledger import KARMA_THRESHOLD_CROSSED, Ledger
from evolution.ledger import events as ev
from tests.conftest import SERVER_TOKEN
from tests.daemon_util import Chatter, serving
from tests.ledger.conftest import backend, data_root, ledger_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow

WRITERS, GRANTS, THRESHOLD = 8, 1000, 1000
WRITER = """
import sys, time
from pathlib import Path
from evolution.karma import Karma
from evolution.ledger import Ledger
from evolution.paths import DataRoot

i, grants, threshold, url, go = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], Path(sys.argv[5])
with Ledger.open(DataRoot.from_env(), url or None) as ledger:
    karma = Karma(ledger, threshold=threshold)
    (go.parent / f"ready-{i}").touch()
    while not go.exists():
        time.sleep(0.005)
    for j in range(grants):
        karma.add(1, reason=f"writer {i}", key=f"w{i}-{j}", source="test")
"""


def test_8_writer_processes_x_1000_grants_give_the_exact_total(data_root, ledger_url, tmp_path, tally):  # noqa: F811
    area = "concurrency · karma 8 × 1,000" + (" (PostgreSQL)" if ledger_url else " (SQLite)")
    Ledger.open(data_root, ledger_url).close()  # created and migrated once, before the race
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(i), str(GRANTS), str(THRESHOLD), ledger_url or "",
                               str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=os.environ | {"EVOLUTION_HOME": str(data_root.root)}) for i in range(WRITERS)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("ready-*"))) < WRITERS and time.time() < deadline:
        time.sleep(0.02)
    t0 = time.perf_counter()
    go.touch()
    outs = [p.communicate(timeout=900) for p in procs]
    wall = time.perf_counter() - t0
    errors = [err for p, (_, err) in zip(procs, outs) if p.returncode != 0 or err.strip()]
    with Ledger.open(data_root, ledger_url) as led:
        karma = Karma(led, threshold=THRESHOLD)
        total = karma.state().total
        tally.trial(area)
        tally.lost(area, int(WRITERS * GRANTS - total))
        assert errors == [], errors[0][-2000:]  # in particular no "database is locked"
        assert total == WRITERS * GRANTS
        assert len(karma.requests()) == 1 and len(led.entries(kind=KARMA_THRESHOLD_CROSSED)) == 1
        report = led.verify()
        assert report.ok, report.problems
    print(f"{WRITERS * GRANTS} grants by {WRITERS} processes in {wall:.1f} s")


SWAPS, CLIENTS = 12, 8


def test_many_chat_clients_during_repeated_swaps_never_fail(daemon, tally):
    import httpx

    area = f"concurrency · {CLIENTS} chat clients × {SWAPS} swaps"
    with serving(daemon) as url:
        with Chatter(url, CLIENTS, pause=0.02, max_tokens=6) as chat:
            for k in range(SWAPS):
                to = 0 if k % 2 == 0 else 1  # 1 is served: 0, 1, 0, 1, ...
                r = httpx.post(url + "/rollback", json={"to": to, "reason": f"swap {k}"}, timeout=60,
                               headers={"Authorization": f"Bearer {SERVER_TOKEN}"})
                assert r.status_code == 200, r.text
                after = chat.client.chat.completions.create(model="evolution", max_tokens=2,
                                                            messages=[{"role": "user", "content": "Hi"}])
                assert after.model == f"evolution-gen-{to:04d}"  # new requests reach the new model at once
                tally.trial(area)
                time.sleep(0.3)
        tally.lost(area, len(chat.failures))
        assert chat.failures == [], chat.failures[:3]
        assert set(chat.models) == {"evolution-gen-0000", "evolution-gen-0001"}
        assert len(chat.models) > 4 * SWAPS
        print(f"{len(chat.models)} replies to {CLIENTS} clients during {SWAPS} swaps, none failed")
        assert daemon.host.swaps == SWAPS and daemon.host.current.users == 0
        assert len(daemon.ledger.entries(kind=ev.ROLLED_BACK)) == SWAPS
        assert daemon.ledger.served_generation() == daemon.host.current.gen == 1
        assert daemon.ledger.verify().ok
