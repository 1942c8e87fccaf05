"""Back up a data root while the real daemon serves it, restore it elsewhere, and serve it again.

``run_daemon.py`` serves generation 1 of a two-generation lineage (grown from the tiny taught
model) and takes chats while ``evolve backup`` runs; the backup is restored to a new data root,
``evolve ledger verify`` passes there, and a daemon started on it serves the same generation with
the same GGUF hash. The unit-level cases (no models, tampering, live roots, concurrent appends,
PostgreSQL) are in ``tests/ledger/test_backup.py``.
"""

from __future__ import annotations

import shutil

import httpx
from click.testing import CliRunner

from evolution.cli import main
from evolution.ledger import Ledger
from evolution.paths import DataRoot
from tests.conftest import toml_of
from tests.daemon_util import Chatter, DaemonProc


def _config(cfg, path):
    d = cfg.to_dict()
    d.pop("quick")
    d["daemon"] = {"poll_seconds": 0.3, "threshold": 1000}
    path.write_text(toml_of(d))
    return path


def _served_model(d: DaemonProc) -> dict:
    return httpx.get(d.url + "/v1/models", timeout=10).json()["data"][0]


def test_backup_of_a_serving_daemon_restores_to_a_root_that_verifies_and_serves_the_same_generation(
        lineage, tmp_path):
    src, cfg = lineage
    home = tmp_path / "home-live"
    shutil.copytree(src.root, home, symlinks=True)
    conf = _config(cfg, tmp_path / "evolution-test.toml")
    runner = CliRunner()

    live = DaemonProc(home, "--config", str(conf)).start()
    try:
        live.wait_serving(1, 180)
        model = _served_model(live)
        with Chatter(live.url, clients=2, pause=0.05) as chat:  # captures write to the ledger meanwhile
            live.wait(lambda: len(chat.models) >= 2, 60, "chats")
            out = runner.invoke(main, ["backup", str(tmp_path / "bk")], env={"EVOLUTION_HOME": str(home)})
        assert out.exit_code == 0, out.output
        assert not chat.failures, chat.failures[:3]
        out = runner.invoke(main, ["restore", str(tmp_path / "bk"), str(home), "--force"])
        assert out.exit_code == 1 and "a daemon is running on" in out.output  # even forced
    finally:
        assert live.stop() == 0

    new = tmp_path / "home-restored"
    out = runner.invoke(main, ["restore", str(tmp_path / "bk"), str(new)])
    assert out.exit_code == 0, out.output
    assert "served generation 1" in out.output
    out = runner.invoke(main, ["ledger", "verify"], env={"EVOLUTION_HOME": str(new)})
    assert out.exit_code == 0 and "ledger OK" in out.output, out.output
    with Ledger.open(DataRoot(home)) as a, Ledger.open(DataRoot(new)) as b:
        restored = b.entries()
        assert [(e.seq, e.entry_hash) for e in restored] == [(e.seq, e.entry_hash) for e in a.entries()][
            :len(restored)]

    again = DaemonProc(new, "--config", str(conf)).start()
    try:
        again.wait_serving(1, 180)
        assert _served_model(again)["sha256"] == model["sha256"]
        reply = httpx.post(again.url + "/v1/chat/completions", timeout=60, json={
            "model": "evolution", "max_tokens": 8, "messages": [{"role": "user", "content": "What is your name?"}]})
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
    finally:
        assert again.stop() == 0
