"""``evolve backup`` / ``evolve restore`` on a small lineage with stand-in files, on SQLite and PostgreSQL.

The round trip with real generations and a real daemon serving the restored root is in
``tests/test_backup.py``; kill -9 and a full disk during a backup are in the reliability suite.
"""

from __future__ import annotations

import json
import os
import threading

import pytest
from click.testing import CliRunner

from evolution import backup as bk
from evolution import vocab
from evolution.cli import main
from evolution.errors import BackupError
from evolution.fsutil import sha256_file
from evolution.ledger import Ledger, events
from evolution.paths import DataRoot
from tests.ledger.conftest import tamper_sqlite


def _files(root: DataRoot) -> dict[str, str]:
    return {p.relative_to(root.root).as_posix(): sha256_file(p) for p in sorted(root.checkpoints.rglob("*"))
            if p.is_file()}


def _check_pg_dump(dest, res) -> None:
    """A PostgreSQL backup: pg_restore reads the dump, which holds the ledger up to the backup's head.

    (Restoring it needs a new, empty database; the test server gives each test a schema, not a database.)
    """
    import subprocess

    listing = subprocess.run(["pg_restore", "--list", str(dest / bk.PG_DUMP)], capture_output=True, text=True,
                             check=True).stdout
    assert "TABLE DATA" in listing and "ledger_entries" in listing
    assert json.loads((dest / "ledger" / "HEAD.json").read_text())["seq"] == res.head.seq


def test_round_trip_restores_a_root_that_verifies_and_serves_the_same_generation(
        lineage, data_root, ledger_url, backend, tmp_path):
    before = lineage.entries()
    res = bk.backup(data_root, tmp_path / "bk", url=ledger_url)
    assert res.head.seq == before[-1].seq and res.generations == [0, 1, 2, 3]
    manifest = json.loads((tmp_path / "bk" / bk.MANIFEST).read_text())
    assert manifest["files"]["checkpoints/gen_0003/model.gguf"] == sha256_file(data_root.gen_dir(3) / "model.gguf")
    assert not list(tmp_path.glob(".bk.partial-*"))

    if backend == "postgresql":
        _check_pg_dump(tmp_path / "bk", res)
        return
    new = DataRoot(tmp_path / "restored")
    r = bk.restore(tmp_path / "bk", new)
    assert r.served == 3 and r.head.seq == before[-1].seq and r.moved_aside is None
    with Ledger.open(new) as led:
        report = led.verify()
        assert report.ok, report.problems
        assert report.artifacts_checked == 4
        assert [(e.seq, e.entry_hash) for e in led.entries()] == [(e.seq, e.entry_hash) for e in before]
    assert _files(new) == _files(data_root)


def test_a_postgresql_backup_restores_with_pg_restore_into_a_database_without_a_ledger(
        lineage, data_root, ledger_url, backend, tmp_path):
    if backend != "postgresql":
        pytest.skip("PostgreSQL only")
    import sqlalchemy as sa

    before = [(e.seq, e.entry_hash) for e in lineage.entries()]
    bk.backup(data_root, tmp_path / "bk", url=ledger_url)
    schema = sa.make_url(ledger_url).query["options"].split("=", 1)[1]
    admin = sa.create_engine(sa.make_url(ledger_url).set(query={}))
    lineage.close()
    with admin.begin() as conn:  # the source moves away: the backup's schema name is free again (the test
        conn.exec_driver_sql(f'ALTER SCHEMA "{schema}" RENAME TO "{schema}_old"')  # server has one database)
    try:
        with pytest.raises(BackupError, match="holds a PostgreSQL ledger: pass --ledger-url"):
            bk.restore(tmp_path / "bk", DataRoot(tmp_path / "new"))
        with admin.begin() as conn:  # as `public` is in a new database: the schema there, empty
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        r = bk.restore(tmp_path / "bk", DataRoot(tmp_path / "new"), url=ledger_url)
        assert r.served == 3
        with Ledger.open(DataRoot(tmp_path / "new"), ledger_url) as led:
            report = led.verify()
            assert report.ok and report.artifacts_checked == 4, report.problems
            assert [(e.seq, e.entry_hash) for e in led.entries()] == before
        with pytest.raises(BackupError, match="already holds a ledger"):
            bk.restore(tmp_path / "bk", DataRoot(tmp_path / "new2"), url=ledger_url)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}_old" CASCADE')
        admin.dispose()


def test_the_cli_backs_up_and_restores_and_ledger_verify_passes(lineage, data_root, tmp_path, backend):
    if backend != "sqlite":
        pytest.skip("the PostgreSQL round trip is the test above; the CLI is the same")
    runner = CliRunner()
    out = runner.invoke(main, ["backup", str(tmp_path / "bk")])
    assert out.exit_code == 0, out.output
    assert "generations 0, 1, 2, 3" in out.output
    out = runner.invoke(main, ["restore", str(tmp_path / "bk"), str(tmp_path / "new")])
    assert out.exit_code == 0, out.output
    assert "served generation 3" in out.output
    out = runner.invoke(main, ["ledger", "verify"], env={"EVOLUTION_HOME": str(tmp_path / "new")})
    assert out.exit_code == 0 and "ledger OK" in out.output, out.output


def test_no_models_leaves_out_the_weights_and_a_forced_restore_keeps_those_that_hash_right(
        lineage, data_root, tmp_path, backend):
    if backend != "sqlite":
        pytest.skip("files only")
    res = bk.backup(data_root, tmp_path / "bk", models=False)
    assert set(res.left_out) == {f"checkpoints/gen_000{n}/model.gguf" for n in range(4)}
    assert not list((tmp_path / "bk").rglob("*.gguf"))
    assert (tmp_path / "bk" / "checkpoints/gen_0001/model.gguf.sha256").is_file()  # metadata still there

    r = bk.restore(tmp_path / "bk", DataRoot(tmp_path / "elsewhere"))  # no weights anywhere: verify names them
    assert sorted(r.missing) == sorted(res.left_out)
    with Ledger.open(DataRoot(tmp_path / "elsewhere")) as led:
        assert {p.what for p in led.verify().problems} == {"artifact_missing"}

    lineage.record(events.karma_threshold_crossed(10, 10))  # written after the backup: replaced by the restore
    lineage.close()
    r = bk.restore(tmp_path / "bk", data_root, force=True)  # the ledger back, the weights kept from the root
    assert sorted(r.kept) == sorted(res.left_out) and not r.missing
    assert (r.moved_aside / "ledger" / "ledger.db").is_file()  # what was replaced is kept, not deleted
    with Ledger.open(data_root) as led:
        assert led.verify().ok and led.last().seq == res.head.seq


def test_a_lineages_own_tokenizer_is_backed_up_and_restored_with_its_weights_kept_or_reclaimed(
        lineage, data_root, tmp_path, backend):
    """``evolve tokenizer extend`` keeps the base generation 0 was built from in ``tokenizer/base/``: no generation,
    yet retention remakes generation 0 from it, so a backup that left it out could not be restored whole."""
    if backend != "sqlite":
        pytest.skip("files only")
    own = data_root.home / vocab.BASE_DIR
    own.mkdir(parents=True)
    (own / "tokenizer.json").write_text('{"model": {"merges": []}}')
    (own / "model.safetensors").write_bytes(os.urandom(4096))
    (own / vocab.STATS_FILE).write_text('{"added": 2}')
    want = {p.relative_to(data_root.root).as_posix(): sha256_file(p) for p in own.iterdir()}

    res = bk.backup(data_root, tmp_path / "bk")
    manifest = json.loads((tmp_path / "bk" / bk.MANIFEST).read_text())
    assert {k: v for k, v in manifest["files"].items() if k.startswith("tokenizer/")} == want
    r = bk.restore(tmp_path / "bk", DataRoot(tmp_path / "elsewhere"))
    assert r.served == 3 and not r.missing
    assert {k: sha256_file(tmp_path / "elsewhere" / k) for k in want} == want

    res = bk.backup(data_root, tmp_path / "bk-light", models=False)  # the base's weights are weights too
    assert "tokenizer/base/model.safetensors" in res.left_out
    assert not (tmp_path / "bk-light" / "tokenizer/base/model.safetensors").exists()
    assert (tmp_path / "bk-light" / "tokenizer/base/tokenizer.json").is_file()
    lineage.close()
    r = bk.restore(tmp_path / "bk-light", data_root, force=True)  # kept from the replaced root: it hashes right
    assert "tokenizer/base/model.safetensors" in r.kept and not r.missing
    assert {k: sha256_file(data_root.root / k) for k in want} == want
    assert (r.moved_aside / "tokenizer/base/model.safetensors").is_file()  # what was replaced is kept aside


def test_a_tampered_backup_is_refused_naming_the_file(lineage, data_root, tmp_path, backend):
    if backend != "sqlite":
        pytest.skip("files only")
    bk.backup(data_root, tmp_path / "bk")
    gguf = tmp_path / "bk" / "checkpoints/gen_0003/model.gguf"
    gguf.write_bytes(b"not the model that passed its gate")
    with pytest.raises(BackupError, match="checkpoints/gen_0003/model.gguf: SHA-256 differs"):
        bk.restore(tmp_path / "bk", DataRoot(tmp_path / "new"))
    assert not (tmp_path / "new" / "ledger").exists()  # nothing written

    bk.backup(data_root, tmp_path / "bk2")
    tamper_sqlite(tmp_path / "bk2" / "ledger" / "ledger.db", "UPDATE ledger_entries SET gen = 1 WHERE kind='promoted'")
    (tmp_path / "bk2" / "extra.txt").write_text("added")
    with pytest.raises(BackupError) as err:
        bk.restore(tmp_path / "bk2", DataRoot(tmp_path / "new"))
    assert "ledger/ledger.db: SHA-256 differs" in str(err.value) and "extra.txt: not in the manifest" in str(err.value)
    with pytest.raises(BackupError, match="has no MANIFEST.json"):
        bk.restore(tmp_path / "bk" / "checkpoints", DataRoot(tmp_path / "new"))


def test_restore_over_a_live_root_is_refused_without_force_and_a_running_daemon_always(
        lineage, data_root, tmp_path, backend):
    if backend != "sqlite":
        pytest.skip("files only")
    bk.backup(data_root, tmp_path / "bk")
    before = _files(data_root) | {"db": sha256_file(data_root.ledger_dir / "ledger.db")}
    with pytest.raises(BackupError, match="is a live data root: it has a ledger"):
        bk.restore(tmp_path / "bk", data_root)
    (data_root.root / "daemon.json").write_text(json.dumps({"pid": os.getpid(), "port": 1}))  # this process: alive
    with pytest.raises(BackupError, match=f"a daemon is running on .* \\(pid {os.getpid()}\\); stop it first"):
        bk.restore(tmp_path / "bk", data_root, force=True)
    assert _files(data_root) | {"db": sha256_file(data_root.ledger_dir / "ledger.db")} == before
    out = CliRunner().invoke(main, ["restore", str(tmp_path / "bk"), str(data_root.root)])
    assert out.exit_code == 1 and "--force" in out.output


@pytest.mark.unprivileged  # its last check skips as root; .ci/unprivileged.sh runs it as a user
def test_backup_refuses_an_existing_dest_and_says_when_it_cannot_write(lineage, data_root, tmp_path, backend):
    if backend != "sqlite":
        pytest.skip("files only")
    (tmp_path / "taken").mkdir()
    with pytest.raises(BackupError, match="already exists"):
        bk.backup(data_root, tmp_path / "taken")
    with pytest.raises(BackupError, match="has no ledger .*Set EVOLUTION_HOME"):
        bk.backup(DataRoot(tmp_path / "not-a-root"), tmp_path / "bk")
    assert not (tmp_path / "not-a-root").exists() and not (tmp_path / "bk").exists()
    with pytest.raises(BackupError, match="inside the data root"):
        bk.backup(data_root, data_root.root / "bk")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(BackupError, match="cannot write the backup to .*a-file/bk: .*a-file is a file, not a folder"):
        bk.backup(data_root, tmp_path / "a-file" / "bk")
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(BackupError, match="cannot write the backup to .*Permission denied"):
        bk.backup(data_root, ro / "bk")


def test_a_backup_while_another_thread_appends_is_one_consistent_snapshot(lineage, data_root, ledger_url, backend,
                                                                          tmp_path):
    stop = threading.Event()
    errors = []

    def writer():
        with Ledger.open(data_root, ledger_url) as led:
            while not stop.is_set():
                try:
                    led.record(events.rolled_back(1, 3, "backup test"))
                    led.record(events.rolled_back(3, 1, "backup test"))
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    try:
        backups = [bk.backup(data_root, tmp_path / f"bk{i}", url=ledger_url) for i in range(3)]
    finally:
        stop.set()
        t.join(30)
    assert not errors
    final = {e.seq: e.entry_hash for e in lineage.entries()}
    for i, res in enumerate(backups):
        if backend == "postgresql":
            _check_pg_dump(tmp_path / f"bk{i}", res)  # the snapshot's consistency is pg_dump's
            continue
        new = DataRoot(tmp_path / f"new{i}")
        bk.restore(tmp_path / f"bk{i}", new)
        with Ledger.open(new) as led:
            report = led.verify()
            assert report.ok, report.problems
            got = {e.seq: e.entry_hash for e in led.entries()}
        assert got == {s: h for s, h in final.items() if s <= res.head.seq}  # a prefix of the live ledger
    assert backups[-1].head.seq > backups[0].head.seq  # the writer really ran during the backups
