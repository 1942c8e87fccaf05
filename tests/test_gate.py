"""The gate measures the GGUF: a taught child beats its parent, a damaged one fails and says why."""

from __future__ import annotations

import json

import pytest
import torch

from evolution import export, gate, promotion
from evolution.errors import AgeUpsPaused
from evolution.promotion import paused_reason
from evolution.config import GateConfig
from evolution.ledger import events as ev
from evolution.paths import DataRoot
from tests.lineage_util import grow

def _eval(gen=1, recall=0.9, gen_acc=0.5, ppl=10.0, drift=1.0, smoke_ok=True) -> gate.ModelEval:
    sm = {"ok": smoke_ok, "problem": None if smoke_ok else "did not emit end-of-sequence within 8 tokens",
          "reply": "x", "finish_reason": "stop" if smoke_ok else "length", "completion_tokens": 3}
    return gate.ModelEval(gen, recall, {}, gen_acc, ppl, drift, sm)


def test_decide_passes_a_child_that_meets_every_rule():
    assert gate.decide(_eval(), _eval(gen=0, recall=0.5), GateConfig()) == ("pass", [])


@pytest.mark.parametrize("child, metric", [
    (_eval(recall=0.3), "recall"),
    (_eval(drift=5.0), "style_drift"),
    (_eval(gen_acc=0.1), "generalization"),
    (_eval(ppl=99.0), "perplexity"),
    (_eval(smoke_ok=False), "smoke"),
])
def test_each_failed_rule_is_named(child, metric):
    verdict, reasons = gate.decide(child, _eval(gen=0, recall=0.2), GateConfig())
    assert verdict == "fail" and len(reasons) == 1 and reasons[0].startswith(metric), reasons


def test_forgetting_below_the_parent_fails_even_above_the_threshold():
    verdict, reasons = gate.decide(_eval(recall=0.7), _eval(gen=0, recall=0.9), GateConfig(min_recall=0.6))
    assert verdict == "fail" and "fell below the parent's 0.900" in reasons[0]


@pytest.mark.parametrize("field", ["min_recall", "max_style_drift"])
def test_missing_thresholds_pass_nothing(field):
    cfg = GateConfig(**{field: None})
    verdict, reasons = gate.decide(_eval(recall=1.0), _eval(gen=0, recall=0.0), cfg)
    assert verdict == "fail" and reasons[0].startswith("thresholds:")


def test_stop_rule_needs_two_children_in_a_row_without_recall_gain():
    def res(child, c, p):
        return {"child": child, "metrics": {"recall": c}, "parent_metrics": {"recall": p}}

    assert promotion.stop_rule([res(1, 0.8, 0.8)], 2) is None
    assert promotion.stop_rule([res(1, 0.8, 0.8), res(2, 0.9, 0.8)], 2) is None
    reason = promotion.stop_rule([res(1, 0.9, 0.5), res(2, 0.7, 0.9), res(3, 0.9, 0.9)], 2)
    assert reason and "gen 2: 0.70 vs parent 0.90" in reason and "evolve resume" in reason


@pytest.fixture
def _learning_cfg(tiny_cfg):
    t = tiny_cfg.train
    t.lora_r, t.lora_alpha, t.sft.lr, t.sft.max_steps, t.batch_size, t.save_steps = 16, 32, 1e-2, 40, 8, 40
    t.sft.epochs = 100.0
    g = tiny_cfg.gate
    # A 2-layer model from random weights has no style and no fluency to keep: only recall matters here.
    g.min_recall, g.max_style_drift, g.max_perplexity_ratio, g.generalization_margin = 0.5, 1e6, None, None
    g.answer_max_tokens, g.smoke_max_tokens = 12, 16
    return tiny_cfg


def test_child_taught_the_facts_beats_its_parent_and_a_damaged_child_fails(learnable_base, _learning_cfg, ledger,
                                                                              tmp_path):
    root = DataRoot.from_env()
    cfg = _learning_cfg
    summary = grow(root, cfg, ledger, base=learnable_base)
    g = summary.gate
    assert g["parent_metrics"]["recall"] == 0.0
    assert g["metrics"]["recall"] >= 0.75, g
    # 40 steps teach this 2-layer model the answers but not yet reliably to stop after them, so the
    # smoke rule may still hold it back; no other rule may. (The slow test sees a real child pass.)
    assert all(r.startswith("smoke") for r in g["reasons"]), g["reasons"]
    assert [e.kind for e in ledger.entries(gen=1)][-2:] == ["gate_result", "promoted" if not g["reasons"] else "rejected"]
    report = json.loads((root.gen_dir(1) / "eval.json").read_text())
    assert report["child"]["recall"] == g["metrics"]["recall"] and (root.gen_dir(1) / "eval.md").is_file()

    # Damage the child's weights, export that, and gate it against the good child.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(root.gen_dir(1) / "hf")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.add_(torch.randn_like(p) * p.std() * 3)
    damaged = tmp_path / "damaged"
    model.save_pretrained(damaged / "hf")
    AutoTokenizer.from_pretrained(root.gen_dir(1) / "hf").save_pretrained(damaged / "hf")
    export.to_gguf_f16(damaged / "hf", damaged / "f16.gguf")
    export.quantize(damaged / "f16.gguf", damaged / "model.gguf", "q8_0")
    from evolution import curriculum

    es = gate.eval_set(curriculum.load(cfg.curriculum.path), [])
    result = gate.run(damaged / "model.gguf", 2, root.gen_dir(1) / "model.gguf", 1, es, cfg.gate,
                      cfg.export.smoke_prompt)
    assert result.verdict == "fail"
    assert any(r.startswith("recall") for r in result.reasons), result.reasons


def test_a_child_that_never_emits_end_of_sequence_fails_the_smoke_check(tiny_base, tiny_cfg, ledger):
    root = DataRoot.from_env()
    tiny_cfg.train.sft_max_steps = 1  # barely trained: still the random model
    summary = grow(root, tiny_cfg, ledger, base=tiny_base)
    assert summary.gate["verdict"] == "fail"
    assert any(r.startswith("smoke: the child") for r in summary.gate["reasons"]), summary.gate["reasons"]
    assert ledger.served_generation() == 0
    assert ledger.entries(gen=1)[-1].kind == "rejected"


def test_paused_age_ups_refuse_until_resumed(tiny_base, tiny_cfg, ledger):
    root = DataRoot.from_env()
    ledger.record(ev.ageups_paused("the last 2 children did not improve recall"))
    with pytest.raises(AgeUpsPaused, match="did not improve recall"):
        grow(root, tiny_cfg, ledger, base=tiny_base)
    assert root.generations() == []
    ledger.record(ev.ageups_resumed("curriculum fixed"))
    assert paused_reason(ledger) is None


def test_status_and_resume_commands_show_and_lift_the_pause(ledger):
    from click.testing import CliRunner

    from evolution.cli import main

    runner = CliRunner()
    assert "age-ups:          active" in runner.invoke(main, ["status"]).output
    assert runner.invoke(main, ["resume"]).exit_code == 1  # nothing to resume
    ledger.record(ev.ageups_paused("the last 2 children did not improve recall"))
    out = runner.invoke(main, ["status", "--json"]).output
    assert json.loads(out)["paused"].startswith("the last 2 children")
    result = runner.invoke(main, ["resume", "--reason", "curriculum fixed"])
    assert result.exit_code == 0, result.output
    assert ledger.entries()[-1].kind == "ageups_resumed" and paused_reason(ledger) is None
