"""The daemon end to end, as a real process on a tiny model: karma → age-up → hot-swap, crashes, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from evolution.ledger import Ledger
from evolution.ledger import events as ev
from evolution.paths import DataRoot
from tests.conftest import toml_of
from tests.daemon_util import Chatter, DaemonProc


def _config(tmp_path: Path, cfg, **daemon) -> Path:
    d = cfg.to_dict()
    d.pop("quick")
    d["daemon"] = {"poll_seconds": 0.3, **daemon}
    path = tmp_path / "evolution-test.toml"
    path.write_text(toml_of(d))
    return path


def test_karma_past_the_threshold_ages_up_and_swaps_while_chat_never_fails(taught_base, daemon_cfg, tmp_path,
                                                                           _isolated_home):
    conf = _config(tmp_path, daemon_cfg)
    d = DaemonProc(_isolated_home, "--start-gen", "0", "--base", str(taught_base), "--threshold", "10",
                   "--config", str(conf)).start()
    try:
        d.wait_serving(0, 300)
        with Chatter(d.url) as chat:
            # A finished conversation, with personal data, becomes training data without it.
            r = httpx.post(d.url + "/conversations", headers=d.auth(), json={"messages": [
                {"role": "user", "content": "Where is the harbour office? Mail me at ann.lee@example.org"},
                {"role": "assistant", "content": "The harbour office is by the north pier."}]})
            assert r.status_code == 201 and r.json()["redactions"] == {"email": 1}
            # Eight agents post karma at once; together they cross the threshold once.
            with ThreadPoolExecutor(8) as pool:
                grants = list(pool.map(lambda i: httpx.post(d.url + "/karma", headers=d.auth(), timeout=30,
                                                            json={"amount": 2, "reason": f"agent {i}"}), range(8)))
            assert [g.status_code for g in grants] == [201] * 8
            assert sum(g.json()["triggered"] is not None for g in grants) == 1
            d.wait_serving(1, 900)
            ids = [m.id for m in chat.client.models.list().data]
            time.sleep(1.0)  # a few more requests on the child
        assert ids == ["evolution-gen-0001", "evolution@0", "evolution@1"]  # served, then each by name
        assert chat.failures == [], chat.failures[:3]
        assert {"evolution-gen-0000", "evolution-gen-0001"} <= set(chat.models), set(chat.models)
        st = d.status()
        assert st["karma"]["total"] == 16 and st["karma"]["progress"] == 6 and st["karma"]["open_request"] is None
        assert st["swaps"] == 1 and st["requests"]["errors"] == 0
    finally:
        rc = d.stop()
    assert rc == 0, d.output()[-2000:]
    root = DataRoot(_isolated_home)
    with Ledger.open(root) as ledger:
        assert ledger.verify().ok
        assert ledger.served_generation() == 1
        assert len(ledger.entries(kind=ev.KARMA_THRESHOLD_CROSSED)) == 1
    sft = (root.gen_dir(1) / "data" / "sft.jsonl").read_text()
    assert "north pier" in sft and "ann.lee@example.org" not in sft and "[REDACTED:email]" in sft


def test_kill_9_mid_training_then_restart_resumes_and_completes(taught_base, daemon_cfg, tmp_path, _isolated_home):
    # long enough that the kill lands mid-SFT however fast a tiny step is (the restart resumes at >= 4)
    daemon_cfg.train.sft.epochs, daemon_cfg.train.sft.max_steps, daemon_cfg.train.save_steps = 10, 40, 2
    conf = _config(tmp_path, daemon_cfg)
    args = ("--start-gen", "0", "--base", str(taught_base), "--threshold", "5", "--config", str(conf))
    d = DaemonProc(_isolated_home, *args).start()
    try:
        d.wait_serving(0, 300)
        assert httpx.post(d.url + "/karma", headers=d.auth(), json={"amount": 5}).json()["triggered"]
        d.wait(lambda: (p := d.progress()).get("train_stage") == "sft" and p["step"] >= 5, 300, "SFT step 5",
               interval=0.1)
        worker = d.progress()["pid"]
    finally:
        d.stop(signal.SIGKILL)
    # The worker dies with the daemon (no orphan keeps the age-up lock).
    deadline = time.time() + 20
    while time.time() < deadline and os.path.exists(f"/proc/{worker}"):
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{worker}"), "the age-up worker outlived the killed daemon"
    root = DataRoot(_isolated_home)
    assert root.partial_generations() == [1] and root.generations() == [0]

    d2 = DaemonProc(_isolated_home, *args, port=d.port).start()
    try:
        d2.wait(lambda: d2.served() == 0, 120, "the restarted daemon to serve generation 0 again")
        d2.wait_serving(1, 900)
    finally:
        assert d2.stop() == 0
    summary = json.loads((root.gen_dir(1) / "generation.json").read_text())
    assert summary["resumed"] is True
    assert summary["train"]["sft"]["resumed_from_step"] >= 2  # continued from a checkpoint, not from scratch
    with Ledger.open(root) as ledger:
        report = ledger.verify()
        assert report.ok, report.problems
        assert len(ledger.entries(gen=1, kind=ev.GENERATION_CREATED)) == 1
        assert [e.gen for e in ledger.entries(kind=ev.PROMOTED)] == [0, 1]


def test_sigterm_during_training_writes_a_checkpoint_and_exits_0(taught_base, daemon_cfg, tmp_path, _isolated_home):
    daemon_cfg.train.sft.max_steps, daemon_cfg.train.save_steps = 40, 100  # no periodic checkpoint before the end
    conf = _config(tmp_path, daemon_cfg)
    d = DaemonProc(_isolated_home, "--start-gen", "0", "--base", str(taught_base), "--threshold", "1",
                   "--config", str(conf)).start()
    d.wait_serving(0, 300)
    httpx.post(d.url + "/karma", headers=d.auth(), json={"amount": 1})
    d.wait(lambda: (p := d.progress()).get("train_stage") == "sft" and p["step"] >= 2, 300, "SFT step 2",
           interval=0.1)
    assert d.stop(signal.SIGTERM) == 0, d.output()[-2000:]
    sft = DataRoot(_isolated_home).staging_dir(1) / "work" / "sft"
    ckpts = [c for c in sft.glob("checkpoint-*") if (c / "COMPLETE").is_file()]
    assert ckpts, "SIGTERM should leave a complete checkpoint of the training in progress"
    assert ckpts == list(sft.glob("checkpoint-*")), "no checkpoint is left half-written"
    assert not list(_isolated_home.rglob(".*.tmp")), "no atomic write is left half-done"
    assert "stopped cleanly" in (_isolated_home / "logs" / "daemon.log").read_text()
    with Ledger.open(DataRoot(_isolated_home)) as ledger:
        from evolution.intake.karma import Karma

        assert ledger.verify().ok and ledger.served_generation() == 0
        assert [r.status for r in Karma(ledger, 1).requests()] == ["pending"]  # resumed at the next start


@pytest.mark.parametrize("case", ["bad_config", "missing_base", "start_gen_unknown", "port_in_use", "remote_host",
                                  "root_in_use"])
def test_bad_start_stops_with_a_message_that_says_how_to_fix_it(case, tmp_path, _isolated_home, tiny_cfg):
    import socket

    args = ["--start-gen", "0", "--config", str(_config(tmp_path, tiny_cfg))]
    expect = {"bad_config": "daemon.threshold must be a positive number", "missing_base": "not a Hugging Face checkpoint directory",
              "start_gen_unknown": "start a new lineage with --start-gen 0", "port_in_use": "choose another port",
              "remote_host": "allow_remote",
              "root_in_use": "another daemon is already running on the data root"}[case]
    sock = claim = None
    if case == "bad_config":
        args += ["--threshold", "-3"]
    elif case == "missing_base":
        args += ["--base", str(tmp_path / "nope")]
    elif case == "start_gen_unknown":
        args[1] = "3"
    elif case == "remote_host":
        args += ["--host", "0.0.0.0"]
    d = DaemonProc(_isolated_home, *args)
    if case == "port_in_use":
        sock = socket.socket()
        sock.bind(("127.0.0.1", d.port))
        sock.listen()
    elif case == "root_in_use":  # another process (this one) holds the data root, as a running daemon does
        from evolution.daemon import identity

        root = DataRoot(_isolated_home)
        root.prepare()
        claim = identity.claim(root)
        (root.root / identity.INFO_FILE).write_text(json.dumps({"pid": os.getpid(), "host": "127.0.0.1", "port": 1}))
    try:
        d.start()
        rc = d.proc.wait(120)
    finally:
        if sock:
            sock.close()
        if claim:
            claim.release()
    assert rc == 1  # a failure, not a usage error (2 is click's: a bad option)
    assert expect in d.output(), d.output()[-1500:]
    assert "Traceback" not in d.output()


def test_a_daemon_restarted_at_once_gets_its_port_back_but_a_port_in_use_is_refused():
    """Connections the stopped daemon closed linger in TIME_WAIT for a minute; they must not block a restart."""
    import socket

    from evolution.daemon import listen_socket
    from evolution.errors import EvolutionError

    old = listen_socket("127.0.0.1", 0)
    old.listen()
    port = old.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = old.accept()
    conn.close()  # the server closes first: its end of the connection waits in TIME_WAIT
    client.close()
    old.close()
    again = listen_socket("127.0.0.1", port)
    try:
        again.listen()
        with pytest.raises(EvolutionError, match=r"cannot listen on 127.0.0.1:\d+: Address already in use"):
            listen_socket("127.0.0.1", port)  # a daemon is listening there now
    finally:
        again.close()
