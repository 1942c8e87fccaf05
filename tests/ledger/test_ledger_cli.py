"""The ledger's commands through ``evolve``: history, show, verify, rollback, report."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from evolution.cli import main


@pytest.fixture
def evolve(ledger_url):
    runner = CliRunner()
    env = {"EVOLUTION_LEDGER_URL": ledger_url} if ledger_url else {}

    def run(*args: str):
        return runner.invoke(main, list(args), env=env, catch_exceptions=False)

    return run


def test_history_table_and_json(lineage, evolve):
    out = evolve("ledger")
    assert out.exit_code == 0, out.output
    for text in ("gen", "rejected", "▶", lineage.history()[3].gguf_sha256[:10]):
        assert text in out.output
    data = json.loads(evolve("ledger", "--json").output)
    assert data["served"] == 3
    assert [g["gen"] for g in data["generations"]] == [0, 1, 2, 3]
    assert data["generations"][2]["verdict"] == "fail"


def test_empty_history(ledger, evolve):
    out = evolve("ledger")
    assert out.exit_code == 0 and "empty" in out.output


def test_show_generation(lineage, evolve):
    out = evolve("ledger", "show", "3")
    assert out.exit_code == 0, out.output
    assert "3 ← 1 ← 0" in out.output and "recall" in out.output and "model.gguf" in out.output
    data = json.loads(evolve("ledger", "show", "3", "--json").output)
    assert data["lineage"] == [3, 1, 0] and data["config_hash"] == "cfg3" and data["served"] is True
    assert data["gate"]["metrics"]["style_drift"] == 0.1


def test_show_unknown_generation_is_a_clean_error(lineage, evolve):
    out = evolve("ledger", "show", "42")
    assert out.exit_code == 1 and "generation 42 is not in the ledger" in out.output


def test_verify_exit_codes(lineage, evolve, tamper):
    out = evolve("ledger", "verify")
    assert out.exit_code == 0 and "ledger OK" in out.output
    tamper("DELETE FROM ledger_entries WHERE seq = 4")
    out = evolve("ledger", "verify")
    assert out.exit_code == 1
    assert "first bad seq 4" in out.output and "missing" in out.output
    data = json.loads(evolve("ledger", "verify", "--json").stdout)
    assert data["ok"] is False and data["first_bad_seq"] == 4


def test_verify_write_head_only_when_the_chain_is_intact(lineage, evolve, tamper):
    lineage.head_path.unlink()
    assert evolve("ledger", "verify").exit_code == 1
    assert evolve("ledger", "verify", "--write-head").exit_code == 0
    tamper("UPDATE ledger_entries SET kind = 'promoted' WHERE seq = 2")
    lineage.head_path.unlink()
    assert evolve("ledger", "verify", "--write-head").exit_code == 1
    assert not lineage.head_path.exists()


def test_rollback_command(lineage, evolve):
    out = evolve("rollback", "--to", "1", "--reason", "regression")
    assert out.exit_code == 0, out.output
    assert "from generation 3 to 1" in out.output
    assert lineage.served_generation() == 1
    refused = evolve("rollback", "--to", "2")
    assert refused.exit_code == 1 and "failed its gate" in refused.output
    assert lineage.served_generation() == 1


def test_report_png(lineage, evolve, tmp_path, data_root):
    from evolution.ledger import rollback

    rollback(lineage, 1)
    out = evolve("report", "-o", str(tmp_path / "lineage.png"))
    assert out.exit_code == 0, out.output
    png = (tmp_path / "lineage.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert evolve("report").exit_code == 0
    assert (data_root.ledger_dir / "report.png").is_file()


def test_report_of_an_empty_ledger_is_a_clean_error(ledger, evolve, tmp_path):
    out = evolve("report", "-o", str(tmp_path / "x.png"))
    assert out.exit_code == 1 and "nothing to plot" in out.output
