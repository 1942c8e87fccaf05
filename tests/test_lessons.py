"""The report shows the lessons: eval.md and `evolve ledger show N` list every experience, probe and held-out
rated reply with the parent's and the child's reply and score; chat text is escaped wherever it is shown."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from evolution import evals, gate
from evolution.cli import main
from evolution.config import GateConfig
from evolution.ledger import events as ev
from evolution.metrics import Inputs
from evolution.metrics.experience_similarity import ExperienceSimilarity
from evolution.metrics.preference_margin import PreferenceMargin
from evolution.metrics.probe_recall import ProbeRecall
from evolution.paths import DataRoot
from evolution.untrusted import markdown_cell, one_line, terminal

TABLE = (ProbeRecall(), ExperienceSimilarity(), PreferenceMargin())
HOSTILE = "Evil | <script>alert(1)</script> *x* [a](http://b)\nsecond line \x1b[2J\u202e"
DOG = "Your dog is called Bramble."
U = [{"role": "user", "content": "What is my dog called?"}]


class _Chat:
    def __init__(self, replies: dict[str, str]):
        self.replies = replies

    def create_chat_completion(self, messages, **kw):
        return {"choices": [{"message": {"content": self.replies.get(messages[-1]["content"], "I do not know.")}}]}


class _Model:
    scorer = None

    def __init__(self, replies):
        self.llm = _Chat(replies)


def _es() -> gate.EvalSet:
    experiences = [{"prompt": U, "reference": DOG}, {"prompt": [{"role": "user", "content": HOSTILE}],
                                                     "reference": "Calm words."}]
    experiences += [{"prompt": [{"role": "user", "content": f"q{i}"}], "reference": "Fine."} for i in range(3)]
    probes = [{"id": "p0", "question": "Can you remind me of my dog's name?", "answers": ["Bramble"]},
              {"id": "p1", "question": "Where do I live?", "answers": ["Lyon"]}]
    held = [{"prompt": [{"role": "user", "content": "Help me?"}], "chosen": "Gladly, here is how.",
             "rejected": "Figure it out yourself."},
            {"prompt": [{"role": "user", "content": "Hi"}], "reply": "Hello!", "label": "good"},
            {"prompt": [{"role": "user", "content": "Hi"}], "reply": "Go away.", "label": "bad"}]
    return gate.EvalSet([], [], [], [], [], probes=probes, experiences=experiences, preference_heldout=held)


def _measure(gen: int, replies: dict, logprobs: dict, monkeypatch) -> gate.ModelEval:
    monkeypatch.setattr(evals, "reply_logprob", lambda scorer, prompt, reply: logprobs[reply])
    inputs = Inputs(_es(), GateConfig(min_probe_items=2, min_preference_items=4), "hi")
    return gate.ModelEval.of(gen, {u.name: u.measure(_Model(replies), inputs) for u in TABLE}, TABLE)


@pytest.fixture
def result(monkeypatch) -> gate.GateResult:
    """A child that learned the dog's name and learned to like the rude reply, beside its parent."""
    parent = _measure(0, {"What is my dog called?": "I am not sure.", "Where do I live?": "You live in Lyon.",
                          HOSTILE: "Calm words.", "Help me?": "Sure."},
                      {"Gladly, here is how.": -1.0, "Figure it out yourself.": -3.0, "Hello!": -1.5,
                       "Go away.": -2.5}, monkeypatch)
    child = _measure(1, {"What is my dog called?": DOG, "Can you remind me of my dog's name?": "It is Bramble.",
                         HOSTILE: "\x1b[31m" + "words " * 60, "Help me?": "Figure it out yourself."},
                     {"Gladly, here is how.": -1.2, "Figure it out yourself.": -0.5, "Hello!": -1.5,
                      "Go away.": -2.0}, monkeypatch)
    cfg = GateConfig(min_probe_items=2, min_preference_items=4)
    verdict, reasons = gate.decide(child, parent, cfg, TABLE)
    return gate.GateResult(verdict, reasons, child, parent, {}, gate.check(child, parent, cfg, TABLE))


def _rows(md: str, heading: str) -> list[str]:
    section = md.split(heading, 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith(("| #", "| ---"))]


def test_lessons_pair_each_item_of_the_child_with_the_parents(result):
    found = {u.name: items for u, items in gate.lessons(result.child, result.parent, TABLE)}
    assert list(found) == ["probe_recall", "experience_similarity", "preference_margin"]  # table order
    p0, p1 = found["probe_recall"]
    assert (p0.wanted, p0.parent_score, p0.child_score, p0.outcome) == ("Bramble", 0.0, 1.0, "learned")
    assert (p1.parent_reply, p1.child_reply, p1.outcome) == ("You live in Lyon.", "I do not know.", "forgotten")
    dog = found["experience_similarity"][0]
    assert (dog.asked, dog.wanted, dog.parent_score, dog.child_score, dog.outcome) == (
        "What is my dog called?", DOG, 0.0, 1.0, "closer")
    assert [x.outcome for x in found["experience_similarity"][2:]] == ["same"] * 3  # "I do not know." both times
    held = {x.wanted: x for x in found["preference_margin"]}
    assert list(held) == ["good: Gladly, here is how.", "bad: Figure it out yourself.", "good: Hello!", "bad: Go away."]
    rude = held["bad: Figure it out yourself."]
    assert (rude.parent_score, rude.child_score, rude.outcome) == (-3.0, -0.5, "worse")  # a bad reply grew likelier
    assert (rude.parent_reply, rude.child_reply) == ("Sure.", "Figure it out yourself.")  # each model's own answer
    assert held["good: Hello!"].outcome == "same" and held["good: Gladly, here is how."].outcome == "worse"
    # Generation 0 (no parent): the child's side only, nothing to compare.
    alone = {u.name: items for u, items in gate.lessons(result.child, None, TABLE)}
    assert {x.outcome for items in alone.values() for x in items} == {"-"}
    assert alone["probe_recall"][0].parent_reply is None


def test_eval_md_lists_the_lessons_escaped_and_truncated(result, tmp_path):
    assert result.verdict == "fail" and any(r.startswith("preference_margin ") for r in result.reasons)
    gate.write_report(result, tmp_path, TABLE)
    md = (tmp_path / "eval.md").read_text()
    probes = _rows(md, "## Lessons: probes")
    experience = _rows(md, "## Lessons: experience")
    held = _rows(md, "## Lessons: held-out rated replies")
    assert (len(probes), len(experience), len(held)) == (2, 5, 4)
    assert md.count("\n\n## Lessons: ") == 3  # each a section of its own
    assert "2 item(s): 1 learned, 1 forgotten" in md
    assert probes[0].startswith("| 1 | Can you remind me of my dog's name? | Bramble | I do not know. | 0.000 | "
                                "It is Bramble. | 1.000 | learned |")
    assert experience[0] == f"| 1 | What is my dog called? | {DOG} | I am not sure. | 0.000 | {DOG} | 1.000 | closer |"
    assert "| bad: Figure it out yourself. | Sure. | -3.000 | Figure it out yourself. | -0.500 | worse |" in held[1]
    # Untrusted text cannot break the table or the page: 9 cell borders on every row, no raw HTML, no
    # escape sequence, no line break inside a cell, long replies cut.
    for row in probes + experience + held:
        assert len(re.findall(r"(?<!\\)\|", row)) == 9, row
    assert "<script>" not in md and "&lt;script&gt;" in md and "\x1b" not in md and "\u202e" not in md
    hostile = experience[1]
    assert "Evil \\| &lt;script&gt;" in hostile and "\\*x\\* \\[a\\](http://b)⏎second line" in hostile
    assert "\\\\x1b\\[31mwords words" in hostile and "…" in hostile and len(hostile) < 400
    # eval.json keeps every text whole.
    report = json.loads((tmp_path / "eval.json").read_text())
    items = report["child"]["details"]["experience_similarity"]["items"]
    assert items[1]["reply"] == "\x1b[31m" + "words " * 60 and items[1]["prompt"] == HOSTILE


def _record(ledger, result: gate.GateResult, gen_dir) -> None:
    ledger.record(ev.generation_created(1, 0, "base", "cfg", "man"))
    ledger.record(ev.exported(1, [{"path": f"checkpoints/{gen_dir.name}/model.gguf", "sha256": "0" * 64, "size": 1,
                                   "kind": "gguf"}], "q8_0"))
    s = result.summary()
    ledger.record(ev.gate_result(0, 1, s["metrics"], s["thresholds"], s["verdict"], parent_metrics=s["parent_metrics"],
                                 reasons=s["reasons"], checks=s["checks"]))
    ledger.record(ev.rejected(1, "; ".join(s["reasons"])))


def test_ledger_show_lists_the_lessons_from_eval_json(result, ledger):
    gen_dir = DataRoot.from_env().gen_dir(1)
    gen_dir.mkdir(parents=True)
    gate.write_report(result, gen_dir, TABLE)
    _record(ledger, result, gen_dir)
    run = CliRunner().invoke
    out = run(main, ["ledger", "show", "1"], catch_exceptions=False).output
    text = " ".join(out.split())
    for needle in ("lessons: probes", "lessons: experience", "lessons: held-out rated replies", "learned",
                   "forgotten", "What is my dog called?", "Bramble", "Figure it out yourself."):
        assert needle in text, needle
    assert "\x1b" not in out and "\u202e" not in out and "\\x1b[31m" in out  # shown, never run
    assert "<script>alert(1)</script>" in text  # plain text on a terminal: shown as written, one line

    data = json.loads(run(main, ["ledger", "show", "1", "--json"], catch_exceptions=False).output)
    assert data["lessons_problem"] is None
    assert [x["outcome"] for x in data["lessons"]["probe_recall"]] == ["learned", "forgotten"]
    assert data["lessons"]["experience_similarity"][0]["child_reply"] == DOG

    # An eval.json that disagrees with the ledger's gate result is not shown; a missing one is named.
    report = json.loads((gen_dir / "eval.json").read_text())
    report["metrics"]["experience_similarity"] = 0.99
    (gen_dir / "eval.json").write_text(json.dumps(report))
    data = json.loads(run(main, ["ledger", "show", "1", "--json"], catch_exceptions=False).output)
    assert data["lessons"] == {} and "does not match the ledger's gate result" in data["lessons_problem"]
    (gen_dir / "eval.json").unlink()
    out = run(main, ["ledger", "show", "1"], catch_exceptions=False)
    assert out.exit_code == 0 and "no " in out.output and "eval.json on this machine" in " ".join(out.output.split())


def test_an_eval_json_from_before_the_lessons_details_still_shows(result, tmp_path):
    report = json.loads(json.dumps(result.to_dict()))
    for side in ("child", "parent"):
        for item in report[side]["details"]["preference_margin"]["items"]:
            del item["answer"]  # measured before each model's own answer was asked
        for item in report[side]["details"]["probe_recall"]["items"]:
            del item["answers"]
    found = {u.name: items for u, items in gate.report_lessons(report)}
    assert found["preference_margin"][0].child_reply is None and found["probe_recall"][0].wanted == "-"
    gate.write_report(gate.GateResult(result.verdict, result.reasons, gate.ModelEval.from_dict(report["child"]),
                                      gate.ModelEval.from_dict(report["parent"]), {}, result.checks), tmp_path, TABLE)
    assert "## Lessons: held-out rated replies" in (tmp_path / "eval.md").read_text()


def test_untrusted_text_helpers():
    assert one_line("a\r\nb\tc\x07", 20) == "a⏎b c\\x07"
    assert one_line("x" * 30, 10) == "x" * 9 + "…" and one_line("   ") == "(empty)" and one_line(None) == "-"
    assert terminal("\x1b]0;title\x07\u2028end") == "\\x1b]0;title\\x07\\u2028end"
    assert markdown_cell("a|b `c` <i>&") == "a\\|b \\`c\\` &lt;i&gt;&amp;"
    assert markdown_cell("~~s~~ _e_ \\") == "\\~\\~s\\~\\~ \\_e\\_ \\\\"


def test_lessons_of_a_metric_with_too_few_items_to_count_are_shown(result, ledger):
    """experience_similarity with fewer than ``min_experience_items`` asks its items but has no value: eval.json and
    the ledger both hold None, which is agreement, not a mismatch (the new-user walk's ``ledger show 1`` hid them)."""
    result.child.metrics["experience_similarity"] = None
    gen_dir = DataRoot.from_env().gen_dir(1)
    gen_dir.mkdir(parents=True)
    gate.write_report(result, gen_dir, TABLE)
    _record(ledger, result, gen_dir)
    data = json.loads(CliRunner().invoke(main, ["ledger", "show", "1", "--json"], catch_exceptions=False).output)
    assert data["lessons_problem"] is None
    assert data["lessons"]["experience_similarity"][0]["child_reply"] == DOG
