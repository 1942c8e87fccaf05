"""Tamper evidence: verify finds each kind of damage at the right seq (SQLite and PostgreSQL).

The damage is done through a raw connection with the append-only triggers out of the way, as
someone with write access to the database file (or the table owner) could.
"""

from __future__ import annotations

import json

import pytest

from evolution.errors import LedgerError
from evolution.ledger import events
from evolution.ledger.chain import GENESIS, entry_hash


def _kinds(report):
    return [(p.seq, p.what) for p in report.problems]


def _exported_seq(led, gen: int) -> int:
    return next(e.seq for e in led.entries(gen=gen, kind=events.EXPORTED))


def test_intact_ledger_verifies(lineage):
    r = lineage.verify()
    assert r.ok, r.problems
    assert r.entries == r.last_seq == r.head.seq == len(lineage.entries())
    assert r.artifacts_checked == 4 and r.first_bad_seq is None


def test_edited_payload_is_caught_at_its_seq(lineage, tamper):
    seq = next(e.seq for e in lineage.entries(kind=events.GATE_RESULT) if e.gen == 2)
    tamper(f"UPDATE ledger_entries SET payload = replace(payload, '\"fail\"', '\"pass\"') WHERE seq = {seq}")
    assert lineage.entries()[seq - 1].payload["verdict"] == "pass"
    r = lineage.verify()
    assert not r.ok and r.first_bad_seq == seq
    assert _kinds(r) == [(seq, "edited")]


def test_edited_gen_column_is_caught(lineage, tamper):
    tamper("UPDATE ledger_entries SET gen = 5 WHERE seq = 4")
    assert _kinds(lineage.verify()) == [(4, "edited")]


def test_payload_that_is_no_json_is_caught(lineage, tamper):
    tamper("UPDATE ledger_entries SET payload = 'garbage' WHERE seq = 6")
    assert _kinds(lineage.verify(artifacts=False)) == [(6, "edited")]
    with pytest.raises(LedgerError, match="seq 6 .* not JSON; run `evolve ledger verify`"):
        lineage.history()


def test_deleted_middle_entry_is_caught(lineage, tamper):
    tamper("DELETE FROM ledger_entries WHERE seq = 5")
    r = lineage.verify()
    assert r.first_bad_seq == 5
    assert _kinds(r) == [(5, "missing")]


def test_reordered_entries_are_caught(lineage, tamper):
    tamper(
        "UPDATE ledger_entries SET seq = 1000 WHERE seq = 7",
        "UPDATE ledger_entries SET seq = 7 WHERE seq = 8",
        "UPDATE ledger_entries SET seq = 8 WHERE seq = 1000",
    )
    r = lineage.verify()
    assert r.first_bad_seq == 7
    assert _kinds(r) == [(7, "reordered"), (8, "reordered")]
    assert "written as seq 8" in r.problems[0].message


def test_truncated_tail_is_caught_by_the_exported_head(lineage, tamper):
    last = lineage.last().seq
    tamper(f"DELETE FROM ledger_entries WHERE seq > {last - 3}")
    r = lineage.verify()
    assert r.first_bad_seq == last - 2
    assert _kinds(r) == [(last - 2, "truncated")]
    assert f"seq {last}" in r.problems[0].message


def test_rewritten_entry_with_recomputed_hashes_is_caught(lineage, tamper):
    """The attacker re-hashes the edited entry; the next link breaks."""
    e = lineage.entries()[2]
    payload = {**e.payload, "steps": 99999}
    new_hash = entry_hash(e.prev_hash, e.seq, e.time, e.kind, e.gen, payload)
    tamper(f"UPDATE ledger_entries SET payload = '{json.dumps(payload)}', entry_hash = '{new_hash}' WHERE seq = 3")
    assert _kinds(lineage.verify()) == [(4, "broken_link")]


def test_history_rewritten_wholesale_is_caught_by_the_head(lineage, tamper):
    """A fully consistent forged chain of the same length only differs from the head."""
    rows = lineage.entries()
    prev, statements = GENESIS, ["DELETE FROM ledger_entries"]
    for e in rows:
        payload = {**e.payload, "forged": True}
        h = entry_hash(prev, e.seq, e.time, e.kind, e.gen, payload)
        gen = "NULL" if e.gen is None else e.gen
        statements.append(
            "INSERT INTO ledger_entries (seq, time, kind, gen, payload, prev_hash, entry_hash) VALUES "
            f"({e.seq}, '{e.time}', '{e.kind}', {gen}, '{json.dumps(payload)}', '{prev}', '{h}')"
        )
        prev = h
    tamper(*statements)
    r = lineage.verify()
    assert _kinds(r) == [(len(rows), "rewritten")]


def test_swapped_gguf_is_caught_at_its_exported_entry(lineage, data_root):
    p = data_root.gen_dir(3) / "model.gguf"
    p.write_bytes(b"a different model")
    r = lineage.verify()
    assert _kinds(r) == [(_exported_seq(lineage, 3), "artifact_changed")]
    assert "gen_0003/model.gguf" in r.problems[0].message
    assert lineage.verify(artifacts=False).ok


def test_missing_gguf_is_a_problem_unless_the_generation_was_rejected(lineage, data_root):
    (data_root.gen_dir(2) / "model.gguf").unlink()  # rejected: pruning is allowed
    r = lineage.verify()
    assert r.ok and any("gen_0002" in w for w in r.warnings)
    (data_root.gen_dir(1) / "model.gguf").unlink()
    assert _kinds(lineage.verify()) == [(_exported_seq(lineage, 1), "artifact_missing")]


def test_missing_head_is_a_problem_and_can_be_rewritten(lineage):
    lineage.head_path.unlink()
    r = lineage.verify()
    assert _kinds(r) == [(None, "head_missing")] and r.first_bad_seq is None
    lineage.export_head()
    assert lineage.verify().ok


def test_damaged_head_is_a_problem(lineage):
    lineage.head_path.write_text("{not json")
    assert _kinds(lineage.verify()) == [(None, "head_unreadable")]


def test_a_backup_head_anchors_verify(lineage, tmp_path, tamper):
    backup = tmp_path / "HEAD.backup.json"
    backup.write_text(lineage.head_path.read_text())
    last = lineage.last().seq
    tamper(f"DELETE FROM ledger_entries WHERE seq = {last}")
    lineage.head_path.unlink()  # the attacker removed the local head too
    r = lineage.verify(head=backup)
    assert _kinds(r) == [(last, "truncated")]


def test_head_never_moves_backwards(ledger):
    from evolution.ledger.head import Head, read_head, write_head

    ledger.record(events.promoted(0))
    ledger.record(events.promoted(0))
    assert write_head(ledger.head_path, Head(1, "x" * 64, ledger.url)) is False
    assert read_head(ledger.head_path).seq == 2


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_ledgers_verify(ledger, n):
    for _ in range(n):
        ledger.record(events.promoted(0))
    assert ledger.verify().ok
