"""kill -9 and a full disk during ``evolve prune``.

The data root is ``tests.retention_util``'s lineage (eight generations of stand-in files, a real
ledger, generation 7 served). ``evolve prune --keep-last 2 --keep-best 1`` runs as its own process
with ``EVOLUTION_FAULTS`` killing it, or raising ENOSPC, at the ``prune`` point (its ``pruned`` event
recorded, before each file it deletes) or at ``ledger_append`` (the event not yet committed). After
every fault:

- nothing is lost: each file an ``exported`` event names is on disk with its hash, or a ``pruned``
  event names it; every generation's ``data/`` and metadata are untouched;
- ``ledger verify`` passes (an interrupted prune is a warning, not a problem);
- the served generation and its GGUF are as before;
- the next ``evolve prune`` finishes the job: the same files as an uninterrupted prune, no warning.

A real size-limited filesystem (tmpfs), filled to the brim, gives the same clear error and loses nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from evolution.fsutil import sha256_file, sha256_tree
from evolution.ledger import Ledger
from evolution.ledger import events as ev
from evolution.paths import DataRoot
from tests.reliability.conftest import evolve, fill
from tests.retention_util import GGUF, build

LOCK = frozenset({".ageup.lock"})  # the prune's lock file: not part of any generation
PRUNE = ("prune", "--keep-last", "2", "--keep-best", "1")
DELETED = 3 + 4 + 1 + 3 + 4  # files the prune deletes: gens 1, 2 (GGUF + sidecar, weights, 2: adapter), 3 (weights), 4, 6


def _source(at: Path) -> DataRoot:
    root = DataRoot(at)
    with Ledger.open(root.prepare()) as led:
        build(root, led)
    return root


def _lost(root: DataRoot, small_before: dict[str, str]) -> list[str]:
    """What the ledger or the kept data lack: recorded files neither on disk as recorded nor pruned, changed
    small files (data/, metadata), a ledger that fails verification, a served GGUF not as recorded."""
    lost = []
    with Ledger.open(root) as led:
        entries = led.entries()
        pruned = ev.pruned_paths((e.seq, e.kind, e.payload) for e in entries)
        for e in entries:
            for a in e.payload["artifacts"] if e.kind == ev.EXPORTED else []:
                p = root.root / a["path"]
                if a["path"] not in pruned and not (p.is_file() and sha256_file(p) == a["sha256"]):
                    lost.append(a["path"])
        report = led.verify()
        lost += [p.message for p in report.problems]
        served = led.served_generation()
        gguf = led.generation(served).gguf
        if served != 7 or sha256_file(root.root / gguf["path"]) != gguf["sha256"]:
            lost.append(f"served generation {served}")
    small = _small_files(root)
    lost += [rel for rel, h in small_before.items() if small.get(rel) != h]
    return lost


def _small_files(root: DataRoot) -> dict[str, str]:
    tree = sha256_tree(root.checkpoints, LOCK)
    return {rel: h for rel, h in tree.items() if not rel.endswith((".gguf", ".safetensors", ".sha256"))}


@pytest.fixture
def expected(tmp_path) -> dict[str, str]:
    """The checkpoints tree after an uninterrupted prune of the same lineage."""
    root = _source(tmp_path / "reference")
    r = evolve(root, *PRUNE)
    assert r.returncode == 0, r.stdout + r.stderr
    return sha256_tree(root.checkpoints, LOCK)


def test_kill_9_during_a_prune_loses_nothing_and_the_next_prune_finishes_it(tmp_path, expected, tally):
    for nth in (1, 2, DELETED // 2, DELETED - 1, DELETED):
        root = _source(tmp_path / f"root{nth}")
        small = _small_files(root)
        with tally.fault("kill -9 · prune"):
            r = evolve(root, *PRUNE, spec=f"prune=kill@{nth}")
            assert r.returncode == -9, r.stdout + r.stderr
            lost = _lost(root, small)
            tally.lost("kill -9 · prune", len(lost))
            assert lost == []
            r = evolve(root, *PRUNE)
            assert r.returncode == 0, r.stdout + r.stderr
            assert sha256_tree(root.checkpoints, LOCK) == expected
            with Ledger.open(root) as led:
                report = led.verify()
                assert report.ok and not report.warnings, (report.problems, report.warnings)
                # each generation pruned once in the ledger, however many runs it took
                assert sorted(e.gen for e in led.entries(kind=ev.PRUNED)) == [1, 2, 3, 4, 6]


def test_a_full_disk_during_a_prune_says_so_and_loses_nothing(tmp_path, expected, tally):
    root = _source(tmp_path / "append")
    small, tree = _small_files(root), sha256_tree(root.checkpoints, LOCK)
    with tally.fault("disk full · prune (ledger append)"):
        r = evolve(root, *PRUNE, spec="ledger_append=enospc")
        assert r.returncode == 1 and "the disk is full" in r.stderr and "nothing was recorded" in r.stderr, r.stderr
        assert sha256_tree(root.checkpoints, LOCK) == tree  # nothing recorded, so nothing deleted
        assert _lost(root, small) == []

    root = _source(tmp_path / "delete")
    small = _small_files(root)
    with tally.fault("disk full · prune (deleting)"):
        r = evolve(root, *PRUNE, spec="prune=enospc@3")
        assert r.returncode == 1 and "the disk is full" in r.stderr and "run `evolve prune` again" in r.stderr, \
            r.stderr
        assert _lost(root, small) == []
        r = evolve(root, *PRUNE)
        assert r.returncode == 0, r.stderr
        assert sha256_tree(root.checkpoints, LOCK) == expected


def test_a_prune_on_a_full_tmpfs_says_so_then_frees_the_space_once_it_can_record(tmp_path, small_disk, expected,
                                                                                  tally):
    disk = small_disk("4m")
    root = _source(disk / "root")
    small, tree = _small_files(root), sha256_tree(root.checkpoints, LOCK)
    filler = fill(disk)
    with tally.fault("disk full · prune (tmpfs)"):
        r = evolve(root, *PRUNE)
        assert r.returncode == 1 and "the disk is full" in r.stderr, r.stdout + r.stderr
        assert sha256_tree(root.checkpoints, LOCK) == tree
        filler.unlink()
        assert _lost(root, small) == []
        r = evolve(root, *PRUNE)
        assert r.returncode == 0, r.stderr
        assert sha256_tree(root.checkpoints, LOCK) == expected
        assert (root.gen_dir(7) / GGUF).is_file()
