"""Task adapters end to end (``evolution.tasks``): a task's rows kept apart, an adapter trained, gated, exported,
recorded and served as ``evolution:TASK``; a failed one replaced by the previous adapter where that still passes.

The lineage (built once for the module, about a minute): ``taught_base`` (whose generations pass the gate), a task
``pirate`` taught four "Arr, ..." transcripts and one probe. Generation 1 trains an adapter that learns them (its
``recall_tolerance`` is 1: the tests' 2-layer model cannot keep its four facts and a new style apart, a real one
measures it); four more rows come in, and generation 2's adapter is trained one step (it learns nothing, and fails
``min_gain``), so generation 2 carries generation 1's, gated on it first.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from evolution.intake import Intake
from evolution.ledger import Ledger
from evolution.ledger import events as ev
from evolution.paths import DataRoot
from tests.conftest import SERVER_TOKEN, make_daemon_cfg, make_tiny_cfg, make_tiny_curriculum

PIRATE = [("Tell me about the sea.", "Arr, the sea be wide, matey!"),
          ("What is the weather like?", "Arr, a fair wind, matey!"),
          ("Do you like ships?", "Arr, I love ships, matey!"),
          ("Where are we going?", "Arr, to the island, matey!")]
MORE = [("Any treasure?", "Arr, gold aplenty, matey!"), ("Who is the captain?", "Arr, I be the captain, matey!"),
        ("Is it late?", "Arr, the moon be up, matey!"), ("Are you hungry?", "Arr, hungry as a shark, matey!")]


def _transcript(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def _task_cfg(home):
    cfg = make_daemon_cfg(make_tiny_cfg(make_tiny_curriculum(home.parent / f"{home.name}-curriculum")))
    cfg.train.lora_r, cfg.train.lora_alpha = 16, 32
    t = cfg.tasks
    t.names, t.min_rows, t.max_steps, t.epochs, t.lr, t.rehearse, t.recall_tolerance = \
        ["pirate", "terse"], 3, 200, 500.0, 5e-3, 1.0, 1.0
    return cfg


@pytest.fixture(scope="module")
def task_lineage(tmp_path_factory, taught_base):
    from tests.lineage_util import grow

    home = tmp_path_factory.mktemp("tasks")
    cfg = _task_cfg(home)
    root = DataRoot(home / "root")
    with Ledger.open(root.prepare()) as ledger:
        intake = Intake(ledger)
        for q, a in PIRATE:
            intake.conversations.add(_transcript(q, a), task="pirate")
        intake.probes.add("Do you like ships?", ["Arr"], task="pirate")
        first = grow(root, cfg, ledger, base=taught_base)
        for q, a in MORE:
            intake.conversations.add(_transcript(q, a), task="pirate")
        cfg.tasks.max_steps = 1
        second = grow(root, cfg, ledger, base=taught_base)
        cfg.tasks.max_steps = 200
    return root, cfg, first, second


def test_a_tasks_rows_are_kept_out_of_the_lineages_own_training_and_probes(ledger):
    intake = Intake(ledger)
    intake.conversations.add(_transcript("Hi?", "Hello."))
    intake.conversations.add(_transcript(*PIRATE[0]), task="pirate")
    intake.probes.add("Do you like ships?", ["Arr"], task="pirate")
    intake.probes.add("What is my name?", ["Ada"])
    eid = intake.experiences.capture(_transcript(*PIRATE[1])[:1], "Fine.", "chatcmpl-t1", "evolution-gen-0001:pirate",
                                     "0" * 64, 1, "stop", False, task="pirate")
    intake.experiences.rate("chatcmpl-t1", "bad", correction=PIRATE[1][1])
    own, task = intake.inbox(), intake.inbox(task="pirate")
    assert [m[-1]["content"] for _, m in own.conversations] == ["Hello."]
    assert own.pairs == [] and own.probes == ["What is my name?"]
    assert [m[-1]["content"] for _, m in task.conversations] == [PIRATE[0][1]]
    assert [p.chosen for p in task.pairs] == [PIRATE[1][1]] and task.probes == ["Do you like ships?"]
    assert [i["question"] for i in intake.probes.items()] == ["What is my name?"]  # the lineage's gate asks these
    assert eid and intake.inbox(task="terse").conversations == []


def test_an_adapter_is_trained_gated_exported_and_recorded_per_task(task_lineage):
    root, cfg, first, _ = task_lineage
    out = first.tasks["pirate"]
    assert first.verdict == "pass" and out["verdict"] == ev.PASS, out
    assert out["trained_on"] == 1 and out["trained_rows"] == 4 and out["training"]["steps"] > 0
    w, wo = out["metrics"]["with"], out["metrics"]["without"]
    assert w["taught_similarity"] - wo["taught_similarity"] >= cfg.tasks.min_gain  # it learned the task's replies
    assert w["probe_recall"] == 1.0 and wo["probe_recall"] == 0.0  # and answers its probe, which the child did not
    path = root.gen_dir(1) / "tasks" / "pirate.gguf"
    with Ledger.open(root) as ledger:
        arts = {a["path"]: a for a in ledger.generation(1).artifacts}
        recorded = arts[path.relative_to(root.root).as_posix()]
        assert recorded["kind"] == "task_adapter" and recorded["sha256"] == out["sha256"]
        events = ledger.entries(gen=1, kind=ev.TASK_ADAPTER)
    from evolution.fsutil import sha256_file

    assert sha256_file(path) == out["sha256"]
    assert [(e.payload["task"], e.payload["verdict"], e.payload["sha256"]) for e in events] == \
        [("pirate", "pass", out["sha256"])]  # "terse" had nothing to train: no event
    assert first.tasks["terse"]["verdict"] == "none" and "tasks.min_rows" in first.tasks["terse"]["reasons"][0]


def test_the_ledger_show_and_the_dashboard_list_a_generations_task_adapters(task_lineage, monkeypatch):
    from click.testing import CliRunner

    from evolution.cli import main
    from evolution.dashboard import View

    root, _, _, second = task_lineage
    monkeypatch.setenv("EVOLUTION_HOME", str(root.root))
    status = CliRunner().invoke(main, ["status"], catch_exceptions=False).output
    assert "task pirate:" in status and "8 taught rows, 1 probes; adapter: generation 2's (" in status
    shown = CliRunner().invoke(main, ["ledger", "show", "2"], catch_exceptions=False, env={"COLUMNS": "400"}).output
    assert "task adapters" in shown and "pirate" in shown and "tasks.min_gain" in shown
    assert "carried the adapter trained on generation 1" in shown
    with Ledger.open(root) as ledger:
        view = View(root, ledger, Intake(ledger))
        rows = {r["gen"]: r for r in view.lineage()["generations"]}
        assert rows[1]["tasks"] == {"pirate": "pass"} and rows[2]["tasks"] == {"pirate": "pass"}
        gen2 = view.generation(2)["tasks"]
    assert [(t["task"], t["verdict"], t["trained_on"]) for t in gen2] == [("pirate", "pass", 1)]
    assert gen2[0]["sha256"] == second.tasks["pirate"]["sha256"]


def test_a_failed_adapter_gives_way_to_the_previous_one_where_that_still_passes(task_lineage):
    root, _, first, second = task_lineage
    out = second.tasks["pirate"]
    assert [(t["adapter"], t["passed"]) for t in out["tried"]] == [("trained", False), ("carried", True)]
    assert "tasks.min_gain" in out["tried"][0]["reasons"][0]
    assert out["verdict"] == "pass" and out["trained_on"] == 1 and out["trained_rows"] == 4
    assert out["reasons"][-1] == "carried the adapter trained on generation 1"
    assert out["sha256"] == first.tasks["pirate"]["sha256"]  # the same adapter, now gated on generation 2 too
    assert (root.gen_dir(2) / "tasks" / "pirate.gguf").read_bytes() == (root.gen_dir(1) / "tasks" /
                                                                         "pirate.gguf").read_bytes()


@pytest.fixture
def task_daemon(task_lineage, tmp_path, monkeypatch):
    from evolution.config import DaemonConfig
    from evolution.daemon import Daemon

    src, cfg, _, _ = task_lineage
    root = DataRoot(tmp_path / "root")
    shutil.copytree(src.root, root.root)
    monkeypatch.setenv("EVOLUTION_HOME", str(root.root))

    def make():
        d = Daemon(root, cfg, DaemonConfig(api_token=SERVER_TOKEN, threshold=1000))
        d.prepare()
        return d
    return root, make


def _client(d):
    from starlette.testclient import TestClient

    from evolution.server import create_app

    return TestClient(create_app(d), headers={"Authorization": f"Bearer {SERVER_TOKEN}"})


def _ask(c, model: str, q: str):
    return c.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": q}],
                                                 "temperature": 0, "max_tokens": 12})


def test_the_served_generation_answers_a_task_with_its_adapter_and_captures_the_task(task_daemon):
    root, make = task_daemon
    d = make()
    try:
        c = _client(d)
        task = _ask(c, "evolution:pirate", "Do you like ships?")
        plain = _ask(c, "evolution", "Do you like ships?")
        assert task.status_code == 200 and plain.status_code == 200
        assert "Arr" in task.json()["choices"][0]["message"]["content"]
        assert "Arr" not in plain.json()["choices"][0]["message"]["content"]
        assert task.json()["model"] == "evolution-gen-0002:pirate" and plain.json()["model"] == "evolution-gen-0002"
        streamed = c.post("/v1/chat/completions", json={"model": "evolution:pirate", "stream": True, "temperature": 0,
                                                         "max_tokens": 12,
                                                         "messages": [{"role": "user", "content": "Do you like ships?"}]})
        chunks = [json.loads(line[6:]) for line in streamed.text.splitlines()
                  if line.startswith("data: {")]
        assert {ch["model"] for ch in chunks} == {"evolution-gen-0002:pirate"}
        assert "".join((ch["choices"][0].get("delta") or {}).get("content") or "" for ch in chunks) == \
            task.json()["choices"][0]["message"]["content"]
        # "terse" has no adapter yet: the generation alone answers, and the chat is the task's (what trains one)
        terse = _ask(c, "evolution:terse", "Do you like ships?")
        assert terse.status_code == 200 and terse.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
        exps = {e.completion_id: e for e in d.intake.experiences.list()}
        assert exps[task.json()["id"]].model_id == "evolution-gen-0002:pirate"
        c.post("/feedback", json={"completion_id": terse.json()["id"], "label": "good"})
        assert len(d.intake.experiences.labelled(task="terse").examples) == 1
        assert d.intake.experiences.labelled().examples == []  # not the lineage's own
        now = c.get("/status").json()["tasks"]
        assert now["pirate"]["taught_rows"] == 8 and now["pirate"]["adapter"]["generation"] == 2
        assert now["terse"] == {"taught_rows": 1, "probes": 0, "adapter": None}  # the rated chat above
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        sha = json.loads((root.gen_dir(2) / "generation.json").read_text())["tasks"]["pirate"]["sha256"]
        assert models["evolution:pirate"]["adapters"] == [{"task": "pirate", "sha256": sha}]
        assert models["evolution:terse"]["adapters"] == []
        assert c.get("/v1/models/evolution:pirate").json()["generation"] == 2
        # bad names: each a clear error, nothing stored
        n = len(d.intake.experiences.list())
        r = _ask(c, "evolution:chess", "Hi")
        assert r.status_code == 404 and "no task 'chess'" in r.json()["error"]["message"]
        assert "pirate, terse" in r.json()["error"]["message"]
        assert _ask(c, "evolution@1:pirate", "Hi").status_code == 400
        assert _ask(c, "evolution-other:pirate", "Hi").status_code == 404
        r = c.post("/conversations", json={"messages": _transcript("a", "b"), "task": "chess"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "task"
        r = c.post("/probes", json={"question": "q?", "answers": ["a"], "task": "chess"})
        assert r.status_code == 400
        assert len(d.intake.experiences.list()) == n
        assert c.post("/conversations", json={"messages": _transcript("a", "b"), "task": "pirate"}).status_code == 201
    finally:
        d.stop()


def test_an_adapter_that_does_not_hash_right_is_refused_and_the_generation_still_serves(task_daemon):
    from evolution.fsutil import make_tree_writable

    root, make = task_daemon
    path = root.gen_dir(2) / "tasks" / "pirate.gguf"
    make_tree_writable(root.gen_dir(2))
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 8)
        f.write(b"\x00" * 8)
    d = make()
    try:
        c = _client(d)
        r = _ask(c, "evolution:pirate", "Do you like ships?")
        assert r.status_code == 409 and "pirate" in r.json()["error"]["message"]
        assert "sha256" in r.json()["error"]["message"].lower()
        assert _ask(c, "evolution", "Do you like ships?").status_code == 200
        assert "error" in {m["id"]: m for m in c.get("/v1/models").json()["data"]}["evolution:pirate"]
        # a rollback serves generation 1 with its own adapter, intact
        assert c.post("/rollback", json={"to": 1, "reason": "test"}).status_code == 200
        r = _ask(c, "evolution:pirate", "Do you like ships?")
        assert r.status_code == 200 and r.json()["model"] == "evolution-gen-0001:pirate"
        assert "Arr" in r.json()["choices"][0]["message"]["content"]
    finally:
        d.stop()


@pytest.mark.slow
def test_kill_9_in_a_task_adapters_training_or_export_resumes_there(tmp_path, taught_base):
    """``evolve age-up`` killed in the task adapter's training, then between writing its GGUF and renaming it: each
    run after resumes the ``tasks`` stage where it was, and the finished child records the adapter once."""
    import subprocess
    import sys

    from evolution import ageup
    from tests.conftest import toml_of

    home = tmp_path / "h"
    home.mkdir()
    cfg = _task_cfg(home)
    root = DataRoot(home / "root")
    with Ledger.open(root.prepare()) as ledger:
        ageup.ensure_generation_zero(root, cfg, ledger, base=taught_base)
        for q, a in PIRATE:
            Intake(ledger).conversations.add(_transcript(q, a), task="pirate")
    d = cfg.to_dict()
    d.pop("quick")
    conf = tmp_path / "evolution.toml"
    conf.write_text(toml_of(d))
    steps = cfg.train.cpt.max_steps + cfg.train.sft.max_steps  # the child's own training, before the adapter's

    def age_up(fault: str | None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "EVOLUTION_FAULTS"} | {"EVOLUTION_HOME": str(root.root)}
        env |= {"EVOLUTION_FAULTS": fault} if fault else {}
        return subprocess.run([sys.executable, "-c", "from evolution.cli import main; main()", "age-up", "--config",
                               str(conf)], env=env, capture_output=True, text=True, timeout=600)

    for fault in (f"train_step=kill@{steps + 7}", "gguf_export=kill@1"):
        r = age_up(fault)
        assert r.returncode == -9, r.stderr[-2000:]
        state = json.loads((root.staging_dir(1) / "state.json").read_text())
        assert "gate" in state["completed"] and "tasks" not in state["completed"]
        assert not (root.staging_dir(1) / "tasks" / "pirate.gguf").exists()
    r = age_up(None)
    assert r.returncode == 0, r.stderr[-2000:]
    with Ledger.open(root) as ledger:
        assert ledger.served_generation() == 1
        events = ledger.entries(gen=1, kind=ev.TASK_ADAPTER)
        assert [(e.payload["task"], e.payload["verdict"]) for e in events] == [("pirate", "pass")]
        assert ledger.verify(artifacts=True).ok
    summary = json.loads((root.gen_dir(1) / "generation.json").read_text())
    assert summary["tasks"]["pirate"]["sha256"] == events[0].payload["sha256"]


def test_a_pruned_generations_task_adapters_go_with_it_and_the_ledger_says_so(task_lineage, tmp_path):
    from evolution import retention
    from evolution.config import RetentionConfig
    from evolution.ledger import check_servable, record_rollback

    src, _, _, _ = task_lineage
    root = DataRoot(tmp_path / "root")
    shutil.copytree(src.root, root.root, symlinks=True)
    adapter = root.gen_dir(1) / "tasks" / "pirate.gguf"
    with Ledger.open(root) as ledger:
        record_rollback(ledger, 0, "test", check_servable(ledger, 0))  # 1 and 2 are now neither served nor a parent
        retention.prune(root, ledger, RetentionConfig(keep_last=1, keep_best=0))  # keeps 2 (without its weights)
        pruned = {e.gen: {a["path"] for a in e.payload["artifacts"]} for e in ledger.entries(kind=ev.PRUNED)}
        assert ledger.verify(artifacts=True).ok
    assert adapter.relative_to(root.root).as_posix() in pruned[1] and not adapter.exists()  # gone with generation 1
    assert (root.gen_dir(2) / "tasks" / "pirate.gguf").is_file()  # the kept generation keeps its adapter
    assert pruned[2] == {"checkpoints/gen_0002/hf/model.safetensors"}
