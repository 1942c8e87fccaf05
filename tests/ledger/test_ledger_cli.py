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


def _table_gate(parent: int, child: int):
    """A gate_result as the gate writes it from its metric table: rules per metric, one metric not measured."""
    from evolution import gate
    from evolution.config import GateConfig
    from evolution.ledger import events

    def me(gen, recall, ppl):
        sm = {"ok": True, "problem": None, "reply": "Hi", "finish_reason": "stop", "completion_tokens": 2}
        notes = {} if ppl is not None else {"perplexity": "no held-out text in eval/heldout_text.jsonl"}
        return gate.ModelEval(gen, {"smoke": 1.0, "recall": recall, "generalization": 0.5, "style_drift": 0.4,
                                    "perplexity": ppl}, {"smoke": sm}, notes)

    c, p, cfg = me(child, 0.9, None), me(parent, 0.8, 30.0), GateConfig()
    verdict, reasons = gate.decide(c, p, cfg)
    s = gate.GateResult(verdict, reasons, c, p, {}, gate.check(c, p, cfg)).summary()
    return events.gate_result(parent, child, s["metrics"], s["thresholds"], s["verdict"],
                              parent_metrics=s["parent_metrics"], reasons=s["reasons"], checks=s["checks"])


def test_show_renders_the_rules_of_the_metric_table_and_older_entries(lineage, evolve):
    lineage.record(_table_gate(3, 4))
    out = evolve("ledger", "show", "4")
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert ">= 0.7" in text and ">= parent - 0.05" in text and "<= 2.0" in text, out.output
    assert "skipped: perplexity: not enough data (no held-out text" in text, out.output
    rows = [[c.strip() for c in line.split("│")[1:4]] for line in out.output.splitlines() if line.startswith("│ ")]
    rows = [r for r in rows if r[0]]  # a cell of several rules folds onto lines of its own
    names = [r[0] for r in rows]
    assert names[:5] == ["smoke", "recall", "generalization", "style_drift", "perplexity"], names  # table order
    assert rows[names.index("perplexity")][1:] == ["-", "30"]
    history = evolve("ledger")
    assert history.exit_code == 0 and "perplexity" in history.output and "smoke" in history.output
    old = evolve("ledger", "show", "3")  # recorded before the table: its threshold under the metric's name
    assert old.exit_code == 0 and "0.5" in old.output and "recall" in old.output


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
    lineage.record(_table_gate(1, 4))  # a None metric and recorded thresholds: drawn, not crashed on
    out = evolve("report", "-o", str(tmp_path / "lineage.png"))
    assert out.exit_code == 0, out.output
    png = (tmp_path / "lineage.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert evolve("report").exit_code == 0
    assert (data_root.ledger_dir / "report.png").is_file()


def test_report_of_an_empty_ledger_is_a_clean_error(ledger, evolve, tmp_path):
    out = evolve("report", "-o", str(tmp_path / "x.png"))
    assert out.exit_code == 1 and "nothing to plot" in out.output
