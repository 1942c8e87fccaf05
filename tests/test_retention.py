"""Retention, hermetic: which generations the policy keeps (worked out by hand), the ``pruned`` ledger
event, ``ledger verify`` on a pruned root, rollback to a pruned generation, ``evolve prune`` and the views.

The lineage (``tests.retention_util.LINEAGE``): 0 ← 1 ← 3 ← 4 ← 5 ← 7 served; 2 (child of 1) and 6
(child of 5) rejected; recall 0.5, 0.7, 0.3, 0.95, 0.8, 0.85, 0.2, 0.9. With keep_last 2 and keep_best 1:
kept 0 (generation 0), 7 (served), 5 (its parent; one of the last two), 3 (best recall). Pruned: 1 and
4 (their adapters stay: 3, 5 and 7 descend from them), 2 and 6 (nothing descends: adapters go too).
3 keeps its GGUF and adapter and loses its merged weights.
"""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from evolution import retention
from evolution.cli import main
from evolution.config import AgeUpConfig, RetentionConfig, resolve, resolve_retention
from evolution.errors import ConfigError, LedgerError
from evolution.fsutil import sha256_file
from evolution.ledger import Ledger, events, rollback
from evolution.paths import DataRoot
from tests.retention_util import ADAPTER, GGUF, KEPT_SMALL, WEIGHTS, build

POLICY = RetentionConfig(keep_last=2, keep_best=1)
PRUNED = {1: {GGUF, WEIGHTS}, 2: {GGUF, WEIGHTS, ADAPTER}, 4: {GGUF, WEIGHTS}, 6: {GGUF, WEIGHTS, ADAPTER}}
WEIGHTS_DROPPED = {3: {WEIGHTS}}


@pytest.fixture
def root() -> DataRoot:
    return DataRoot.from_env().prepare()


@pytest.fixture
def led(root):
    with Ledger.open(root) as led:
        build(root, led)
        yield led


def _files(root: DataRoot) -> dict[int, set[str]]:
    return {n: {p.relative_to(root.gen_dir(n)).as_posix() for p in root.gen_dir(n).rglob("*") if p.is_file()}
            for n in root.generations()}


def test_the_policy_keeps_generation_zero_the_served_its_parent_the_last_and_the_best(root, led):
    p = retention.plan(root, led, POLICY)
    assert sorted(p.kept) == [0, 3, 5, 7]
    assert p.kept[0] == ["generation 0"]
    assert p.kept[7] == ["served", "one of the last 2 that passed their gate"]
    assert p.kept[5] == ["parent of the served generation", "one of the last 2 that passed their gate"]
    assert p.kept[3] == ["one of the best 1 by recall (0.95)"]
    got = {d.gen: (d.scope, {a["path"].split("/", 2)[2] for a in d.artifacts}) for d in p.deletions}
    assert got == {**{g: ("generation", f) for g, f in PRUNED.items()},
                   **{g: ("weights", f) for g, f in WEIGHTS_DROPPED.items()}}
    assert "it was rejected: recall fell" in next(d.reason for d in p.deletions if d.gen == 2)
    # keeping more keeps more; zero keeps only generation 0, the served one and its parent
    assert sorted(retention.plan(root, led, RetentionConfig(keep_last=5, keep_best=0)).kept) == [0, 1, 3, 4, 5, 7]
    assert sorted(retention.plan(root, led, RetentionConfig(keep_last=0, keep_best=0)).kept) == [0, 5, 7]
    assert not [d for d in retention.plan(root, led, RetentionConfig(keep_last=0, keep_best=0, drop_weights=False))
                .deletions if d.scope == "weights"]


def test_a_generation_not_yet_decided_is_never_pruned(root, led):
    led.record(events.generation_created(8, 7, "SmolLM2-135M-Instruct", "cfg8", "man8"))
    led.record(events.exported(8, [events.artifact(root, root.gen_dir(7) / GGUF, "gguf")], "q8_0"))
    p = retention.plan(root, led, RetentionConfig(keep_last=0, keep_best=0))
    assert p.kept[8] == ["not yet promoted or rejected"]


def test_prune_records_what_it_deletes_then_deletes_it_and_keeps_the_data(root, led):
    before = {n: {rel: sha256_file(root.gen_dir(n) / rel) for rel in files} for n, files in _files(root).items()}
    books = root.checkpoints / ".answers"  # the gate's remembered replies, one book per GGUF
    books.mkdir()
    for n in before:
        (books / f"{before[n][GGUF]}.jsonl").write_text("{}\n")
    p = retention.prune(root, led, POLICY)
    assert p.bytes > 0
    assert sorted(b.name for b in books.iterdir()) == sorted(f"{before[n][GGUF]}.jsonl" for n in before
                                                             if GGUF not in PRUNED.get(n, ()))
    after = _files(root)
    for n, files in before.items():
        gone = PRUNED.get(n, set()) | WEIGHTS_DROPPED.get(n, set())
        assert after[n] == set(files) - gone - ({"model.gguf.sha256"} if n in PRUNED else set()), n
        assert set(KEPT_SMALL) <= after[n]  # replay's records, the metadata and reports stay
        assert not root.gen_dir(n).stat().st_mode & 0o222  # read-only again
    recorded = {e.gen: e.payload for e in led.entries(kind=events.PRUNED)}
    assert sorted(recorded) == [1, 2, 3, 4, 6]
    for gen, payload in recorded.items():
        assert payload["kept"] == [0, 3, 5, 7]
        for a in payload["artifacts"]:  # each deleted file with the hash its export recorded
            assert a["sha256"] == before[gen][a["path"].split("/", 2)[2]]
    assert recorded[1]["scope"] == "generation" and recorded[3]["scope"] == "weights"
    assert retention.plan(root, led, POLICY).deletions == []  # done: a second prune has nothing to do

    report = led.verify()
    assert report.ok and not report.warnings, (report.problems, report.warnings)
    assert report.artifacts_pruned == sum(map(len, PRUNED.values())) + 1
    assert report.artifacts_checked == 8 * 2 + 7 - report.artifacts_pruned  # the rest re-hashed
    rows = {r.gen: r for r in led.history()}
    assert {g: r.pruned for g, r in rows.items() if r.pruned} == {1: "generation", 2: "generation", 3: "weights",
                                                                 4: "generation", 6: "generation"}
    assert rows[2].status == "rejected" and rows[1].status == "promoted"  # their history is unchanged


def test_verify_still_catches_a_file_deleted_behind_the_prunes_back(root, led):
    (root.gen_dir(4) / GGUF).parent.chmod(0o755)
    (root.gen_dir(4) / GGUF).unlink()  # before the prune, by hand: a prune must not launder it
    retention.prune(root, led, POLICY)
    [gen4] = led.entries(kind=events.PRUNED, gen=4)
    assert [a["path"] for a in gen4.payload["artifacts"]] == [f"checkpoints/gen_0004/{WEIGHTS}"]
    for path in (root.gen_dir(5) / GGUF, root.gen_dir(3) / ADAPTER):  # kept files, deleted by hand after it
        path.parent.chmod(0o755)
        path.unlink()
    report = led.verify()
    assert {p.what for p in report.problems} == {"artifact_missing"}
    assert sorted(p.message.split()[1] for p in report.problems) == [
        f"checkpoints/gen_0003/{ADAPTER}", f"checkpoints/gen_0004/{GGUF}", f"checkpoints/gen_0005/{GGUF}"]


def test_an_interrupted_prune_is_a_warning_and_the_next_prune_finishes_it(root, led):
    p = retention.plan(root, led, POLICY)
    first = p.deletions[0]  # recorded, files not yet deleted: a crash in between
    led.record(events.pruned(first.gen, first.artifacts, first.scope, first.reason))
    report = led.verify()
    assert report.ok and report.artifacts_pruned == 0
    assert any("was pruned" in w and "`evolve prune` finishes it" in w for w in report.warnings), report.warnings
    n_events = len(led.entries(kind=events.PRUNED))
    again = retention.prune(root, led, POLICY)
    assert [d.recorded for d in again.deletions if d.gen == first.gen] == [True]
    assert len(led.entries(kind=events.PRUNED)) == n_events + len(again.deletions) - 1  # not recorded twice
    assert not any((root.root / a["path"]).exists() for a in first.artifacts)
    report = led.verify()
    assert report.ok and not report.warnings


def test_rollback_to_a_pruned_generation_names_those_kept_and_to_a_kept_one_works(root, led):
    retention.prune(root, led, POLICY)
    with pytest.raises(LedgerError, match=r"generation 4 was pruned \(seq \d+: not kept by the retention policy.*"
                                          r"generations kept that can be: 0, 3, 5, 7"):
        rollback(led, 4)
    assert led.served_generation() == 7
    rollback(led, 3)  # merged weights dropped, GGUF kept: servable
    assert led.served_generation() == 3


def test_the_pruned_event_is_validated():
    with pytest.raises(LedgerError, match="scope must be one of"):
        events.validate("pruned", 1, {"artifacts": [], "scope": "everything", "reason": "x"})
    with pytest.raises(LedgerError, match="artifact #0 lacks sha256"):
        events.validate("pruned", 1, {"artifacts": [{"path": "a", "size": 1, "kind": "gguf"}], "scope": "weights",
                                      "reason": "x"})
    with pytest.raises(LedgerError, match="must name its generation"):
        events.validate("pruned", None, {"artifacts": [], "scope": "weights", "reason": "x"})


def test_retention_config_from_toml_and_flags_with_every_error_at_once(root):
    (root.root / "evolution.toml").write_text("[retention]\nkeep_last = 5\ndrop_weights = false\n"
                                              "[gate]\nmin_recall = 0.6\n")
    r = resolve_retention(home=root.root)
    assert (r.keep_last, r.keep_best, r.drop_weights, r.after_promotion) == (5, 2, False, True)
    assert resolve_retention(overrides={"keep_best": 0}, home=root.root).keep_best == 0
    assert resolve(home=root.root).gate.min_recall == 0.6  # the age-up config ignores [retention]
    (root.root / "evolution.toml").write_text("[retention]\nkeep_last = -1\nkeep_best = 1.5\nkeep = 3\n")
    with pytest.raises(ConfigError, match="no field 'keep'"):
        resolve_retention(home=root.root)
    (root.root / "evolution.toml").write_text("[retention]\nkeep_last = -1\nkeep_best = 1.5\nafter_promotion = 1\n")
    with pytest.raises(ConfigError) as err:
        resolve_retention(home=root.root)
    assert [p.split()[0] for p in err.value.problems] == ["retention.keep_last", "retention.keep_best",
                                                          "retention.after_promotion"]


def test_evolve_prune_dry_run_changes_nothing_then_prunes(root, led):
    before = _files(root)
    runner = CliRunner()
    r = runner.invoke(main, ["prune", "--dry-run", "--keep-last", "2", "--keep-best", "1"])
    assert r.exit_code == 0, r.output
    assert "keep generation 3: one of the best 1 by recall (0.95)" in r.output
    assert "would delete generation 2's GGUF and weights" in r.output
    assert "would delete generation 3's merged weights" in r.output
    assert _files(root) == before and not led.entries(kind=events.PRUNED)
    r = runner.invoke(main, ["prune", "--keep-last", "2", "--keep-best", "1", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert sorted(out["kept"]) == ["0", "3", "5", "7"] and out["dry_run"] is False
    assert sorted(d["gen"] for d in out["deletions"]) == [1, 2, 3, 4, 6]
    r = runner.invoke(main, ["ledger"])
    assert "(pruned)" in r.output and "(weights pruned)" in r.output
    r = runner.invoke(main, ["ledger", "show", "2"])
    assert "pruned by the retention policy" in r.output and "pruned (seq" in r.output
    r = runner.invoke(main, ["ledger", "verify"])
    assert r.exit_code == 0 and "pruned" in r.output, r.output
    r = runner.invoke(main, ["prune"])
    assert r.exit_code == 0 and "nothing to prune" in r.output


def test_prune_is_refused_while_an_age_up_holds_the_lock(root, led):
    with root.exclusive("an age-up"):
        with pytest.raises(Exception, match="an age-up is running"):
            retention.prune(root, led, POLICY)
    assert not led.entries(kind=events.PRUNED)


def test_the_dashboard_shows_a_pruned_generation_as_pruned_not_as_a_rollback_target(root, led):
    from evolution.dashboard.data import View
    from evolution.intake import Intake

    retention.prune(root, led, POLICY)
    rows = {g["gen"]: g for g in View(root, led, Intake(led)).lineage()["generations"]}
    assert rows[4]["pruned"] == "generation" and rows[4]["rollback_target"] is False
    assert rows[3]["pruned"] == "weights" and rows[3]["rollback_target"] is True
    assert View(root, led, Intake(led)).generation(4)["pruned"] == "generation"


def test_a_backup_of_a_pruned_root_restores_to_a_root_that_verifies(root, led, tmp_path):
    from evolution import backup as bk

    retention.prune(root, led, POLICY)
    bk.backup(root, tmp_path / "bk")
    r = bk.restore(tmp_path / "bk", DataRoot(tmp_path / "restored"))
    assert r.served == 7
    with Ledger.open(DataRoot(tmp_path / "restored")) as restored:
        report = restored.verify()
        assert report.ok and report.artifacts_pruned == sum(map(len, PRUNED.values())) + 1, report.problems


def test_rebuild_leaves_weights_deleted_without_a_record_to_the_integrity_check(root, led):
    from evolution import ageup
    from evolution.errors import IntegrityError

    rollback(led, 3)
    path = root.gen_dir(3) / WEIGHTS
    path.parent.chmod(0o755)
    path.unlink()
    assert retention.rebuild_weights(root, led, 3) is None  # not pruned: nothing to rebuild it from, by rule
    with pytest.raises(IntegrityError, match="gen_0003/hf/model.safetensors is missing"):
        ageup.select_parent(root, led)


def _copy_of(lineage, at, monkeypatch) -> tuple[DataRoot, AgeUpConfig]:
    """A writable copy of the module's real lineage (generation 1 of the taught tiny model served over 0)."""
    src, cfg = lineage
    root = DataRoot(at)
    shutil.copytree(src.root, root.root)
    monkeypatch.setenv("EVOLUTION_HOME", str(root.root))
    cfg = AgeUpConfig.from_dict(cfg.to_dict())
    cfg.gate.stop_after = 10  # children of the taught base match their parents' recall: no pause
    return root, cfg


@pytest.mark.slow
def test_prune_roll_back_to_a_generation_whose_weights_were_dropped_and_age_up_from_it(lineage, tmp_path,
                                                                                      monkeypatch):
    """Real generations of the tiny model: generation 2's merged weights are pruned, it is rolled back to,
    and the next age-up rebuilds them from generation 0 and the adapters of 1 (itself pruned) and 2 — bit
    for bit what its export recorded — then trains generation 3 from them."""
    from tests.lineage_util import grow

    root, cfg = _copy_of(lineage, tmp_path / "root", monkeypatch)
    with Ledger.open(root) as ledger:
        grow(root, cfg, ledger)
        assert ledger.served_generation() == 2
        recorded = {a["kind"]: a for a in ledger.generation(2).artifacts}
        rollback(ledger, 0)  # served 0: 1 and 2 are neither served nor its parent
        p = retention.prune(root, ledger, RetentionConfig(keep_last=1, keep_best=0))
        assert sorted(p.kept) == [0, 2]
        assert not (root.gen_dir(1) / GGUF).exists() and not (root.gen_dir(1) / WEIGHTS).exists()
        assert (root.gen_dir(1) / ADAPTER).exists()  # 2 descends from it
        assert not (root.gen_dir(2) / WEIGHTS).exists() and (root.gen_dir(2) / GGUF).exists()
        assert all((root.gen_dir(n) / "data" / "sft.jsonl").is_file() for n in (1, 2))
        with pytest.raises(LedgerError, match="generations kept that can be: 0, 2"):
            rollback(ledger, 1)

        rollback(ledger, 2)
        child = grow(root, cfg, ledger)
        assert child.gen == 3 and child.parent == 2
        [rebuilt] = ledger.entries(kind=events.REBUILT, gen=2)
        assert rebuilt.payload["chain"] == [0, 1, 2]
        assert sha256_file(root.gen_dir(2) / WEIGHTS) == recorded["safetensors"]["sha256"]
        assert sha256_file(root.gen_dir(3) / WEIGHTS) != recorded["safetensors"]["sha256"]  # trained from there
        report = ledger.verify()
        assert report.ok and report.artifacts_pruned == 2, report.problems
        assert {r.gen: r.pruned for r in ledger.history()} == {0: None, 1: "generation", 2: None, 3: None}


@pytest.mark.slow
def test_the_daemon_prunes_after_it_promotes_a_child(daemon, tmp_path):
    """A child finished by a worker (here: generation 1's files again, as a child of 0, served again by a rollback
    before its age-up) is promoted by the daemon's own collect step, which then applies its retention policy:
    generation 1 — neither served, nor the new one's parent, nor kept by keep_last 0 — is pruned, after the
    promotion, in the ledger first."""
    import subprocess
    import sys

    from evolution.daemon import workers
    from evolution.fsutil import make_tree_read_only, make_tree_writable
    from evolution.intake.karma import RUNNING

    root, led = daemon.root, daemon.ledger
    rollback(led, 0, "the child below is built from generation 0")
    shutil.copytree(root.gen_dir(1), root.gen_dir(2))
    make_tree_writable(root.gen_dir(2))
    summary = json.loads((root.gen_dir(2) / "generation.json").read_text())
    summary.update(gen=2, parent=0, gen_dir=str(root.gen_dir(2)))
    (root.gen_dir(2) / "generation.json").write_text(json.dumps(summary))
    make_tree_read_only(root.gen_dir(2))
    request = daemon.intake.karma.add(1000, "test").triggered
    daemon.intake.karma.mark(request.id, RUNNING)
    daemon.retention_cfg = RetentionConfig(keep_last=0, keep_best=0)
    daemon.worker = workers.Worker(subprocess.Popen([sys.executable, "-c", "pass"]), request.id, False,
                                   tmp_path / "worker.log")
    daemon.worker.proc.wait()
    daemon._collect_worker()

    assert led.served_generation() == 2 and daemon.host.current.gen == 2
    [pruned] = led.entries(kind=events.PRUNED)
    assert pruned.gen == 1 and pruned.seq > led.entries(kind=events.PROMOTED, gen=2)[0].seq
    assert {a["kind"] for a in pruned.payload["artifacts"]} == {"gguf", "safetensors", "adapter"}
    assert not (root.gen_dir(1) / GGUF).exists() and (root.gen_dir(1) / "data").is_dir()
    assert (root.gen_dir(0) / GGUF).exists() and (root.gen_dir(2) / WEIGHTS).exists()
    report = led.verify()
    assert report.ok and report.artifacts_pruned == 3, report.problems


@pytest.mark.slow
def test_the_daemon_prunes_after_it_rejects_a_child_too(daemon, tmp_path):
    """A rejected child is pruned when it is decided, not at the next promotion (the horizon bench's two rejected
    generations kept 674 MB each). Here the child (generation 1's files again, as a child of 0) passed its gate
    but its parent is no longer served, so it is recorded rejected; keep_last 0 does not keep it."""
    import subprocess
    import sys

    from evolution.daemon import workers
    from evolution.fsutil import make_tree_read_only, make_tree_writable
    from evolution.intake.karma import RUNNING

    root, led = daemon.root, daemon.ledger
    shutil.copytree(root.gen_dir(1), root.gen_dir(2))
    make_tree_writable(root.gen_dir(2))
    summary = json.loads((root.gen_dir(2) / "generation.json").read_text())
    summary.update(gen=2, parent=0, gen_dir=str(root.gen_dir(2)))
    (root.gen_dir(2) / "generation.json").write_text(json.dumps(summary))
    make_tree_read_only(root.gen_dir(2))
    request = daemon.intake.karma.add(1000, "test").triggered
    daemon.intake.karma.mark(request.id, RUNNING)
    daemon.retention_cfg = RetentionConfig(keep_last=0, keep_best=0)
    daemon.worker = workers.Worker(subprocess.Popen([sys.executable, "-c", "pass"]), request.id, False,
                                   tmp_path / "worker.log")
    daemon.worker.proc.wait()
    daemon._collect_worker()

    assert led.served_generation() == 1 and daemon.host.current.gen == 1
    [rejected] = led.entries(kind=events.REJECTED, gen=2)
    [pruned] = led.entries(kind=events.PRUNED)
    assert pruned.gen == 2 and pruned.seq > rejected.seq
    assert not (root.gen_dir(2) / GGUF).exists() and (root.gen_dir(2) / "data").is_dir()
    assert (root.gen_dir(1) / GGUF).exists() and (root.gen_dir(1) / WEIGHTS).exists()
    assert led.verify().ok


@pytest.mark.slow
def test_generation_zero_drops_its_weights_and_makes_them_again_from_its_base(lineage, tmp_path, monkeypatch):
    """Generation 0's merged weights are its base model converted: they are pruned while it is neither served nor
    the served generation's parent, and made again from the base — bit for bit what the ledger recorded — when an
    age-up trains from it. A base that changed keeps them on disk, and a rebuild against one says what to do."""
    from evolution.errors import IntegrityError
    from tests.lineage_util import grow

    root, cfg = _copy_of(lineage, tmp_path / "root", monkeypatch)
    changed = tmp_path / "changed.safetensors"
    changed.write_bytes(b"another model")
    with Ledger.open(root) as ledger:
        grow(root, cfg, ledger)  # 2 served, 1 its parent, 0 neither
        recorded = {a["kind"]: a for a in ledger.generation(0).artifacts}
        policy = RetentionConfig(keep_last=5, keep_best=0)
        with monkeypatch.context() as m:
            m.setattr(retention, "_base_path", lambda source: changed)
            assert "has changed" in retention.base_remakeable(ledger)
            assert retention.plan(root, ledger, policy).deletions == []  # generation 0 keeps its weights
        assert retention.base_remakeable(ledger) is None
        [zero] = retention.prune(root, ledger, policy).deletions
        assert (zero.gen, zero.scope) == (0, events.PRUNE_WEIGHTS) and "base model" in zero.reason
        assert zero.bytes == recorded["safetensors"]["size"]
        assert not (root.gen_dir(0) / WEIGHTS).exists() and (root.gen_dir(0) / GGUF).exists()
        assert retention.plan(root, ledger, policy).deletions == []  # once is enough
        assert ledger.verify().ok

        rollback(ledger, 0)
        with monkeypatch.context() as m:
            m.setattr(retention, "_base_path", lambda source: changed)
            with pytest.raises(IntegrityError, match="put that base model back"):
                retention.rebuild_weights(root, ledger, 0)
        assert not (root.gen_dir(0) / WEIGHTS).exists()  # nothing half-made installed

        child = grow(root, cfg, ledger)
        assert (child.gen, child.parent) == (3, 0)
        [rebuilt] = ledger.entries(kind=events.REBUILT, gen=0)
        assert rebuilt.payload["chain"] == [0] and rebuilt.payload["from_base"] is True
        assert sha256_file(root.gen_dir(0) / WEIGHTS) == recorded["safetensors"]["sha256"]
        report = ledger.verify()
        assert report.ok and report.warnings == [], (report.problems, report.warnings)
