"""kill -9 and a full disk during ``evolve backup``, and a restore from a backup taken mid-age-up.

The source is a data root with four generations (stand-in GGUFs, a real ledger). ``evolve backup``
runs as its own process with ``EVOLUTION_FAULTS`` killing it, or raising ENOSPC, at the
``backup_copy`` point: after the ledger snapshot and after each file copied. After every fault:

- the destination does not exist (a backup is whole or absent), and an ENOSPC leaves nothing at all;
- the source is untouched: every file and every ledger entry as before, and ``ledger verify`` passes;
- the next backup to the same destination succeeds, removes what the killed one left, and restores to
  a root that verifies.

A real size-limited filesystem (tmpfs) too small for the backup gives the same clear error.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from evolution import backup as bk
from evolution.fsutil import sha256_tree
from evolution.ledger import Ledger, events
from evolution.paths import DataRoot
from tests.ledger.conftest import add_generation
from tests.reliability.conftest import evolve


@pytest.fixture
def source(tmp_path) -> DataRoot:
    root = DataRoot(tmp_path / "source")
    with Ledger.open(root.prepare()) as led:
        add_generation(led, root, 0, None, None)
        add_generation(led, root, 1, 0, "pass")
        add_generation(led, root, 2, 1, "fail", {"recall": 0.3, "generalization": 0.5, "style_drift": 0.4})
        add_generation(led, root, 3, 1, "pass")
        for n in range(4):  # more files per generation: more places to die
            (root.gen_dir(n) / "eval.json").write_text('{"metrics": {}}\n')
            (root.gen_dir(n) / "data").mkdir()
            (root.gen_dir(n) / "data" / "sft.jsonl").write_text('{"messages": []}\n' * 50)
    return root


def _state(root: DataRoot) -> tuple[dict, list]:
    with Ledger.open(root) as led:
        report = led.verify()
        assert report.ok, report.problems
        return sha256_tree(root.checkpoints), [(e.seq, e.entry_hash) for e in led.entries()]


def _restores_clean(dest: Path, to: Path) -> None:
    r = bk.restore(dest, DataRoot(to))
    assert r.served == 3
    with Ledger.open(DataRoot(to)) as led:
        report = led.verify()
        assert report.ok and report.artifacts_checked == 4, report.problems


def test_kill_9_during_a_backup_leaves_no_destination_and_the_source_untouched(source, tmp_path, tally):
    before = _state(source)
    files = 1 + 4 * 4  # the ledger snapshot, then each generation's files
    for i, nth in enumerate((1, 2, files // 2, files - 1, files)):
        dest = tmp_path / "backups" / "nightly"
        with tally.fault("kill -9 · backup"):
            r = evolve(source, "backup", str(dest), spec=f"backup_copy=kill@{nth}")
            assert r.returncode == -9, r.stdout + r.stderr
            tally.lost("kill -9 · backup", int(_state(source) != before))
            assert not dest.exists()
            assert _state(source) == before
            r = evolve(source, "backup", str(dest))
            assert r.returncode == 0, r.stdout + r.stderr
            assert not list(dest.parent.glob(".nightly.partial-*"))  # the killed one's folder is gone
            _restores_clean(dest, tmp_path / f"restored{i}")
        os.rename(dest, tmp_path / f"done{i}")


def test_a_full_disk_during_a_backup_says_so_and_writes_nothing(source, tmp_path, tally, small_disk):
    before = _state(source)
    for nth in (1, 3, 9):
        dest = tmp_path / f"bk{nth}"
        with tally.fault("disk full · backup (injected)"):
            r = evolve(source, "backup", str(dest), spec=f"backup_copy=enospc@{nth}")
            assert r.returncode == 1 and "the disk is full" in r.stderr and "the data root is untouched" in r.stderr, \
                r.stderr
            assert not dest.exists() and not list(tmp_path.glob(f".bk{nth}.partial-*"))
            assert _state(source) == before

    disk = small_disk("64k")  # the four stand-in generations and the ledger need more
    with tally.fault("disk full · backup (tmpfs)"):
        r = evolve(source, "backup", str(disk / "bk"))
        assert r.returncode == 1 and "the disk is full" in r.stderr, r.stderr
        assert sorted(p.name for p in disk.iterdir()) == []
        assert _state(source) == before


def test_a_restore_from_a_backup_taken_mid_age_up_verifies_and_serves_the_parent(source, tmp_path, tally):
    with Ledger.open(source) as led:  # generation 4 is being built: created, training, a staging folder
        led.record(events.generation_created(4, 3, "SmolLM2-135M-Instruct", "cfg4", "man4", config={}, manifest={}))
        led.record(events.training_started(4))
    (source.staging_dir(4) / "work").mkdir(parents=True)
    (source.staging_dir(4) / "work" / "checkpoint-2.bin").write_bytes(b"half a model")
    tally.trial("restore · backup taken mid-age-up")
    bk.backup(source, tmp_path / "bk")
    new = DataRoot(tmp_path / "new")
    r = bk.restore(tmp_path / "bk", new)
    assert r.served == 3 and not new.partial_generations() and new.generations() == [0, 1, 2, 3]
    with Ledger.open(new) as led, Ledger.open(source) as old:
        report = led.verify()
        tally.lost("restore · backup taken mid-age-up", len(report.problems))
        assert report.ok, report.problems
        assert [e.entry_hash for e in led.entries()] == [e.entry_hash for e in old.entries()]
