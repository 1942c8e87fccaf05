"""Learning from experience, end to end: the real daemon on the embedded model, driven over HTTP.

Slow (minutes each on 2 cores), as a chat agent uses it: chats through the official ``openai``
client, ratings and corrections through ``POST /feedback``, transcripts through ``POST
/conversations``, probes through ``POST /probes``, karma over the threshold, one age-up.

To stay cheap the data root holds a small curriculum of its own (eight general chat examples, one
recall question the base model knows) and ``evolution.toml`` trains SFT (and preference) only, for
a few steps: what the agent sends is then most of what SFT sees, so a fact taught a few times is
learned in 16 steps (about 8 epochs of it: the quick preset's one epoch of 2 steps taught the form of
the answer, "Your dog is a Greyhound.", not the name). (Today's replay trains on the raw transcript; data augmentation of experience
would change how much repetition is needed, not what these tests ask.)
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import httpx
import openai
import pytest

from evolution.ledger import Ledger
from evolution.paths import REPO_ROOT, DataRoot
from tests.daemon_util import DaemonProc

log = logging.getLogger(__name__)

DOG = "Your dog is called Bramble."
RUDE = "I will not help you with that. Figure it out yourself."


def _home(home: Path, toml: str) -> None:
    """A small curriculum for the embedded model, and the test's ``evolution.toml``, under the data root."""
    cur = home / "curriculum"
    (cur / "phase0_language").mkdir(parents=True)
    (cur / "eval").mkdir()
    language = (REPO_ROOT / "curriculum" / "phase0_language" / "sft.jsonl").read_text().splitlines()[:8]
    (cur / "phase0_language" / "sft.jsonl").write_text("\n".join(language) + "\n")
    (cur / "eval" / "recall.jsonl").write_text(json.dumps(
        {"id": "paris", "phase": 0, "question": "What is the capital of France?", "answers": ["Paris"]}) + "\n")
    (home / "evolution.toml").write_text(f'[curriculum]\npath = "{cur}"\n' + toml)


def _conversation(d: DaemonProc, user: str, assistant: str, label: str | None = None) -> int:
    body = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}
    r = httpx.post(d.url + "/conversations", headers=d.auth(), json=body | ({"label": label} if label else {}))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _feedback(d: DaemonProc, **body) -> None:
    r = httpx.post(d.url + "/feedback", headers=d.auth(), json=body)
    assert r.status_code == 201, r.text


def _age_up(d: DaemonProc) -> None:
    r = httpx.post(d.url + "/karma", headers=d.auth(), json={"amount": 1000, "reason": "a good week"})
    assert r.status_code == 201 and r.json()["triggered"] is not None, r.text


def _show(n: int, *flags: str) -> str:
    from click.testing import CliRunner

    from evolution.cli import main

    result = CliRunner().invoke(main, ["ledger", "show", str(n), *flags], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _wait_decided(d: DaemonProc) -> None:
    """Until generation 1 is served or rejected (a rejected child would otherwise be waited on to the timeout)."""
    with Ledger.open(DataRoot(d.home)) as led:
        d.wait(lambda: d.served() == 1 or led.entries(gen=1, kind="rejected"), 1500,
               "generation 1 to be served or rejected", interval=2.0)


def _lora_b_norm(adapter_dir: Path) -> float:
    from safetensors.torch import load_file

    tensors = {}
    for f in adapter_dir.glob("*.safetensors"):
        tensors |= load_file(f)
    b = [t for k, t in tensors.items() if "lora_B" in k]
    assert b, sorted(tensors)[:5]
    return float(sum(t.float().norm() for t in b))


@pytest.mark.slow
def test_ratings_and_a_taught_fact_reach_the_child_through_the_daemon(_isolated_home):
    """Issue 14: chat, rate (good, bad, a correction), age up: the child's generation ran a KTO stage and says so
    in metrics.json and `ledger show`. Issue 15: the fact taught by a correction and good transcripts is
    answered by the served child at temperature 0; eval.md and `ledger show` list each lesson."""
    t0 = time.monotonic()
    _home(_isolated_home, """experience_heldout = 0.0
[train]
stages = ["sft", "preference"]
[train.sft]
epochs = 10.0
max_steps = 16
[train.preference]
method = "kto"
epochs = 4.0
max_steps = 4
[gate]
min_probe_items = 1
""")
    d = DaemonProc(_isolated_home, "--start-gen", "0", "--quick", "--threshold", "1000").start()
    try:
        d.wait_serving(0, 900)
        client = openai.OpenAI(base_url=d.url + "/v1", api_key="not-needed", max_retries=0, timeout=120)

        def chat(question: str) -> tuple[str, str]:
            r = client.chat.completions.create(model="evolution", max_tokens=32, temperature=0,
                                               messages=[{"role": "user", "content": question}])
            return r.id, r.choices[0].message.content

        for q in ("What do bees make?", "What colour is grass?", "Name a yellow fruit."):
            _feedback(d, completion_id=chat(q)[0], label="good", karma=1)
        for q in ("Tell me a secret.", "What should I do today?", "Write one word."):
            _feedback(d, completion_id=chat(q)[0], label="bad")
        cid, before = chat("What is my dog called?")
        assert "bramble" not in before.lower(), before
        _feedback(d, completion_id=cid, label="bad", correction=DOG, karma=2)
        for q in ("What's my dog's name?", "Do you know my dog's name?", "Tell me the name of my dog."):
            _conversation(d, q, DOG, label="good")
        r = httpx.post(d.url + "/probes", headers=d.auth(),
                       json={"question": "Can you remind me what my dog is called?", "answers": ["Bramble"]})
        assert r.status_code == 201, r.text
        _age_up(d)
        _wait_decided(d)
        if d.served() != 1:
            report = json.loads((DataRoot(_isolated_home).gen_dir(1) / "eval.json").read_text())
            pytest.fail(f"generation 1 was rejected: {report['reasons']}")

        r = client.chat.completions.create(model="evolution", max_tokens=32, temperature=0,
                                           messages=[{"role": "user", "content": "What is my dog called?"}])
        assert r.model == "evolution-gen-0001"
        assert "bramble" in r.choices[0].message.content.lower(), r.choices[0].message.content
    finally:
        rc = d.stop()
    assert rc == 0, d.output()[-2000:]

    root = DataRoot(_isolated_home)
    gen1 = root.gen_dir(1)
    pref = json.loads((gen1 / "metrics.json").read_text())["preference"]
    # 3 good, 3 bad, a correction (one good and one bad reply) and 3 good transcripts: 7 good, 4 bad replies.
    assert (pref["method"], pref["skipped"], pref["steps"]) == ("kto", False, 4), pref
    # TRL's KTO logs rewards/margins only for a logged step whose batch held both labels; chosen and rejected always.
    assert {"rewards/chosen", "rewards/rejected"} <= set(pref["summary"]), pref["summary"]
    assert pref["summary"].get("grad_norm", 1.0) > 0, pref["summary"]
    assert _lora_b_norm(gen1 / "adapter") > 0  # LoRA B starts at zero: the adapter was trained

    report = json.loads((gen1 / "eval.json").read_text())
    assert report["verdict"] == "pass", report["reasons"]
    fig = report["retrieval"]  # the daemon's worker got the lineage's [retrieval]: its probe asked as chat would ask
    assert (fig["probes"], fig["backend"]) == (1, "fts5") and fig["without"] == \
        float(report["child"]["details"]["probe_recall"]["items"][0]["correct"]), fig
    lessons = {i["prompt"]: i for i in report["child"]["details"]["experience_similarity"]["items"]}
    assert "bramble" in lessons["What is my dog called?"]["reply"].lower()
    md = (gen1 / "eval.md").read_text()
    assert "## Lessons: experience" in md and "## Lessons: probes" in md and "Bramble" in md
    shown = _show(1)
    assert "preference: kto, 4 steps" in shown and "rewards/chosen" in shown and "lessons: experience" in shown
    assert "with retrieval (for information): probe recall" in shown
    shown_lessons = json.loads(_show(1, "--json"))["lessons"]
    dog = [x for x in shown_lessons["experience_similarity"] if x["asked"] == "What is my dog called?"]
    assert dog and "bramble" in dog[0]["child_reply"].lower() and dog[0]["outcome"] == "closer", dog
    assert [x["wanted"] for x in shown_lessons["probe_recall"]] == ["Bramble"]
    log.warning("eval.md of generation 1:\n%s\nledger show 1:\n%s", md, shown)
    log.warning("test took %.0f s; stages %s", time.monotonic() - t0,
                json.loads((gen1 / "generation.json").read_text())["stage_seconds"])


@pytest.mark.slow
def test_a_child_taught_the_replies_rated_bad_fails_its_gate_on_preference_margin(_isolated_home):
    """Issue 15: ten transcripts in which the assistant answers rudely are rated bad, the served model's own
    replies to the same ten questions are rated good, and twenty unrated transcripts answer with that same rude
    reply. The child trains on the unrated transcripts (SFT: it learns the reply the user rated bad); half the
    ratings are held out with their true labels (ratings that teach nothing new: a correction is never held
    out). Its preference margin on them falls far below its parent's: the gate fails on it, the child is
    rejected and not served, and the ledger says why.

    The gate rules this test is not about are relaxed in its config (recall against the one curriculum
    question, experience similarity), so ``preference_margin`` is the one rule that decides."""
    t0 = time.monotonic()
    _home(_isolated_home, """experience_heldout = 0.5
[train]
stages = ["sft"]
[gate]
min_recall = 0.0
recall_margin = "off"
experience_margin = "off"
""")
    d = DaemonProc(_isolated_home, "--start-gen", "0", "--quick", "--threshold", "1000").start()
    try:
        d.wait_serving(0, 900)
        topics = ["boil an egg", "water a basil plant", "fold a shirt", "clean a window", "store bread",
                  "tie a shoelace", "sharpen a pencil", "wash a wool jumper", "keep cut flowers fresh", "plant a bulb"]
        client = openai.OpenAI(base_url=d.url + "/v1", api_key="not-needed", max_retries=0, timeout=120)
        for topic in topics:
            _conversation(d, f"How do I {topic}?", RUDE, label="bad")
            own = client.chat.completions.create(model="evolution", max_tokens=48, temperature=0,
                                                 messages=[{"role": "user", "content": f"How do I {topic}?"}])
            _feedback(d, completion_id=own.id, label="good")
        for i in range(20):
            _conversation(d, f"Can you help me with question number {i}?", RUDE)
        _age_up(d)
        _wait_decided(d)
        assert d.served() == 0
        r = client.chat.completions.create(model="evolution", max_tokens=8,
                                           messages=[{"role": "user", "content": "How do I boil an egg?"}])
        assert r.model == "evolution-gen-0000"
    finally:
        rc = d.stop()
    assert rc == 0, d.output()[-2000:]

    root = DataRoot(_isolated_home)
    gen1 = root.gen_dir(1)
    report = json.loads((gen1 / "eval.json").read_text())
    assert report["verdict"] == "fail"
    assert len(report["reasons"]) == 1 and report["reasons"][0].startswith("preference_margin "), report["reasons"]
    child, parent = report["metrics"]["preference_margin"], report["parent"]["metrics"]["preference_margin"]
    assert child < parent - 0.05, (child, parent)
    held = report["child"]["details"]["preference_margin"]["items"]
    assert len(held) == 10 and 0 < sum(i["good"] for i in held) < 10  # half of the 20 ratings: both labels
    with Ledger.open(root) as led:
        assert led.served_generation() == 0
        [rejected] = led.entries(gen=1, kind="rejected")
        assert "preference_margin" in rejected.payload["reason"]
        assert led.verify().ok
    md = (gen1 / "eval.md").read_text()
    assert "**Verdict: FAIL**" in md and "## Lessons: held-out rated replies" in md
    shown = _show(1)
    assert "rejected" in shown and "preference_margin" in shown and "lessons: held-out rated replies" in shown
    held_shown = json.loads(_show(1, "--json"))["lessons"]["preference_margin"]
    rude = [x for x in held_shown if x["wanted"] == f"bad: {RUDE}"]
    assert rude and all(x["outcome"] == "worse" for x in rude), rude  # the rude reply grew likelier
    log.warning("eval.md of generation 1:\n%s\nledger show 1:\n%s", md, shown)
    log.warning("test took %.0f s; margin child %.3f parent %.3f; stages %s", time.monotonic() - t0, child, parent,
                json.loads((gen1 / "generation.json").read_text())["stage_seconds"])
