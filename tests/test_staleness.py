"""Staleness (``evolution.staleness``): drift of the served generation measured without retrieval, and an age-up
requested in the ledger, with its reason, when it passes the threshold — at most once per cool-down. In process,
on the tiny model's GGUF (it knows none of what is taught here, so its drift is real)."""

from __future__ import annotations

import json

import pytest

from evolution import config
from evolution.config import StalenessConfig
from evolution.errors import ConfigError
from evolution.intake.karma import PENDING
from evolution.ledger import events as ev
from tests.conftest import SERVER_TOKEN, toml_of

AUTH = {"Authorization": f"Bearer {SERVER_TOKEN}"}


def teach(daemon, n: int) -> None:
    for i in range(n):
        daemon.add_conversation([{"role": "user", "content": f"What is the code of locker {i}?"},
                                 {"role": "assistant", "content": f"Locker {i} opens with Zephyr{i}."}], None, "good")


def test_drift_past_the_threshold_requests_one_age_up_with_its_reason(daemon):
    daemon.staleness_cfg = StalenessConfig(threshold=0.5, min_items=3, cooldown_s=3600)
    teach(daemon, 4)
    before = daemon.intake.karma.state()
    drift = daemon.check_staleness()
    assert drift.asked == {"pending": 4} and drift.wrong == {"pending": 4} and drift.drift == 1.0
    assert drift.requested is not None
    [event] = daemon.ledger.entries(kind=ev.STALE)
    assert event.payload["reason"].startswith("stale: 4 of 4 asked answered wrong without retrieval")
    assert event.payload["request"] == drift.requested and event.gen == daemon.ledger.served_generation()
    after = daemon.intake.karma.state()
    assert after.open_request.id == drift.requested and after.open_request.status == PENDING
    assert after.progress == before.progress and after.threshold == before.threshold  # no karma spent
    # an age-up is queued: nothing to measure until it is decided; then the cool-down holds
    assert daemon.check_staleness() is None
    daemon.intake.karma.mark(drift.requested, "done", None, "finished without a new generation")
    again = daemon.check_staleness()
    assert again.requested is None and "cooldown_s" in again.why_not
    assert len(daemon.ledger.entries(kind=ev.STALE)) == 1


def test_retrieval_does_not_hide_drift_and_few_items_request_nothing(client, daemon):
    daemon.staleness_cfg = StalenessConfig(threshold=0.5, min_items=3)
    teach(daemon, 2)
    drift = daemon.check_staleness()
    assert drift.items == 2 and drift.requested is None and "min_items" in drift.why_not
    assert daemon.intake.karma.state().open_request is None and not daemon.ledger.entries(kind=ev.STALE)
    # the status, the metrics and the CLI show it
    s = client.get("/status").json()["staleness"]
    assert s["enabled"] and s["last_check"]["drift"] == 1.0 and s["last_check"]["items"] == 2
    assert "evolution_staleness_drift 1.0" in client.get("/metrics").text


def test_a_changed_source_counts_and_a_missing_one_is_a_clear_error(daemon, tmp_path):
    conventions = daemon.root.home / "conventions.md"
    conventions.write_text("Commit messages are in the imperative.\n")
    daemon.staleness_cfg = StalenessConfig(sources=["conventions.md"], min_items=1, threshold=1.0)
    first = daemon.check_staleness()
    assert first.changed_sources == [] and first.items == 0
    conventions.write_text("Commit messages are in the past tense.\n")
    second = daemon.check_staleness()
    assert second.changed_sources == [str(conventions)] and second.drift == 1.0 and second.requested is not None
    assert "conventions.md" in daemon.ledger.entries(kind=ev.STALE)[-1].payload["reason"]
    from evolution import staleness

    with pytest.raises(ConfigError, match="nope.md does not exist"):
        staleness.check_sources(daemon.root, StalenessConfig(sources=["nope.md"]))


def test_a_changed_curriculum_item_is_asked(daemon, tmp_path):
    import shutil

    from evolution import staleness

    served = daemon.ledger.served_generation()
    cur = tmp_path / "curriculum"
    shutil.copytree(daemon.cfg.curriculum.path, cur)
    recall = cur / "eval" / "recall.jsonl"
    with recall.open("a") as f:
        f.write(json.dumps({"id": "new1", "phase": 1, "question": "What is the lighthouse keeper's name?",
                            "answers": ["Odalys"]}) + "\n")
    asked = []
    drift = staleness.check(daemon.root, daemon.ledger, daemon.intake, StalenessConfig(min_items=1), cur, served,
                            lambda q: asked.append(q) or "I do not know.", request=False)
    assert asked == ["What is the lighthouse keeper's name?"] and drift.wrong == {"curriculum": 1}
    assert drift.requested is None and drift.why_not == "not requested (measured only)"


@pytest.mark.parametrize("section, fragment", [
    ({"threshold": 0}, "threshold"), ({"threshold": 1.5}, "threshold"), ({"sources": "notes.md"}, "sources"),
    ({"min_items": 0}, "min_items"), ({"check_every_s": 1}, "check_every_s"), ({"cooldown_s": -1}, "cooldown"),
    ({"enabled": 1}, "enabled")])
def test_bad_staleness_settings_are_clear_errors(tmp_path, section, fragment):
    toml = tmp_path / "evolution.toml"
    toml.write_text(toml_of({"staleness": section}))
    with pytest.raises(ConfigError, match=fragment):
        config.resolve_staleness(toml)
