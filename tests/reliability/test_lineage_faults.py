"""kill -9 and tampering with two lineages on one ledger: karma exact per lineage, one chain vouching for both.

A child process grants karma to lineage ``main`` or ``deacon`` (alternating by trial) until
``EVOLUTION_FAULTS`` kills it at an append or a commit; the unanswered grant is sent again with its
key, and each lineage's total must match its own acknowledged grants to the unit. Then a row of one
lineage is edited: the chain they share no longer verifies, so neither lineage serves or rolls back
on the ledger's word until it is restored.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import pytest

from evolution import faults
from evolution.errors import IntegrityError
from evolution.intake.karma import DONE, Karma
from evolution.ledger import Ledger, check_servable
from evolution.paths import LINEAGE_ENV, DataRoot
from tests.ledger.conftest import add_generation, tamper_sqlite
from tests.reliability.test_ledger_faults import GRANTER

TRIALS = 8
SEED = 19


def test_kill_9_at_ledger_writes_of_two_lineages_keeps_each_lineages_karma_exact(_isolated_home, tally, monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    rng = random.Random(SEED)
    keys: dict[str, set[str]] = {"main": set(), "deacon": set()}
    for trial in range(TRIALS):
        point, lineage = ("ledger_append", "ledger_commit")[trial % 2], ("main", "deacon")[trial // 2 % 2]
        hit = rng.randint(1, 6)
        area = f"kill -9 · ledger {point.split('_')[1]} (two lineages)"
        with tally.fault(area):
            proc = subprocess.run([sys.executable, "-c", GRANTER, f"t{trial}", "10"], capture_output=True, text=True,
                                  timeout=120, check=False,
                                  env=os.environ | {faults.ENV: f"{point}=kill@{hit}", LINEAGE_ENV: lineage})
            assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
            said = [line.split() for line in proc.stdout.splitlines()]
            acked = [k for verb, k in said if verb == "ack"]
            [unanswered] = [k for verb, k in said if verb == "try" and k not in acked]
            keys[lineage].update(acked)
            with Ledger.open(DataRoot(_isolated_home, lineage)) as led:
                karma = Karma(led, threshold=1)
                retry = karma.add(1, reason="kill trial", key=unanswered, source="test")
                assert retry.duplicate is (point == "ledger_commit")
                karma.mark(retry.triggered.id, DONE)
                keys[lineage].add(unanswered)
                for name, mine in keys.items():
                    k = Karma(led.view(name), threshold=1)
                    tally.lost(area, int(abs(len(mine) - k.state().total)))
                    assert k.state().total == len(mine) == len(k.requests())
                report = led.verify()
                assert report.ok, report.problems
    assert keys["main"] and keys["deacon"]


@pytest.mark.parametrize("how", ["moved to the other lineage", "payload edited"])
def test_a_tampered_entry_of_one_lineage_stops_both_from_trusting_the_ledger(_isolated_home, how, tally):
    root = DataRoot(_isolated_home).prepare()
    deacon_root = root.for_lineage("deacon").prepare()
    with Ledger.open(root) as led:
        deacon = led.view("deacon")
        for gen, parent, verdict in ((0, None, None), (1, 0, "pass")):
            add_generation(led, root, gen, parent, verdict)
            add_generation(deacon, deacon_root, gen, parent, verdict)
        assert check_servable(led, 0) and check_servable(deacon, 0)
        target = deacon.entries(kind="gate_result")[-1].seq
        change = ("lineage = 'main'" if how == "moved to the other lineage"
                  else "payload = replace(payload, '\"pass\"', '\"fail\"')")
        tamper_sqlite(root.ledger_dir / "ledger.db", f"UPDATE ledger_entries SET {change} WHERE seq = {target}")
        with tally.fault(f"tamper · ledger entry of another lineage ({how})"):
            report = led.verify()
            assert [(p.seq, p.what) for p in report.problems] == [(target, "edited")]
            for view in (led, deacon):
                with pytest.raises(IntegrityError, match="does not verify"):
                    check_servable(view, 0)
