"""Operations: size-bounded rotating logs of the daemon and its worker, the systemd unit, ``GET /metrics``.

The SIGTERM contract the unit relies on (a real ``run_daemon.py`` stops with exit 0, its worker at a
checkpoint, nothing half-written) is ``tests/test_daemon.py::test_sigterm_during_training_writes_a_checkpoint_and_exits_0``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evolution import config, logsetup
from evolution.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def _sizes(folder: Path, name: str) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.glob(name + "*")}


def test_the_daemon_log_rotates_and_its_files_stay_within_the_bound(tmp_path):
    path = tmp_path / "logs" / "daemon.log"
    handler = logsetup.to_file(path, max_bytes=4096, backups=2)
    log = logging.getLogger("evolution.test_ops")
    try:
        for i in range(400):  # ~40 KB: ten times the bound of one file
            log.warning("line %04d %s", i, "x" * 60)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    sizes = _sizes(path.parent, "daemon.log")
    assert set(sizes) == {"daemon.log", "daemon.log.1", "daemon.log.2"}, sizes  # the oldest were dropped
    assert all(s <= 4096 for s in sizes.values()) and sum(sizes.values()) <= 3 * 4096
    assert "line 0399" in path.read_text() and "line 0000" not in "".join(
        (path.parent / n).read_text() for n in sizes)


def test_the_worker_output_is_copied_into_a_rotating_log(tmp_path):
    from evolution.daemon import workers

    path = tmp_path / "logs" / "worker.log"
    script = "import sys\nfor i in range(2000): print(f'line {i:04d} ' + 'y' * 70)\nsys.exit(3)"
    proc, pump = workers.spawn_logged([sys.executable, "-c", script], {}, path, max_bytes=16_384, backups=2)
    w = workers.Worker(proc, None, False, path, pump)
    proc.wait(60)
    assert w.finished() and w.code == 3
    sizes = _sizes(path.parent, "worker.log")
    assert set(sizes) == {"worker.log", "worker.log.1", "worker.log.2"}, sizes
    assert sum(sizes.values()) <= 3 * 16_384
    assert w.tail(1).startswith("line 1999 ")  # every line reached the file before the worker was collected


@pytest.mark.parametrize("field,value,message", [
    ("log_backups", 0, "daemon.log_backups must be an integer from 1 to 100"),
    ("log_max_bytes", 100, "daemon.log_max_bytes must be an integer of at least 4096"),
])
def test_log_bounds_are_validated(field, value, message):
    with pytest.raises(ConfigError, match=message):
        config.resolve_daemon(None, {field: value})


def test_default_log_bound_is_tens_of_megabytes():
    d = config.DaemonConfig()
    assert (d.log_backups + 1) * d.log_max_bytes <= 64 * 2**20


# -- the systemd unit ---------------------------------------------------------------------------

def _unit() -> dict[str, dict[str, str]]:
    import configparser

    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(REPO / "deploy" / "evolution.service")
    return {name: dict(parser[name]) for name in parser.sections()}


def test_the_systemd_unit_restarts_on_failure_and_leaves_time_for_a_clean_stop():
    service = _unit()["Service"]
    assert service["Restart"] == "on-failure" and service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"  # SIGTERM to the daemon alone: a second one would skip the checkpoint
    assert service["ExecStart"].endswith("run_daemon.py") and "--start-gen" not in service["ExecStart"]
    drain = 60  # uvicorn's timeout_graceful_shutdown in evolution/daemon/entry.py
    assert int(service["TimeoutStopSec"]) > drain + config.DaemonConfig().shutdown_grace_s


def _skip_or_fail(why: str) -> None:
    """Skip, or fail under ``EVOLUTION_REQUIRE_SYSTEMD=1`` (set by ``.ci/run``): CI must not pass by skipping."""
    if os.environ.get("EVOLUTION_REQUIRE_SYSTEMD") == "1":
        pytest.fail(f"systemd-analyze required but {why}")
    pytest.skip(why)


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    import shutil

    if shutil.which("systemd-analyze") is None:
        _skip_or_fail("systemd-analyze is not installed (apt-get install systemd; .ci/system-tools.sh does)")
    text = (REPO / "deploy" / "evolution.service").read_text()
    unit = tmp_path / "evolution.service"  # its paths made real, as a user would edit them
    unit.write_text(text.replace("%h/evolution/.venv/bin/python", sys.executable).replace("%h/evolution", str(REPO)))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    if "Failed to initialize manager" in r.stderr:  # a container without the runtime directories it needs
        _skip_or_fail(r.stderr.strip())
    assert r.returncode == 0 and str(unit) not in r.stderr + r.stdout, r.stderr + r.stdout


# -- GET /metrics ------------------------------------------------------------------------------

def scrape(client) -> dict[tuple, float]:
    """``GET /metrics`` parsed with prometheus_client's own parser: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


IDLE = {"served_generation": None, "swaps": 0, "karma": {"total": 0.0, "progress": 0.0, "threshold": 100.0},
        "captures": {"written": 0, "failed": 0}, "ageups": {"promoted": 0, "rejected": 0, "failed": 0},
        "ageup_running": False, "stage_seconds": {}, "last_stage_seconds": {}}


def test_requests_are_labelled_by_route_template_not_by_raw_path():
    from fastapi import APIRouter, FastAPI
    from starlette.testclient import TestClient

    from evolution import monitoring

    app = FastAPI()
    metrics = monitoring.Metrics(lambda: IDLE)
    pages = APIRouter()  # included as the dashboard's router is: its routes are known only after routing

    @pages.get("/ui/api/gen/{n}")
    async def gen(n: int):
        return {"n": n}

    app.include_router(pages)

    @app.get("/items/{item}")
    async def item(item: str):
        return {"item": item}

    @app.get("/metrics")
    async def m():
        from fastapi.responses import Response
        return Response(metrics.render(), media_type=monitoring.CONTENT_TYPE_LATEST)

    app.add_middleware(monitoring.HttpMetrics, metrics=metrics, router=app.router)
    with TestClient(app) as c:
        for i in range(5):
            assert c.get(f"/items/{i}").status_code == 200
            assert c.get(f"/no/such/{i}").status_code == 404
            assert c.get(f"/ui/api/gen/{i}").status_code == 200
        assert c.post("/items/9").status_code == 405
        assert c.request("BREW", "/items/9").status_code == 405
        s = scrape(c)
    assert value(s, "evolution_http_requests_total", route="/items/{item}", method="GET", status="200") == 5
    assert value(s, "evolution_http_requests_total", route="(unmatched)", method="GET", status="404") == 5
    assert value(s, "evolution_http_requests_total", route="/items/{item}", method="POST", status="405") == 1
    assert value(s, "evolution_http_requests_total", route="/items/{item}", method="other", status="405") == 1
    assert value(s, "evolution_http_request_duration_seconds_count", route="/items/{item}", method="GET") == 5
    routes = {dict(labels).get("route") for (_, labels) in s} - {None}
    assert value(s, "evolution_http_requests_total", route="/ui/api/gen/{n}", method="GET", status="200") == 5
    assert routes == {"/items/{item}", "/ui/api/gen/{n}", "(unmatched)"}  # no raw path became a label
    assert value(s, "evolution_served_generation") == 0 and ("evolution_served_generation", ()) not in s
    assert value(s, "evolution_karma_threshold") == 100


AUTH_ASK = {"messages": [{"role": "user", "content": "What is your name?"}], "max_tokens": 8, "temperature": 0}


def test_metrics_move_after_a_chat_a_capture_a_karma_grant_a_swap_and_an_ageup(client, daemon, monkeypatch):
    import json

    from tests.conftest import SERVER_TOKEN

    auth = {"Authorization": f"Bearer {SERVER_TOKEN}"}
    s0 = scrape(client)  # no token: read-only, like /status
    assert value(s0, "evolution_served_generation") == 1
    assert value(s0, "evolution_karma_threshold") == 1000 and value(s0, "evolution_karma_progress") == 0

    r = client.post("/v1/chat/completions", json=AUTH_ASK)
    assert r.status_code == 200
    s1 = scrape(client)
    tokens = r.json()["usage"]["completion_tokens"]
    assert tokens > 0 and value(s1, "evolution_tokens_generated_total") == tokens
    assert value(s1, "evolution_captures_total", result="written") == 1
    chat = {"route": "/v1/chat/completions", "method": "POST"}
    assert value(s1, "evolution_http_requests_total", status="200", **chat) == 1
    assert value(s1, "evolution_http_request_duration_seconds_count", **chat) == 1
    assert value(s1, "evolution_http_requests_total", route="/metrics", method="GET", status="200") == 1

    with client.stream("POST", "/v1/chat/completions", json=AUTH_ASK | {"stream": True}) as st:
        chunks = [json.loads(line[6:]) for line in st.iter_lines() if line.startswith("data: {")]
    streamed = sum(bool(c["choices"][0]["delta"].get("content")) for c in chunks)
    monkeypatch.setattr(daemon.intake.experiences, "capture", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "full")))
    assert client.post("/v1/chat/completions", json=AUTH_ASK | {"max_tokens": 2}).status_code == 200
    s2 = scrape(client)
    assert value(s2, "evolution_tokens_generated_total") >= tokens + streamed + 1
    assert value(s2, "evolution_captures_total", result="written") == 2  # the stream's
    assert value(s2, "evolution_captures_total", result="failed") == 1
    assert value(s2, "evolution_http_requests_total", status="200", **chat) == 3

    assert client.post("/karma", json={"amount": 7}, headers=auth).status_code == 201
    assert client.post("/karma", json={"amount": 7}).status_code == 401
    assert client.post("/rollback", json={"to": 0}, headers=auth).status_code == 200
    s3 = scrape(client)
    assert value(s3, "evolution_karma_granted_total") == 7 and value(s3, "evolution_karma_progress") == 7
    assert value(s3, "evolution_http_requests_total", route="/karma", method="POST", status="401") == 1
    assert value(s3, "evolution_model_swaps_total") == value(s0, "evolution_model_swaps_total") + 1
    assert value(s3, "evolution_served_generation") == 0

    # How the daemon counts an age-up its worker finished (a real one runs in tests/test_daemon.py).
    from evolution.generation import GenerationSummary

    daemon._count_ageup("promoted", 1)
    daemon._count_ageup("failed", None)
    s4 = scrape(client)
    assert value(s4, "evolution_ageups_total", outcome="promoted") == 1
    assert value(s4, "evolution_ageups_total", outcome="failed") == 1
    assert value(s4, "evolution_ageups_total", outcome="rejected") == 0
    stages = GenerationSummary.load(daemon.root.gen_dir(1)).stage_seconds
    assert stages and "train" in stages
    for stage, secs in stages.items():
        assert value(s4, "evolution_ageup_stage_seconds_count", stage=stage) == 1
        assert value(s4, "evolution_ageup_stage_seconds_sum", stage=stage) == pytest.approx(secs)
        assert value(s4, "evolution_ageup_last_stage_seconds", stage=stage) == pytest.approx(secs)


def test_a_tick_skipped_while_the_last_still_runs_is_no_warning_other_scheduler_warnings_are(caplog):
    import logging

    sched = logging.getLogger("apscheduler.scheduler")
    logsetup.configure()
    logsetup.configure()  # configured twice: one filter
    try:
        assert sched.filters.count(logsetup._overlapping_tick) == 1
        with caplog.at_level(logging.WARNING):
            sched.warning('Execution of job "%s" skipped: maximum number of running instances reached (%d)',
                          "Daemon.tick (trigger: interval[0:00:01])", 1)
            sched.warning("Run time of job %r was missed by %s", "Daemon.tick", "0:00:03")
        assert "maximum number of running instances" not in caplog.text and "was missed by" in caplog.text
    finally:
        sched.removeFilter(logsetup._overlapping_tick)


def test_info_lines_are_written_after_every_module_an_entry_point_imports():
    """An import that logs through absl (rouge-score's scorer did, made at import) sets up the root logger at WARNING
    before ``logsetup.configure`` runs, whose ``basicConfig`` then does nothing: the daemon's "stopped cleanly" and a
    training rank's lines went unwritten (CI)."""
    script = ("import logging\n"
              "import evolution.cli, evolution.daemon, evolution.gate, evolution.metrics, evolution.tasks, evolution.worker\n"
              "from evolution import logsetup\n"
              "assert not logging.getLogger().handlers, logging.getLogger().handlers\n"
              "logsetup.configure()\n"
              "logging.getLogger('evolution.test').info('an info line')\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "INFO evolution.test: an info line" in out.stderr
