"""``rollback --to N``: allowed only to a gated (or base) generation whose GGUF is intact; appends, deletes nothing."""

from __future__ import annotations

import pytest

from evolution.errors import IntegrityError, LedgerError
from evolution.ledger import events, rollback


def test_rollback_to_a_passed_generation(lineage, data_root):
    before = len(lineage.entries())
    files = sorted(p for p in data_root.root.rglob("*") if p.is_file() and "ledger" not in p.parts)
    e = rollback(lineage, 1, "answers got worse")
    assert (e.kind, e.gen, e.payload["from"], e.payload["to"], e.payload["reason"]) == (
        events.ROLLED_BACK, 1, 3, 1, "answers got worse")
    assert e.payload["sha256"] == lineage.generation(1).artifacts[0]["sha256"]
    assert lineage.served_generation() == 1
    assert len(lineage.entries()) == before + 1
    assert sorted(p for p in data_root.root.rglob("*") if p.is_file() and "ledger" not in p.parts) == files
    rows = {r.gen: r for r in lineage.history()}
    assert rows[3].status == "rolled_back" and rows[1].served and not rows[3].served
    assert lineage.verify().ok


def test_rollback_to_the_base_needs_no_gate(lineage):
    rollback(lineage, 0)
    assert lineage.served_generation() == 0


@pytest.mark.parametrize("to, exc, message", [
    (2, LedgerError, "generation 2 failed its gate"),
    (7, LedgerError, "generation 7 is not in the ledger"),
    (3, LedgerError, "already the served generation"),
])
def test_rollback_refusals_append_nothing(lineage, to, exc, message):
    before = lineage.entries()
    with pytest.raises(exc, match=message):
        rollback(lineage, to)
    assert lineage.entries() == before


def test_rollback_to_an_ungated_generation_is_refused(lineage, data_root, gguf_writer):
    gguf = gguf_writer(4, b"untested")
    lineage.record(events.generation_created(4, 3, "base", "c", "m"))
    lineage.record(events.exported(4, [events.artifact(data_root, gguf, "gguf")], "q8_0"))
    with pytest.raises(LedgerError, match="generation 4 has no gate result"):
        rollback(lineage, 4)


def test_rollback_to_a_missing_gguf_is_refused(lineage, data_root):
    (data_root.gen_dir(1) / "model.gguf").unlink()
    before = lineage.entries()
    with pytest.raises(LedgerError, match="GGUF .* is missing; restore it"):
        rollback(lineage, 1)
    assert lineage.entries() == before


def test_rollback_to_a_changed_gguf_is_refused(lineage, data_root):
    (data_root.gen_dir(1) / "model.gguf").write_bytes(b"swapped")
    before = lineage.entries()
    with pytest.raises(IntegrityError, match="not the one that was gated"):
        rollback(lineage, 1)
    assert lineage.entries() == before
