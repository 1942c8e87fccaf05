"""Several lineages on one ledger: the m006 migration, one chain over every lineage, per-lineage karma,
transcripts, experiences and probes, the `--lineage` option, `evolve ledger --all` / `show NAME/N`, model
ids routed by lineage, two data roots sharing one PostgreSQL ledger, and (slow) two lineages aging up."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from evolution.cli import main
from evolution.intake.conversations import ConversationStore
from evolution.errors import ConfigError, ConversationKeyReused, KarmaKeyReused, UnknownGeneration
from evolution.intake.experiences import ExperienceStore
from evolution.intake.karma import Karma
from evolution.ledger import KARMA_THRESHOLD_CROSSED, Ledger, events, migrations, rollback
from evolution.ledger.chain import GENESIS, entry_hash
from evolution.ledger.head import Head, write_head
from evolution.paths import DataRoot, check_lineage
from evolution.intake.probes import ProbeStore
from evolution.serving import model_alias, model_id, parse_model
from tests.ledger.conftest import add_generation, backend, data_root, ledger_url, tamper  # noqa: F401  (fixtures)


def _two(data_root, ledger_url):
    """``main`` with generations 0, 1 (served 1); ``deacon`` with 0, 1 passed, 2 rejected — interleaved."""
    main_led = Ledger.open(data_root, ledger_url)
    deacon_root = data_root.for_lineage("deacon").prepare()
    deacon = main_led.view("deacon")
    add_generation(main_led, data_root, 0, None, None)
    add_generation(deacon, deacon_root, 0, None, None)
    add_generation(deacon, deacon_root, 1, 0, "pass")
    add_generation(main_led, data_root, 1, 0, "pass")
    add_generation(deacon, deacon_root, 2, 1, "fail")
    return main_led, deacon, deacon_root


# -- layout --------------------------------------------------------------------------------------


def test_main_keeps_todays_paths_and_another_lineage_has_its_own_folder(tmp_path, monkeypatch):
    root = DataRoot(tmp_path)
    assert (root.lineage, root.home, root.checkpoints, root.logs, root.ledger_dir) == \
        ("main", tmp_path, tmp_path / "checkpoints", tmp_path / "logs", tmp_path / "ledger")
    d = root.for_lineage("deacon").prepare()
    assert d.home == tmp_path / "lineages" / "deacon"
    assert d.checkpoints == tmp_path / "lineages" / "deacon" / "checkpoints" and d.checkpoints.is_dir()
    assert d.ledger_dir == root.ledger_dir  # one ledger database per data root
    assert root.lineage_dirs() == ["deacon"]
    monkeypatch.setenv("EVOLUTION_LINEAGE", "witness")
    assert DataRoot.from_env(tmp_path).lineage == "witness"
    assert DataRoot.from_env(tmp_path, "crew").lineage == "crew"
    for bad in ("Main", "", "a/b", "../x", "x" * 41, "deacon-gen-3", "9lives"):
        with pytest.raises(ConfigError, match="lineage name"):
            check_lineage(bad)


def test_model_ids_name_their_lineage():
    assert (model_id(3), model_id(3, "deacon")) == ("evolution-gen-0003", "evolution-deacon-gen-0003")
    assert (model_alias(), model_alias("deacon")) == ("evolution", "evolution-deacon")
    assert parse_model("evolution") == ("main", None)
    assert parse_model("evolution-gen-0003") == ("main", 3)
    assert parse_model("evolution-deacon") == ("deacon", None)
    assert parse_model("evolution-deacon-gen-0002") == ("deacon", 2)
    assert [parse_model(n) for n in ("gpt-4", "evolutionary", "evolution-Deacon", None)] == [None] * 4


# -- the migration --------------------------------------------------------------------------------


def test_m006_upgrades_a_ledger_created_at_version_5(data_root, ledger_url, monkeypatch):
    monkeypatch.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:5])
    monkeypatch.setattr(migrations, "LATEST", 5)
    with Ledger.open(data_root, ledger_url) as led:
        prev = GENESIS
        with led.transaction() as txn:  # rows as today's code writes them: no lineage anywhere
            for seq, (kind, gen, payload) in enumerate([("promoted", 0, {}), ("karma_threshold_crossed", None,
                                                        {"karma": 5, "threshold": 5})], start=1):
                t = f"2026-01-01T00:00:0{seq}.000000+00:00"
                h = entry_hash(prev, seq, t, kind, gen, payload)
                txn.conn.execute(text("INSERT INTO ledger_entries (seq, time, kind, gen, payload, prev_hash, entry_hash)"
                                      " VALUES (:s, :t, :k, :g, :p, :prev, :h)"),
                                 {"s": seq, "t": t, "k": kind, "g": gen, "p": json.dumps(payload, separators=(",", ":")),
                                  "prev": prev, "h": h})
                prev = h
            txn.conn.execute(text("INSERT INTO karma_events (time, amount, reason, idem_key, source)"
                                  " VALUES ('t', 5, 'old', 'k1', 'cli')"))
            txn.conn.execute(text("INSERT INTO ageup_requests (time, karma, threshold, status) VALUES ('t', 5, 5, 'done')"))
            txn.conn.execute(text("INSERT INTO probes (time, idem_key, question, answers, redactions, sha256)"
                                  " VALUES ('t', NULL, 'Q?', '[\"A\"]', '{}', 'x')"))
        write_head(led.head_path, Head(2, prev, led.url))
    monkeypatch.undo()
    with Ledger.open(data_root, ledger_url) as led:
        with led.reading() as conn:
            assert conn.execute(text("SELECT MAX(version) FROM ledger_schema")).scalar_one() == migrations.LATEST
        report = led.verify()
        assert report.ok, report.problems
        assert led.lineages() == ["main"] and led.served_generation() == 0
        assert [e.lineage for e in led.entries()] == ["main", "main"]
        k = Karma(led, 5)
        assert (k.state().total, [r.lineage for r in k.requests()]) == (5.0, ["main"])
        assert ProbeStore(led).count() == 1
        deacon = led.view("deacon")
        assert Karma(deacon, 5).state().total == 0 and ProbeStore(deacon).count() == 0 and deacon.served_generation() is None
        assert deacon.record(events.promoted(0)).lineage == "deacon"
        assert led.verify().ok and led.lineages() == ["main", "deacon"] and led.served_generation() == 0


# -- one chain, separate lineages ----------------------------------------------------------------


def test_lineages_share_one_chain_and_each_reads_only_its_own(data_root, ledger_url):
    main_led, deacon, deacon_root = _two(data_root, ledger_url)
    try:
        assert main_led.lineages() == ["main", "deacon"]
        assert main_led.served_generation() == 1 and deacon.served_generation() == 1
        assert [g.gen for g in main_led.history()] == [0, 1]
        assert [(g.gen, g.status) for g in deacon.history()] == [(0, "promoted"), (1, "promoted"), (2, "rejected")]
        assert deacon.generation(1).gguf["path"] == "lineages/deacon/checkpoints/gen_0001/model.gguf"
        with pytest.raises(UnknownGeneration, match="lineage deacon: generation 7"):
            deacon.generation(7)
        seqs = sorted(e.seq for e in main_led.entries() + deacon.entries())
        assert seqs == list(range(1, len(seqs) + 1))  # one global order, no gaps
        report = main_led.verify()
        assert report.ok, report.problems
        assert report.entries == len(seqs) and report.artifacts_checked == 5  # both lineages' GGUFs re-hashed
        # A rollback of one lineage leaves the other's served generation alone.
        entry = rollback(deacon, 0, "deacon regressed")
        assert entry.lineage == "deacon" and deacon.served_generation() == 0 and main_led.served_generation() == 1
        assert main_led.verify().ok
    finally:
        main_led.close()


def test_a_changed_lineage_or_artifact_of_another_lineage_fails_verify(data_root, ledger_url, tamper):
    main_led, deacon, deacon_root = _two(data_root, ledger_url)
    try:
        moved = deacon.entries(kind="promoted")[-1].seq
        tamper(f"UPDATE ledger_entries SET lineage = 'main' WHERE seq = {moved}")  # deacon's promotion passed off as main's
        report = main_led.verify(artifacts=False)
        assert [(p.seq, p.what) for p in report.problems] == [(moved, "edited")]
        tamper(f"UPDATE ledger_entries SET lineage = 'deacon' WHERE seq = {moved}")
        assert main_led.verify().ok
        (deacon_root.gen_dir(1) / "model.gguf").chmod(0o644)
        (deacon_root.gen_dir(1) / "model.gguf").write_bytes(b"swapped")
        report = main_led.verify()
        assert [p.what for p in report.problems] == ["artifact_changed"]
        assert "generation deacon/1" in report.problems[0].message
    finally:
        main_led.close()


def test_a_lineage_held_on_another_data_root_is_a_warning_not_a_problem(data_root, ledger_url):
    main_led, deacon, deacon_root = _two(data_root, ledger_url)
    try:
        shutil.rmtree(deacon_root.home)  # as a second machine sees it: deacon's files are on the first
        report = main_led.verify()
        assert report.ok, report.problems
        assert any("lineage deacon has no folder" in w for w in report.warnings)
    finally:
        main_led.close()


def test_karma_transcripts_experiences_and_probes_are_per_lineage(data_root, ledger_url):
    with Ledger.open(data_root, ledger_url) as led:
        deacon = led.view("deacon")
        km, kd = Karma(led, 10), Karma(deacon, 4)
        km.add(3, key="a")
        g = kd.add(5, key="b")
        assert g.triggered is not None and g.triggered.lineage == "deacon"
        assert (km.state().total, kd.state().total) == (3.0, 5.0)
        assert km.state().open_request is None and [r.lineage for r in kd.requests()] == ["deacon"]
        assert km.add(3, key="a").duplicate
        with pytest.raises(KarmaKeyReused, match="lineage 'main'"):
            kd.add(3, key="a")
        assert [e.lineage for e in led.entries(kind=KARMA_THRESHOLD_CROSSED)] == []
        assert len(deacon.entries(kind=KARMA_THRESHOLD_CROSSED)) == 1
        cm, cd = ConversationStore(led), ConversationStore(deacon)
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
        cid = cd.add(msgs, "c1").id
        assert cm.count()[0] == 0 and cd.count()[0] == 1 and cm.after(0) == [] and cd.after(0) == [(cid, msgs)]
        with pytest.raises(ConversationKeyReused):
            cm.add(msgs, "c1")
        em, ed = ExperienceStore(led), ExperienceStore(deacon)
        ed.capture(msgs[:1], "yo", "chatcmpl-1", "evolution-deacon-gen-0000", "0" * 64, 0, "stop", False)
        assert em.counts()["experiences"] == 0 and ed.counts()["experiences"] == 1
        with pytest.raises(Exception, match="no served completion"):
            em.rate("chatcmpl-1", "good")
        assert ed.rate("chatcmpl-1", "good").label == "good"
        assert len(ed.labelled().examples) == 1 and em.labelled().examples == []
        ProbeStore(deacon).add("What is 2+2?", ["4"], None)
        assert ProbeStore(led).items() == [] and len(ProbeStore(deacon).items()) == 1


# -- two data roots, one PostgreSQL ledger ---------------------------------------------------------

GRANTS, THRESHOLD = 40, 10


def _grant_many(home: str, lineage: str, url: str, worker: int, barrier) -> None:
    led = Ledger.open(DataRoot(Path(home), lineage), url)
    k = Karma(led, THRESHOLD)
    barrier.wait()
    for i in range(GRANTS):
        k.add(1, reason=f"w{worker}", key=f"{lineage}-{worker}-{i}")
        if i % 10 == 0:  # a repeated request counts once
            k.add(1, reason=f"w{worker}", key=f"{lineage}-{worker}-{i}")
        req = k.state().open_request
        if req is not None:  # the age-up it asked for is done at once, so the next threshold can be crossed
            k.mark(req.id, "done")
    led.close()


def test_two_data_roots_share_one_postgresql_ledger_and_karma_stays_exact(tmp_path, ledger_url, backend):
    if backend != "postgresql":
        pytest.skip("a ledger shared by two data roots is a PostgreSQL one")
    homes = {"witness": tmp_path / "machine-a", "polecat": tmp_path / "machine-b"}
    for lineage, home in homes.items():
        Ledger.open(DataRoot(home, lineage).prepare(), ledger_url).close()
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_grant_many, args=(str(home), lineage, ledger_url, w, barrier))
             for lineage, home in homes.items() for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * 4
    for lineage, home in homes.items():
        with Ledger.open(DataRoot(home, lineage), ledger_url) as led:
            k = Karma(led, THRESHOLD)
            assert k.state().total == 2 * GRANTS  # every grant once, none of the other lineage's
            assert len(k.requests()) == 2 * GRANTS // THRESHOLD
            assert len(led.entries(kind=KARMA_THRESHOLD_CROSSED)) == 2 * GRANTS // THRESHOLD
            report = led.verify()
            assert report.ok, report.problems
            assert led.lineages() == ["polecat", "witness"]


# -- the command line -------------------------------------------------------------------------------


def test_cli_lineage_option_registry_and_show(data_root, ledger_url):
    main_led, deacon, _ = _two(data_root, ledger_url)
    main_led.close()
    runner = CliRunner()
    env = {"EVOLUTION_LINEAGE": None} | ({"EVOLUTION_LEDGER_URL": ledger_url} if ledger_url else {})

    def evolve(*args):  # each call a fresh process's environment: `--lineage` sets EVOLUTION_LINEAGE
        return runner.invoke(main, list(args), env=env, catch_exceptions=False)

    out = evolve("ledger", "--all", "--json")
    assert out.exit_code == 0, out.output
    rows = {r["lineage"]: r for r in json.loads(out.output)["lineages"]}
    assert (rows["main"]["served"], rows["deacon"]["served"], rows["deacon"]["generations"]) == (1, 1, 3)
    assert rows["deacon"]["latest_status"] == "rejected" and rows["deacon"]["paused"] is None
    table = evolve("ledger", "--all").output
    assert "deacon" in table and "main" in table and "serving" in table
    shown = json.loads(evolve("ledger", "show", "deacon/2", "--json").output)
    assert shown["status"] == "rejected" and all(e["lineage"] == "deacon" for e in shown["events"])
    assert json.loads(evolve("ledger", "--lineage", "deacon", "--json").output)["served"] == 1
    assert json.loads(evolve("ledger", "--json").output)["served"] == 1
    out = evolve("rollback", "--to", "0", "--lineage", "deacon")
    assert out.exit_code == 0, out.output
    assert json.loads(evolve("ledger", "--json", "--lineage", "deacon").output)["served"] == 0
    assert json.loads(evolve("ledger", "--json").output)["served"] == 1  # main untouched
    assert evolve("karma", "add", "2", "--lineage", "deacon").exit_code == 0
    assert json.loads(evolve("karma", "--json", "--lineage", "deacon").output)["total"] == 2
    assert json.loads(evolve("karma", "--json").output)["total"] == 0
    status = json.loads(evolve("--lineage", "deacon", "status", "--json").output)
    assert status["lineage"] == "deacon" and status["served_generation"] == 0
    bad = evolve("ledger", "show", "deacon/x")
    assert bad.exit_code == 2 and "give N or LINEAGE/N" in bad.output
    bad = evolve("status", "--lineage", "Deacon")
    assert bad.exit_code == 2 and "lineage name 'Deacon' is not valid" in bad.output
    assert evolve("ledger", "verify").exit_code == 0


# -- age-ups ------------------------------------------------------------------------------------------


def test_age_ups_of_two_lineages_queue_one_at_a_time(tmp_path):
    import threading

    from evolution import ageup
    from evolution.errors import EvolutionError

    main_root, deacon_root = DataRoot(tmp_path), DataRoot(tmp_path, "deacon")
    order: list[str] = []
    entered = threading.Event()

    def deacon_ageup():
        with ageup._lock(deacon_root):
            entered.set()
            order.append("deacon")

    with ageup._lock(main_root):
        with pytest.raises(EvolutionError, match=r"another age-up \(or a prune\) is running"):  # same lineage: refused
            with ageup._lock(main_root):
                pass
        t = threading.Thread(target=deacon_ageup)
        t.start()
        assert not entered.wait(1.5)  # another lineage: waits its turn
        order.append("main")
    t.join(10)
    assert order == ["main", "deacon"]


@pytest.mark.slow
def test_two_lineages_age_up_independently_and_one_daemon_serves_both(tmp_path, taught_base):
    """One age-up per lineage on one data root; one daemon process serves both, routed by the ``model``
    field; chats to both never fail while one rolls back (a hot-swap) or is unloaded for idling and
    loaded again; the other lineage's served model and karma are untouched."""
    import threading
    import time

    import httpx

    from evolution.config import DaemonConfig
    from evolution.daemon import Daemon
    from evolution.daemon.entry import app_for
    from tests.conftest import SERVER_TOKEN, make_daemon_cfg, make_tiny_cfg, make_tiny_curriculum
    from tests.daemon_util import serving_app
    from tests.lineage_util import grow

    cfg = make_daemon_cfg(make_tiny_cfg(make_tiny_curriculum(tmp_path / "curriculum")))
    roots = {name: DataRoot(tmp_path / "root", name).prepare() for name in ("main", "deacon")}
    seeds = {"main": cfg.train.seed, "deacon": cfg.train.seed + 1}  # training is seeded: another model per role
    with Ledger.open(roots["main"]) as led:
        for name, root in roots.items():
            cfg.train.seed = seeds[name]
            grow(root, cfg, led.view(name), base=taught_base)
        assert (led.served_generation(), led.view("deacon").served_generation()) == (1, 1)
        report = led.verify()
        assert report.ok, report.problems
        gguf = {n: led.view(n).generation(1).gguf for n in roots}
    assert gguf["main"]["path"].startswith("checkpoints/gen_0001/")
    assert gguf["deacon"]["path"].startswith("lineages/deacon/checkpoints/gen_0001/")
    assert gguf["main"]["sha256"] != gguf["deacon"]["sha256"]

    auth = {"Authorization": f"Bearer {SERVER_TOKEN}"}
    ask = {"messages": [{"role": "user", "content": "What is your name?"}], "max_tokens": 8, "temperature": 0}
    daemons = {n: Daemon(r, cfg, DaemonConfig(api_token=SERVER_TOKEN, threshold=1000, idle_unload_s=3600))
               for n, r in roots.items()}
    try:
        for d in daemons.values():
            d.prepare()
        assert all(d.host.current is None for d in daemons.values())  # loaded on first use
        with serving_app(app_for(list(daemons.values()))) as url, \
                httpx.Client(base_url=url, headers=auth, timeout=60) as c:
            listed = c.get("/v1/models").json()["data"]
            assert [(m["id"], m["loaded"]) for m in listed] == [
                ("evolution-gen-0001", False), ("evolution-deacon-gen-0001", False), ("evolution@0", False),
                ("evolution@1", False), ("evolution-deacon@0", False), ("evolution-deacon@1", False)]
            assert c.get("/health").json() == {"status": "ok", "served_generation": 1, "model": "evolution-gen-0001",
                                               "loaded": False}
            r = c.post("/v1/chat/completions", json=ask | {"model": "evolution-deacon"})
            assert r.status_code == 200 and r.json()["model"] == "evolution-deacon-gen-0001"
            assert daemons["main"].host.current is None and daemons["deacon"].host.current is not None
            assert c.post("/v1/chat/completions", json=ask).json()["model"] == "evolution-gen-0001"
            r = c.post("/v1/chat/completions", json=ask | {"model": "evolution-deacon@0"})  # by name, to its lineage
            assert r.status_code == 200 and r.json()["model"] == "evolution-deacon-gen-0000"
            assert daemons["deacon"].older.loaded() == [0] and daemons["main"].older.loaded() == []
            for other, fragment in (("evolution-witness", "not served here"),
                                    ("evolution-deacon-gen-0000", "not the served generation")):
                r = c.post("/v1/chat/completions", json=ask | {"model": other})
                assert r.status_code == 404 and fragment in r.json()["error"]["message"], r.text
            assert c.post("/lineages/deacon/karma", json={"amount": 7}).status_code == 201  # a new grant
            assert (daemons["deacon"].intake.karma.state().total, daemons["main"].intake.karma.state().total) == (7, 0)

            failures, answered, stop = [], {"evolution": 0, "evolution-deacon": 0}, threading.Event()

            def chat(model):
                with httpx.Client(base_url=url, headers=auth, timeout=60) as client:
                    while not stop.is_set():
                        r = client.post("/v1/chat/completions", json=ask | {"model": model})
                        if r.status_code != 200:
                            failures.append((model, r.status_code, r.text))
                        answered[model] += 1

            threads = [threading.Thread(target=chat, args=(m,)) for m in answered]
            for t in threads:
                t.start()
            r = c.post("/lineages/deacon/rollback", json={"to": 0, "reason": "deacon regressed"})
            unloads, t0 = 0, time.time()
            while time.time() - t0 < 4:  # main unloaded whenever no request is running; the next one reloads it
                with daemons["main"]._swap_mutex:
                    unloads += daemons["main"].host.unload_if_idle(0) is not None
                time.sleep(0.05)
            stop.set()
            for t in threads:
                t.join(60)
            assert r.status_code == 200, r.text
            assert failures == [] and min(answered.values()) > 0 and unloads > 0
            assert daemons["deacon"].served().id == "evolution-deacon-gen-0000"
            assert c.post("/v1/chat/completions", json=ask).json()["model"] == "evolution-gen-0001"
            kept = {n: ExperienceStore(d.ledger).list(limit=1000) for n, d in daemons.items()}
            assert kept["deacon"] and all(e.model_id.startswith("evolution-deacon-") for e in kept["deacon"])
            assert kept["main"] and all(e.model_id.startswith("evolution-gen-") for e in kept["main"])
    finally:
        for d in daemons.values():
            d.stop()
    with Ledger.open(roots["main"]) as led:
        assert (led.served_generation(), led.view("deacon").served_generation()) == (1, 0)
        assert led.verify().ok


def test_a_backup_holds_every_lineage_and_restores_to_a_root_that_verifies(data_root, ledger_url, tmp_path):
    if ledger_url is not None:
        pytest.skip("the SQLite variant covers the files; PostgreSQL backups are tests/ledger/test_backup.py's")
    from evolution import backup as bk

    main_led, deacon, deacon_root = _two(data_root, ledger_url)
    main_led.close()
    result = bk.backup(data_root, tmp_path / "bk")
    assert result.generations == [0, 1]
    restored = DataRoot(tmp_path / "restored")
    bk.restore(tmp_path / "bk", restored)
    with Ledger.open(restored) as led:
        report = led.verify()
        assert report.ok, report.problems
        assert report.artifacts_checked == 5 and report.warnings == []  # deacon's GGUFs came back too
        assert led.view("deacon").served_generation() == 1
    assert restored.for_lineage("deacon").generations() == [0, 1, 2]


def test_the_router_hands_each_request_to_its_lineages_app():
    """Routing only (unit): each lineage's app here echoes what reached it; the real apps are the slow test's."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from evolution.daemon.router import Router

    def echo(name):
        async def handle(request: Request):
            return JSONResponse({"lineage": name, "path": request.url.path, "body": (await request.body()).decode()})
        return Starlette(routes=[Route("/{rest:path}", handle, methods=["GET", "POST"])])

    client = TestClient(Router({"main": echo("main"), "deacon": echo("deacon")}, {}, max_body_bytes=200))
    chat = "/v1/chat/completions"
    for model, lineage in (("evolution-deacon", "deacon"), ("evolution-deacon-gen-0003", "deacon"),
                           ("evolution-deacon@3", "deacon"), ("evolution", "main"), ("evolution-gen-0001", "main"),
                           ("evolution@2", "main"), ("gpt-4", "main"), (None, "main")):
        body = json.dumps({"model": model, "messages": []})
        r = client.post(chat, content=body)
        assert r.json() == {"lineage": lineage, "path": chat, "body": body}  # the same bytes, unchanged
    r = client.post(chat, content=json.dumps({"model": "evolution-witness"}))
    assert r.status_code == 404 and "lineage 'witness' is not served here" in r.json()["error"]["message"]
    assert client.post(chat, content=json.dumps({"model": "evolution-witness@1"})).status_code == 404
    assert client.post(chat, content="{not json").json()["lineage"] == "main"  # main's app says what is wrong
    big = json.dumps({"model": "evolution-deacon", "pad": "x" * 300}).encode()
    r = client.post(chat, content=big)  # declared too big: unread, to the first app, whose own limit says 413
    assert r.json()["lineage"] == "main"
    r = client.post(chat, content=iter([big[:100], big[100:]]))  # chunked, no length: the router stops at its limit
    assert r.status_code == 413 and "200-byte limit" in r.json()["error"]["message"]
    assert client.post("/lineages/deacon/karma", content="{}").json() == {"lineage": "deacon", "path": "/karma",
                                                                          "body": "{}"}
    assert client.get("/lineages/nobody/status").status_code == 404
    assert client.get("/v1/models/evolution-deacon-gen-0001").json()["lineage"] == "deacon"
    assert client.get("/status").json()["lineage"] == "main"


def test_a_lineage_reads_its_own_config_and_curriculum_folder(tmp_path):
    from evolution import config

    root = DataRoot(tmp_path)
    deacon = root.for_lineage("deacon").prepare()
    curriculum = tmp_path / "roles" / "deacon"
    shutil.copytree(Path(config.CurriculumConfig().path), curriculum)
    (deacon.home / "evolution.toml").write_text(
        f'[curriculum]\npath = "{curriculum}"\n[gate]\nstop_after = 2\n[daemon]\nthreshold = 7\nport = 8771\n')
    cfg, dcfg = config.resolve(home=deacon.home), config.resolve_daemon(home=deacon.home)
    assert (cfg.curriculum.path, cfg.gate.stop_after, dcfg.threshold, dcfg.port) == (str(curriculum), 2, 7, 8771)
    main_cfg = config.resolve(home=root.home)  # main: its own (here none): the defaults
    assert main_cfg.curriculum.path == config.CurriculumConfig().path and config.resolve_daemon(home=root.home).port == 8765


# -- retention, the age-up lock, the daemon's claim and the anchors: each per lineage ----------------------


def test_prune_acts_on_one_lineage_and_its_pruned_events_carry_it(data_root, ledger_url):
    """`evolve prune --lineage deacon` deletes deacon's files by deacon's policy, records the deletions under
    deacon (in the one chain), and leaves main's generations and ledger view untouched."""
    from evolution.ledger import check_servable
    from tests.retention_util import GGUF, build

    deacon_root = data_root.for_lineage("deacon").prepare()
    with Ledger.open(data_root, ledger_url) as led:
        build(data_root, led)
        build(deacon_root, led.view("deacon"))
    (deacon_root.home / "evolution.toml").write_text("[retention]\nkeep_last = 2\nkeep_best = 1\n")
    main_files = sorted(p for p in data_root.checkpoints.rglob("*") if p.is_file())
    env = {"EVOLUTION_LINEAGE": None} | ({"EVOLUTION_LEDGER_URL": ledger_url} if ledger_url else {})
    out = CliRunner().invoke(main, ["prune", "--lineage", "deacon", "--json"], env=env, catch_exceptions=False)
    assert out.exit_code == 0, out.output
    got = json.loads(out.output)
    assert got["lineage"] == "deacon" and sorted(int(g) for g in got["kept"]) == [0, 3, 5, 7]
    assert sorted(d["gen"] for d in got["deletions"]) == [1, 2, 3, 4, 6]
    assert all(a["path"].startswith("lineages/deacon/checkpoints/") for d in got["deletions"] for a in d["artifacts"])
    assert not (deacon_root.gen_dir(4) / GGUF).exists() and (deacon_root.gen_dir(7) / GGUF).is_file()
    assert sorted(p for p in data_root.checkpoints.rglob("*") if p.is_file()) == main_files  # main: no file gone
    with Ledger.open(data_root, ledger_url) as led:
        deacon = led.view("deacon")
        assert led.entries(kind=events.PRUNED) == []
        assert {e.lineage for e in deacon.entries(kind=events.PRUNED)} == {"deacon"}
        assert len(deacon.entries(kind=events.PRUNED)) == 5
        rows = {r.gen: r.pruned for r in deacon.history()}
        assert (rows[4], rows[3], rows[7]) == ("generation", "weights", None)
        assert all(r.pruned is None for r in led.history())
        with pytest.raises(Exception, match="generation 4 was pruned"):
            check_servable(deacon, 4)
        check_servable(led, 4)  # main's generation 4 is still whole
        report = led.verify()
        assert report.ok, report.problems
        assert report.artifacts_pruned == 11 and report.warnings == []
    out = CliRunner().invoke(main, ["prune", "--lineage", "deacon"], env=env, catch_exceptions=False)
    assert out.exit_code == 0 and "lineage deacon" in out.output and "nothing to prune" in out.output


def test_a_read_command_on_a_lineage_with_no_folder_is_refused_and_creates_nothing(data_root):
    Ledger.open(data_root.prepare()).close()
    runner = CliRunner()
    for args in (["status"], ["karma", "--json"], ["ledger"], ["prune", "--dry-run"], ["experiences"]):
        out = runner.invoke(main, [*args, "--lineage", "deacn"], env={"EVOLUTION_LINEAGE": None})
        assert out.exit_code == 1, (args, out.output)
        assert "lineage deacn has no folder" in out.output and "lineages here: main" in out.output, out.output
    assert not (data_root.root / "lineages").exists()  # no lineage made from a typo
    assert runner.invoke(main, ["status", "--json"], env={"EVOLUTION_LINEAGE": None}).exit_code == 0


def test_the_age_up_lock_is_per_lineage_so_prune_waits_only_for_its_own_lineage(tmp_path):
    from evolution import ageup, retention
    from evolution.config import RetentionConfig
    from evolution.errors import EvolutionError

    main_root, deacon_root = DataRoot(tmp_path).prepare(), DataRoot(tmp_path, "deacon").prepare()
    with Ledger.open(main_root) as led:
        with ageup._lock(deacon_root):  # deacon's age-up holds deacon's lock and the machine
            assert retention.prune(main_root, led, RetentionConfig()).deletions == []  # main's prune runs
            with pytest.raises(EvolutionError, match=r"^lineage deacon: an age-up is running"):
                retention.prune(deacon_root, led.view("deacon"), RetentionConfig())
        with main_root.exclusive("busy"):
            retention.prune(deacon_root, led.view("deacon"), RetentionConfig())


def test_a_daemon_claims_each_lineage_it_serves_and_no_other(tmp_path):
    from evolution.daemon import identity
    from evolution.errors import EvolutionError

    main_root, deacon_root = DataRoot(tmp_path).prepare(), DataRoot(tmp_path, "deacon").prepare()
    claims = [identity.claim(main_root), identity.claim(deacon_root)]  # one process serving both: both held
    try:
        assert (deacon_root.home / identity.LOCK_FILE).is_file()
        with pytest.raises(EvolutionError, match="another daemon is already running on lineage deacon of the data"):
            identity.claim(deacon_root)
        with pytest.raises(EvolutionError, match="another daemon is already running on the data root"):
            identity.claim(main_root)
        other = identity.claim(DataRoot(tmp_path, "polecat").prepare())  # a lineage nobody serves: free
        other.release()
    finally:
        for c in claims:
            c.release()
    identity.claim(deacon_root).release()  # released with its daemon


def test_lineages_served_on_one_port_take_the_first_ones_token_and_write_no_token_file(tmp_path, tiny_base,
                                                                                        monkeypatch):
    """One port, one token: the first lineage's. A lineage beside it writes no ``daemon.token`` of its own
    (nothing would accept it, and its start logged it as the token to use)."""
    from evolution.config import DaemonConfig
    from evolution.daemon import TOKEN_ENV, TOKEN_FILE, Daemon
    from evolution.daemon.entry import prepare_all
    from tests.conftest import make_daemon_cfg, make_tiny_cfg, make_tiny_curriculum

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    cfg = make_daemon_cfg(make_tiny_cfg(make_tiny_curriculum(tmp_path / "curriculum")))
    daemons = [Daemon(DataRoot(tmp_path / "root", name).prepare(), cfg, DaemonConfig(threshold=1000), tiny_base)
               for name in ("main", "deacon")]
    try:
        prepare_all(daemons, 0)
        main_file = tmp_path / "root" / TOKEN_FILE
        assert daemons[1].token == daemons[0].token == main_file.read_text().strip() != ""
        assert daemons[1].token_source == str(main_file)
        assert not (daemons[1].root.home / TOKEN_FILE).exists()
    finally:
        for d in daemons:
            d.stop()


def test_the_gate_anchors_come_from_the_childs_own_lineage_only(data_root, ledger_url):
    """Both lineages have generations 1-3 (numbers collide); deacon's anchors are deacon's gate results and
    deacon's generation 0 report, never main's."""
    from evolution import ageup

    deacon_root = data_root.for_lineage("deacon").prepare()
    recall = {"main": {1: 0.91, 2: 0.92, 3: 0.93}, "deacon": {1: 0.41, 2: 0.42, 3: 0.43}}
    with Ledger.open(data_root, ledger_url) as led:
        for name, view in (("main", led), ("deacon", led.view("deacon"))):
            view.record(events.generation_created(0, None, "base", "c", "m"))
            for g in (1, 2, 3):
                view.record(events.generation_created(g, g - 1, "base", "c", "m"))
                view.record(events.gate_result(g - 1, g, {"recall": recall[name][g]}, {}, "pass",
                                               fingerprints={"recall": "same-items"}))
        for root, value in ((data_root, 0.5), (deacon_root, 0.2)):
            root.gen_dir(0).mkdir(parents=True)
            (root.gen_dir(0) / "eval.json").write_text(json.dumps({"child": {"gen": 0, "metrics": {"recall": value},
                                                                            "fingerprints": {"recall": "same-items"}}}))
        got = {e.gen: e.metrics["recall"] for e in ageup.anchor_history(deacon_root, led.view("deacon"), 3)}
        assert got == {0: 0.2, 1: 0.41, 2: 0.42}  # 3 is the parent: re-measured beside the child, not read
        got = {e.gen: e.metrics["recall"] for e in ageup.anchor_history(data_root, led, 3)}
        assert got == {0: 0.5, 1: 0.91, 2: 0.92}
