"""The lineage dashboard: in a real headless Chromium against a real daemon process on a two-generation
data root (``lineage``: generation 0 and a promoted generation 1 of the tiny taught model), plus the
read-only `evolve ui` app and the static checks (vendored chart library, page weight, no markup sinks).

Also: stored chats and model replies behind the token under `evolve ui --allow-remote`, and the page
asking for it; the layout at a laptop's and a phone's width (1280 and 390 px) with 1, 2 and 20
generations (fabricated ledgers with every gate metric): the page never scrolls sideways, the charts'
boxes never overlap and each plot stays in its box, the lineage table shows every column at 1280.

Screenshots of every page are kept under ``test-artifacts/dashboard/`` (or $EVOLUTION_TEST_ARTIFACTS).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from evolution.dashboard import routes
from tests.conftest import toml_of
from tests.daemon_util import DaemonProc, serving_app
from tests.dashboard_util import Console, artifacts_dir, fabricate_lineage, need_browser

STATIC = routes.STATIC

# -- static checks (no model, no browser) ---------------------------------------------------------


def test_vendored_chart_library_matches_its_recorded_sha256_and_ships_its_license():
    table = (STATIC / "vendor" / "README.md").read_text()
    for name in ("uPlot.iife.min.js", "uPlot.min.css"):
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}`"))
        recorded = re.search(r"`([0-9a-f]{64})`", row).group(1)
        assert hashlib.sha256((STATIC / "vendor" / name).read_bytes()).hexdigest() == recorded, name
    assert "MIT License" in (STATIC / "vendor" / "uPlot.LICENSE").read_text()


def test_the_first_page_with_everything_it_loads_is_under_300_kb():
    total = (STATIC / "index.html").stat().st_size + sum((STATIC / f).stat().st_size for f in routes.FILES)
    assert total < 300 * 1024, total
    html = (STATIC / "index.html").read_text()
    loaded = set(re.findall(r'(?:src|href)="/ui/static/([^"]+)"', html))
    assert loaded == set(routes.FILES), "index.html loads exactly the files the routes serve"
    assert "http://" not in html and "https://" not in html, "no CDN: everything is served by the dashboard"


def test_the_page_code_never_assigns_markup():
    js = (STATIC / "app.js").read_text()
    code = "\n".join(line for line in js.splitlines() if not line.lstrip().startswith("//"))
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in code, sink
    assert "<script>" not in (STATIC / "index.html").read_text(), "no inline script (the CSP forbids it)"


# -- `evolve ui`: read-only, any data root -------------------------------------------------------


def test_evolve_ui_serves_the_lineage_read_only_with_no_actions(lineage):
    from starlette.testclient import TestClient

    from evolution.cli.ui import create_app
    from evolution.ledger import Ledger

    root, _ = lineage
    with Ledger.open(root) as ledger, TestClient(create_app(root, ledger)) as c:
        page = c.get("/")
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
        gens = c.get("/ui/api/lineage").json()["generations"]
        assert [g["gen"] for g in gens] == [0, 1] and gens[1]["served"] and gens[1]["verdict"] == "pass"
        assert gens[0]["rollback_target"] and not gens[1]["rollback_target"]
        detail = c.get("/ui/api/generation/1").json()
        assert detail["replies"] and all(r["parent"] is not None for r in detail["replies"])
        assert detail["losses"], "per-stage losses from training_finished"
        assert c.get("/ui/api/live").json()["readonly"] is True
        assert c.get("/ui/api/verify").json()["ok"] is True
        assert c.get("/ui/api/generation/7").status_code == 404
        for url, param in (("/ui/api/generation/abc", "n"), ("/ui/api/experience?limit=0", "limit")):
            bad = c.get(url)  # the API's error format, naming the field, not FastAPI's 422 list
            assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
            assert bad.json()["error"]["message"].startswith(f"'{param}' ")
        assert c.post("/rollback", json={"to": 0}).status_code in (404, 405)
        assert c.get("/ui/static/../server.py").status_code == 404


def test_post_resume_lifts_the_stop_rule_with_the_token_only(client, daemon):
    from evolution.ledger import events as ev
    from evolution.promotion import paused_reason
    from tests.conftest import SERVER_TOKEN

    auth = {"Authorization": f"Bearer {SERVER_TOKEN}"}
    assert client.post("/resume", json={}, headers=auth).status_code == 409  # not paused
    daemon.ledger.record(ev.ageups_paused("the last 3 children did not improve recall"))
    assert client.get("/status").json()["paused"]
    assert client.post("/resume", json={}).status_code == 401
    assert client.post("/resume", json={}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert paused_reason(daemon.ledger) is not None
    r = client.post("/resume", json={"reason": "curriculum fixed"}, headers=auth)
    assert r.status_code == 200 and r.json()["resumed"] is True
    assert paused_reason(daemon.ledger) is None
    assert daemon.ledger.entries(kind=ev.AGEUPS_RESUMED)[-1].payload["reason"] == "curriculum fixed"


def test_the_daemon_serves_the_dashboard_beside_the_api(client):
    page = client.get("/")
    assert page.status_code == 200 and "<title>evolution" in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    bad = client.get("/ui/api/experience?limit=many")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit", bad.text
    live = client.get("/ui/api/live").json()
    assert live["served"]["generation"] == 1 and "readonly" not in live
    assert client.get("/ui/static/vendor/uPlot.iife.min.js").status_code == 200


# -- in the browser, against a real daemon ---------------------------------------------------------


@pytest.fixture(scope="module")
def daemon_proc(lineage, tmp_path_factory):
    """``run_daemon.py`` on a copy of the two-generation lineage (serving generation 1), with one posted
    transcript that tries to run script in the page."""
    src, cfg = lineage
    home = tmp_path_factory.mktemp("dashboard") / "home"
    shutil.copytree(src.root, home)
    d = cfg.to_dict()
    d.pop("quick")
    d["daemon"] = {"poll_seconds": 0.3, "threshold": 1000}
    conf = home.parent / "evolution-test.toml"
    conf.write_text(toml_of(d))
    proc = DaemonProc(home, "--config", str(conf)).start()
    try:
        proc.wait_serving(1, 120)
        yield proc
    finally:
        proc.stop()


HOSTILE = [{"role": "user", "content": "<script>window.__pwned = 'script'</script> hello"},
           {"role": "assistant", "content": "<img src=x onerror=\"window.__pwned = 'onerror'\"> hi"}]


@pytest.fixture(scope="module")
def browser():
    exe = need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    pg.set_default_timeout(20_000)
    pg.console = Console(pg)
    yield pg
    ctx.close()


def _shot(page, name: str) -> Path:
    out = artifacts_dir() / f"{name}.png"
    page.screenshot(path=str(out), full_page=True)
    return out


def _served(proc) -> str:
    return httpx.get(proc.url + "/v1/models", timeout=10).json()["data"][0]["id"]


def _open(page, proc, hash_: str = "#/") -> None:
    page.goto(proc.url + "/" + hash_)
    page.wait_for_selector("#live-served .mono")


def test_lineage_page_shows_both_generations_the_served_one_marked_and_live_state(daemon_proc, page):
    _open(page, daemon_proc)
    rows = page.locator("#lineage tbody tr")
    rows.first.wait_for()
    assert rows.count() == 2
    assert rows.nth(1).get_attribute("data-gen") == "1" and "served" in rows.nth(1).inner_text()
    assert "pass" in rows.nth(1).inner_text() and "base" in rows.nth(0).inner_text()
    assert page.locator("#live-served").inner_text().count("evolution-gen-0001") == 1
    assert "toward the next age-up" in page.locator("#live-karma").inner_text()
    assert "0 lessons pending" in page.locator("#live-retrieval").inner_text()
    page.wait_for_selector("#live-verify .ok")
    assert page.locator(".uplot").count() >= 1, "the metrics chart is drawn"
    _shot(page, "lineage")
    assert page.console.take() == []


def test_the_real_lineage_fits_a_laptop_and_a_phone(daemon_proc, browser):
    for width in (1280, 390):
        pg = _page_at(browser, width)
        try:
            _open(pg, daemon_proc)
            pg.locator("#lineage tbody tr").nth(1).wait_for()
            _charts_drawn(pg, 3)  # metrics, perplexity and style drift, and how far the weights moved
            _assert_fits(pg, f"the daemon's lineage at {width} px", every_column=width >= 1280)
            _shot(pg, f"lineage-{width}")
            assert pg.console.take() == []
        finally:
            pg.context.close()


def test_generation_page_shows_the_gate_report_and_replies_side_by_side(daemon_proc, page):
    _open(page, daemon_proc, "#/gen/1")
    page.wait_for_selector("#replies tbody tr")
    assert page.locator("#gate-verdict").inner_text() == "pass"
    first = page.locator("#replies tbody tr").first
    parent, child = first.locator("td.parent"), first.locator("td.child")
    assert parent.count() == 1 and child.count() == 1
    assert re.search(r"(right|wrong)", first.inner_text())
    assert page.locator("#gate tbody tr").count() >= 3
    page.wait_for_selector("#losses .uplot")
    page.wait_for_selector("#weights .uplot")  # per layer: change against parent and generation 0, adapter norm
    assert page.locator("#weights .uplot").count() == 2
    assert page.locator("#weights-flag").inner_text() in ("no layer dominates the update",) or \
        "of this generation's update" in page.locator("#weights-flag").inner_text()
    _shot(page, "generation-1")
    _open(page, daemon_proc, "#/gen/0")
    page.wait_for_selector("h1")
    _shot(page, "generation-0")
    assert page.console.take() == []


def test_a_transcript_holding_script_and_onerror_is_shown_as_text_and_nothing_runs(daemon_proc, page):
    r = httpx.post(daemon_proc.url + "/conversations", headers=daemon_proc.auth(), json={"messages": HOSTILE})
    assert r.status_code in (200, 201), r.text
    _open(page, daemon_proc, "#/experience")
    page.wait_for_selector("#conversations tbody tr")
    text = page.locator("#conversations").inner_text()
    assert "<script>window.__pwned = 'script'</script>" in text and "onerror=" in text
    assert page.locator("#conversations img, #conversations script").count() == 0
    page.wait_for_timeout(500)  # an image error would have fired by now
    assert page.evaluate("window.__pwned") is None
    _shot(page, "experience")
    assert page.console.take() == []


def test_a_wrong_token_shows_an_error_and_changes_nothing(daemon_proc, page):
    before = httpx.get(daemon_proc.url + "/ui/api/lineage").json()
    _open(page, daemon_proc)
    page.fill("#token", "not-the-token")
    page.click("#token-form button[type=submit]")
    page.click("button.rollback[data-gen='0']")
    page.wait_for_selector("#confirm[open]")
    assert "evolution-gen-0000" in page.locator("#confirm").inner_text()
    page.click("#confirm-ok")
    page.wait_for_selector("#confirm-error:has-text('token')")
    assert "wrong API token" in page.locator("#toast").inner_text()
    _shot(page, "wrong-token")
    assert _served(daemon_proc) == "evolution-gen-0001"
    assert httpx.get(daemon_proc.url + "/ui/api/lineage").json() == before
    assert page.console.take(allowed=("status of 401",)) == []


def test_rating_a_captured_chat_in_the_page_records_the_label(daemon_proc, page):
    chat = httpx.post(daemon_proc.url + "/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "What is your name?"}], "max_tokens": 8})
    cid = chat.json()["id"]
    _open(page, daemon_proc, "#/experience")
    page.fill("#token", daemon_proc.token)
    page.click("#token-form button[type=submit]")
    row = page.locator("#experiences tbody tr").first
    row.wait_for()
    row.locator("button.rate-good").click()
    page.wait_for_selector("#experiences tbody tr >> nth=0 >> .badge.ok")
    items = httpx.get(daemon_proc.url + "/ui/api/experience").json()["experiences"]
    assert next(e for e in items if e["completion_id"] == cid)["label"] == "good"
    assert page.console.take() == []


def test_resume_in_the_page_lifts_the_stop_rule(daemon_proc, page):
    from evolution.ledger import Ledger
    from evolution.ledger import events as ev
    from evolution.paths import DataRoot
    from evolution.promotion import paused_reason

    with Ledger.open(DataRoot(daemon_proc.home)) as ledger:
        ledger.record(ev.ageups_paused("the last 3 children did not improve recall (a test)"))
    _open(page, daemon_proc)
    page.fill("#token", daemon_proc.token)
    page.click("#token-form button[type=submit]")
    page.wait_for_selector("#live-stop:has-text('PAUSED')")
    page.click("#resume")
    page.wait_for_selector("#confirm[open]")
    _shot(page, "resume-confirm")
    page.click("#confirm-ok")
    page.wait_for_selector("#live-stop:has-text('age-ups active')")
    with Ledger.open(DataRoot(daemon_proc.home)) as ledger:
        assert paused_reason(ledger) is None
    assert page.console.take() == []


def test_a_rollback_through_the_page_changes_what_v1_models_serves(daemon_proc, page):
    assert _served(daemon_proc) == "evolution-gen-0001"
    _open(page, daemon_proc)
    page.fill("#token", daemon_proc.token)
    page.click("#token-form button[type=submit]")
    page.click("button.rollback[data-gen='0']")
    page.wait_for_selector("#confirm[open]")
    page.fill("#confirm-reason", "browser test")
    _shot(page, "rollback-confirm")
    page.click("#confirm-ok")
    page.wait_for_selector("#confirm", state="hidden")
    assert _served(daemon_proc) == "evolution-gen-0000"
    page.wait_for_selector("#lineage tbody tr[data-gen='0'].served")
    page.wait_for_selector("#live-served:has-text('evolution-gen-0000')")
    _shot(page, "after-rollback")
    assert page.locator("#token").get_attribute("value") in (None, "")
    assert "not-the-token" not in page.url and daemon_proc.token not in page.url
    assert page.context.cookies() == []
    assert page.console.take() == []


def test_the_page_follows_a_rollback_made_elsewhere_without_a_reload(daemon_proc, page):
    _open(page, daemon_proc)
    page.wait_for_selector("#lineage tbody tr[data-gen='0'].served")  # where the previous test left it
    page.evaluate("window.__same_page = true")
    r = httpx.post(daemon_proc.url + "/rollback", headers=daemon_proc.auth(), json={"to": 1, "reason": "elsewhere"})
    assert r.status_code == 200, r.text
    page.wait_for_selector("#live-served:has-text('evolution-gen-0001')")
    page.wait_for_selector("#lineage tbody tr[data-gen='1'].served", timeout=15_000)
    assert page.evaluate("window.__same_page") is True
    assert page.console.take() == []


@pytest.fixture
def ui_server(lineage, tmp_path):
    """`evolve ui`'s app on uvicorn (a thread, a free loopback port) over a copy of the lineage, with an
    age-up in progress: its progress file names this (live) process."""
    import json
    import os
    import time

    from evolution.cli.ui import create_app
    from evolution.ledger import Ledger
    from evolution.paths import DataRoot

    src, _ = lineage
    root = DataRoot(tmp_path / "copy")
    shutil.copytree(src.root, root.root)
    now = time.time()
    (root.logs).mkdir(parents=True, exist_ok=True)
    (root.logs / "ageup.json").write_text(json.dumps({
        "pid": os.getpid(), "state": "running", "started": now - 60, "gen": 2, "stage": "train",
        "stages_done": ["data"], "train_stage": "sft", "train_stages": ["cpt", "sft"], "step": 3, "total": 10,
        "loss": 1.25, "eta_s": 95.0, "updated": now}))
    with Ledger.open(root) as ledger:
        with serving_app(create_app(root, ledger)) as url:
            yield url


def test_evolve_ui_in_the_browser_shows_the_age_up_progress_read_only(ui_server, page):
    page.goto(ui_server + "/")
    page.wait_for_selector("#lineage tbody tr")
    ageup = page.locator("#live-ageup")
    assert "SFT step 3/10" in ageup.inner_text() and "ETA 1 min 35 s" in ageup.inner_text()
    assert ageup.locator("[role=progressbar]").get_attribute("aria-valuenow") == "30"
    assert page.locator("button.rollback").count() == 0 and not page.locator("#token-form").is_visible()
    assert "read-only" in page.locator("#mode").inner_text()
    _shot(page, "evolve-ui-ageup")
    assert page.console.take() == []


def test_evolve_ui_refuses_a_non_loopback_host_unless_allowed():
    from click.testing import CliRunner

    from evolution.cli import main

    r = CliRunner().invoke(main, ["ui", "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "not a loopback address" in r.output


GUARD_TOKEN = "ui-token-0123456789abcdef"
SECRET = "my bank PIN is the year my cat Pilchard was born"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_evolve_ui_allow_remote_keeps_stored_chats_and_replies_behind_the_token(ledger, root, monkeypatch):
    """`evolve ui --allow-remote`, run as a user runs it: the reads of stored text answer 401 without the token
    and with a wrong one, naming where the token is; with it they answer; the rest of the dashboard is open."""
    from evolution.intake.conversations import ConversationStore

    _hand_made_lineage(root, ledger)
    ConversationStore(ledger).add([{"role": "user", "content": SECRET}, {"role": "assistant", "content": "Noted."}])
    monkeypatch.setenv("EVOLUTION_API_TOKEN", GUARD_TOKEN)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from evolution.cli import main; main()", "ui", "--port", str(port),
                             "--allow-remote"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                httpx.get(url + "/ui/api/live", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "slow"
                time.sleep(0.2)
        for path in ("/ui/api/experience", "/ui/api/generation/1", "/ui/api/generation/0", "/ui/api/lineage"):
            for bad in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": f"Bearer {GUARD_TOKEN}x"}):
                r = httpx.get(url + path, headers=bad, timeout=10)
                assert r.status_code == 401 and "$EVOLUTION_API_TOKEN" in r.json()["error"]["message"], (path, r.text)
                assert SECRET not in r.text
            assert httpx.get(url + path, headers={"Authorization": f"Bearer {GUARD_TOKEN}"}, timeout=10).status_code == 200
        good = httpx.get(url + "/ui/api/experience", headers={"Authorization": f"Bearer {GUARD_TOKEN}"}, timeout=10)
        assert SECRET in good.text
        for path in ("/", "/ui/api/verify", "/ui/static/app.js"):
            r = httpx.get(url + path, timeout=10)
            assert r.status_code == 200 and SECRET not in r.text, path
        assert httpx.get(url + "/ui/api/live", timeout=10).json()["token_for_reads"] is True
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert "need the API token, in $EVOLUTION_API_TOKEN" in out, out


@pytest.fixture
def guarded_ui(ledger, root):
    """`evolve ui`'s app with reads of stored text behind a token (as with --allow-remote), on uvicorn, over the
    hand-made lineage and one posted transcript."""
    from evolution.cli.ui import create_app
    from evolution.intake.conversations import ConversationStore

    _hand_made_lineage(root, ledger)
    ConversationStore(ledger).add([{"role": "user", "content": SECRET}, {"role": "assistant", "content": "Noted."}])
    with serving_app(create_app(root, ledger, (GUARD_TOKEN, "the test's token file"))) as url:
        yield url


def test_the_page_asks_for_the_token_where_stored_text_needs_it(guarded_ui, browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
    try:
        page = ctx.new_page()
        page.set_default_timeout(20_000)
        console = Console(page)
        page.goto(guarded_ui + "/#/gen/1")
        page.wait_for_selector("#need-token")
        ask = page.locator("#need-token").inner_text()
        assert "needs the API token" in ask and "the test's token file" in ask
        assert page.locator("#token-form").is_visible() and page.locator("#replies").count() == 0
        assert "chats" in page.locator("#token").get_attribute("placeholder")
        _shot(page, "token-asked")
        page.fill("#token", "not-the-token")
        page.click("#token-form button[type=submit]")
        page.wait_for_selector("#need-token p.error:has-text('wrong API token')")
        page.fill("#token", GUARD_TOKEN)
        page.click("#token-form button[type=submit]")
        page.wait_for_selector("#replies tbody tr")
        assert "onerror=" in page.locator("#replies").inner_text()
        page.goto(guarded_ui + "/#/experience")
        page.wait_for_selector("#conversations tbody tr")
        assert SECRET in page.locator("#conversations").inner_text()
        assert GUARD_TOKEN not in page.url and ctx.cookies() == []
        assert console.take(allowed=("status of 401",)) == []
    finally:
        ctx.close()
    ctx = browser.new_context(viewport={"width": 390, "height": 844})  # a new tab, on a phone: no token yet
    try:
        page = ctx.new_page()
        page.set_default_timeout(20_000)
        page.goto(guarded_ui + "/")
        page.wait_for_selector("#need-token")  # the lineage too: a rejection's reason may quote what was taught
        assert page.locator("#live-served").is_visible() and SECRET not in page.content()
        page.fill("#token", GUARD_TOKEN)
        page.click("#token-form button[type=submit]")
        page.wait_for_selector("#lineage tbody tr")
        assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    finally:
        ctx.close()


# -- layout: a laptop and a phone, 1, 2 and 20 generations -------------------------------------------

LAYOUT = """() => {
  const rect = (e) => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const t = document.querySelector("#lineage");
  return {
    view: document.documentElement.clientWidth, page: document.documentElement.scrollWidth, body: document.body.scrollWidth,
    charts: [...document.querySelectorAll(".chart")].map((c) => ({ box: rect(c), plot: rect(c.querySelector(".uplot")),
      area: rect(c.querySelector(".u-wrap")) })),
    lineage: t ? { box: rect(t.parentElement), table: rect(t), scroll: t.parentElement.scrollWidth,
      client: t.parentElement.clientWidth } : null,
  };
}"""


def _page_at(browser, width: int):
    ctx = browser.new_context(viewport={"width": width, "height": 1400 if width > 500 else 844})
    pg = ctx.new_page()
    pg.set_default_timeout(20_000)
    pg.console = Console(pg)
    return pg


def _charts_drawn(page, count: int) -> None:
    page.wait_for_function("(n) => document.querySelectorAll('.chart .uplot').length === n", arg=count)
    page.evaluate("() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")


def _inside(inner, outer, slack: float = 0.5) -> bool:
    return (inner[0] >= outer[0] - slack and inner[1] >= outer[1] - slack and inner[2] <= outer[2] + slack
            and inner[3] <= outer[3] + slack)


def _overlap(a, b) -> bool:
    return min(a[2], b[2]) - max(a[0], b[0]) > 0.5 and min(a[3], b[3]) - max(a[1], b[1]) > 0.5


def _assert_fits(page, where: str, every_column: bool = False) -> None:
    """No horizontal overflow of the page; every chart's plot inside its box; no two charts' boxes (or plots)
    overlapping; with ``every_column``, the lineage table shown whole (nothing to scroll to)."""
    lay = page.evaluate(LAYOUT)
    assert lay["page"] <= lay["view"] and lay["body"] <= lay["view"], f"{where}: the page scrolls sideways: {lay}"
    for c in lay["charts"]:
        assert _inside(c["plot"], c["box"]) and _inside(c["area"], c["box"]), f"{where}: a plot leaves its box: {c}"
        assert c["box"][0] >= 0 and c["box"][2] <= lay["view"], f"{where}: a chart leaves the window: {c}"
    for a, b in itertools.combinations(lay["charts"], 2):
        assert not _overlap(a["box"], b["box"]) and not _overlap(a["plot"], b["plot"]), f"{where}: charts overlap: {a} {b}"
    if lay["lineage"]:
        assert lay["lineage"]["box"][2] <= lay["view"], f"{where}: the lineage table leaves the window"
        if every_column:
            assert lay["lineage"]["scroll"] <= lay["lineage"]["client"], f"{where}: lineage columns cut: {lay['lineage']}"


@pytest.fixture(scope="module")
def fabricated(tmp_path_factory):
    """`evolve ui`'s app over three fabricated ledgers (1, 2 and 20 generations, every gate metric), the
    2-generation one with long chats on its experience page: {generations: URL}."""
    from evolution.cli.ui import create_app
    from evolution.intake.conversations import ConversationStore
    from evolution.intake.experiences import ExperienceStore
    from evolution.ledger import Ledger
    from evolution.paths import DataRoot

    with contextlib.ExitStack() as stack:
        urls = {}
        for n in (1, 2, 20):
            root = DataRoot(tmp_path_factory.mktemp(f"gens{n}") / "home")
            root.root.mkdir()
            ledger = stack.enter_context(Ledger.open(root))
            fabricate_lineage(root, ledger, n)
            if n == 2:
                long_word = "x" * 300
                talk = [{"role": "user", "content": f"Remember this: {long_word} and a plain sentence " * 3},
                        {"role": "assistant", "content": "I will remember it. " * 20}]
                ConversationStore(ledger).add(talk)
                ExperienceStore(ledger).capture(talk[:1], long_word + " ok", "chatcmpl-long", "evolution-gen-0001",
                                                "0" * 64, 1, "stop", False)
            urls[n] = stack.enter_context(serving_app(create_app(root, ledger)))
        yield urls


@pytest.mark.parametrize("width", [1280, 390])
@pytest.mark.parametrize("n", [1, 2, 20])
def test_the_dashboard_fits_a_laptop_and_a_phone(fabricated, browser, n, width):
    page = _page_at(browser, width)
    try:
        page.goto(fabricated[n] + "/")
        page.locator("#lineage tbody tr").nth(n - 1).wait_for()
        assert page.locator("#lineage tbody tr").count() == n
        _charts_drawn(page, 2)
        _assert_fits(page, f"lineage of {n} at {width} px", every_column=width >= 1280)
        _shot(page, f"fit-{n}-generations-{width}")
        page.goto(fabricated[n] + f"/#/gen/{n - 1}")
        page.wait_for_selector(f"h1:has-text('Generation {n - 1}')")
        if n > 1:
            _charts_drawn(page, 2)  # the cpt and sft losses
        _assert_fits(page, f"generation {n - 1} at {width} px")
        page.goto(fabricated[n] + "/#/experience")
        page.wait_for_selector("h1:has-text('Experience')")
        _assert_fits(page, f"experience at {width} px")
        if n == 2:
            _shot(page, f"fit-experience-{width}")
        assert page.console.take() == []
    finally:
        page.context.close()


def test_charts_follow_the_window_when_it_is_resized(fabricated, browser):
    page = _page_at(browser, 1600)
    try:
        page.goto(fabricated[20] + "/")
        _charts_drawn(page, 2)
        for width in (1600, 1280, 390, 1280):
            page.set_viewport_size({"width": width, "height": 1000})
            _charts_drawn(page, 2)
            _assert_fits(page, f"resized to {width} px", every_column=width >= 1280)
        assert page.console.take() == []
    finally:
        page.context.close()


# -- a hand-made ledger: a rejected child, its failed rules and replies (no model needed) ------------


def _hand_made_lineage(root, ledger) -> None:
    """Generation 0 (served) and a rejected generation 1 whose eval report holds curriculum text with markup."""
    import json

    from evolution.ledger import events as ev

    def gguf(gen: int) -> dict:
        d = root.gen_dir(gen)
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.gguf").write_bytes(f"gguf {gen}".encode())
        return ev.artifact(root, d / "model.gguf", "gguf")

    ledger.record(ev.generation_created(0, None, "base", "c0", "m0"))
    ledger.record(ev.exported(0, [gguf(0)], quantization="q8_0"))
    ledger.record(ev.promoted(0, metrics={"recall": 0.5, "style_drift": 0.3}))
    ledger.record(ev.generation_created(1, 0, "base", "c1", "m1", manifest={
        "curriculum": "curriculum/", "conversations": {"taken": 3, "superseded": 1}}))
    ledger.record(ev.training_finished(1, steps=4, losses={"cpt": [3.0, 2.5], "sft": [2.0, 1.5, 1.2]}))
    ledger.record(ev.exported(1, [gguf(1)], quantization="q8_0"))
    checks = [{"metric": "recall", "rule": ">= 0.7", "passed": False, "message": "recall 0.25 is below 0.7"},
              {"metric": "style_drift", "rule": "<= 2.0", "passed": True, "message": ""}]
    ledger.record(ev.gate_result(0, 1, {"recall": 0.25, "style_drift": 0.2}, {"min_recall": 0.7}, "fail",
                                 parent_metrics={"recall": 0.5, "style_drift": 0.3}, checks=checks,
                                 reasons=["recall 0.25 is below 0.7"]))
    ledger.record(ev.rejected(1, reason="recall 0.25 is below 0.7"))
    hostile = "What is <img src=x onerror=\"window.__pwned = 'curriculum'\"> called?"
    item = {"id": "q1", "question": hostile}
    (root.gen_dir(1) / "eval.json").write_text(json.dumps({
        "child": {"gen": 1, "details": {"recall": {"items": [item | {"reply": "<b>no</b>", "correct": False}]}}},
        "parent": {"gen": 0, "details": {"recall": {"items": [item | {"reply": "Wren", "correct": True}]}}}}))


def test_the_view_names_failed_rules_pairs_replies_and_computes_deltas(ledger, root):
    from evolution.dashboard import View
    from evolution.intake import Intake

    _hand_made_lineage(root, ledger)
    v = View(root, ledger, Intake(ledger))
    gens = v.lineage()["generations"]
    assert [g["gen"] for g in gens] == [0, 1] and gens[0]["served"] and gens[1]["status"] == "rejected"
    assert gens[1]["deltas"]["recall"] == pytest.approx(-0.25)
    assert not gens[1]["rollback_target"] and not gens[0]["rollback_target"]  # rejected; served already
    g = v.generation(1)
    assert [c["metric"] for c in g["failed"]] == ["recall"] and g["reasons"] == ["recall 0.25 is below 0.7"]
    assert g["replies"] == [{"metric": "recall", "id": "q1", "question": g["replies"][0]["question"],
                             "child": {"reply": "<b>no</b>", "correct": False},
                             "parent": {"reply": "Wren", "correct": True}}]
    assert g["losses"] == {"cpt": {"step": [0, 1], "loss": [3.0, 2.5]}, "sft": {"step": [0, 1, 2], "loss": [2.0, 1.5, 1.2]}}
    assert g["manifest"]["conversations"] == {"taken": 3, "superseded": 1}
    from evolution.errors import UnknownGeneration

    with pytest.raises(UnknownGeneration):
        v.generation(5)


@pytest.fixture
def hand_made_ui(ledger, root):
    """`evolve ui`'s app on uvicorn over the hand-made lineage."""
    from evolution.cli.ui import create_app

    _hand_made_lineage(root, ledger)
    with serving_app(create_app(root, ledger)) as url:
        yield url


def test_a_rejected_generation_names_its_failed_rules_and_shows_curriculum_text_as_text(hand_made_ui, page):
    page.goto(hand_made_ui + "/#/gen/1")
    page.wait_for_selector("#replies tbody tr")
    assert page.locator("#gate-verdict").inner_text() == "fail"
    assert "recall: >= 0.7 — recall 0.25 is below 0.7" in page.locator("#failed-rules").inner_text()
    row = page.locator("#replies tbody tr").first
    assert "onerror=" in row.inner_text() and "<b>no</b>" in row.locator("td.child").inner_text()
    assert "wrong" in row.inner_text() and "right" in row.inner_text()
    assert page.locator("#replies img, #replies b").count() == 0
    page.wait_for_selector("#losses .uplot")
    page.wait_for_timeout(300)
    assert page.evaluate("window.__pwned") is None
    _shot(page, "rejected-generation")
    assert page.console.take() == []
