"""Tampered files: a GGUF cut short or swapped for another, an adapter modified after the gate.

Each is caught by ``ledger verify`` and by the hash check before a model is served; the served
generation never changes to a file that is not the one the ledger recorded. (Edited, deleted and
truncated ledger entries: ``tests/ledger/test_ledger_verify.py``; a flipped byte in a GGUF:
``tests/test_server.py``; an adapter changed between the gate and the promotion: ``test_kill.py``.)
"""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from evolution.cli import main
from evolution.config import DaemonConfig
from evolution.daemon import Daemon
from evolution.errors import IntegrityError
from evolution.fsutil import make_tree_writable, sha256_file
from tests.conftest import SERVER_TOKEN

AUTH = {"Authorization": f"Bearer {SERVER_TOKEN}"}
ASK = {"messages": [{"role": "user", "content": "What is your name?"}], "max_tokens": 4}


def _problems(daemon, what: str) -> list[str]:
    return [p.message for p in daemon.ledger.verify().problems if p.what == what]


@pytest.mark.parametrize("how", ["cut short", "swapped for another generation's"])
def test_a_tampered_gguf_is_caught_by_verify_and_never_served(client, daemon, how, tally):
    gguf = daemon.root.gen_dir(0) / "model.gguf"
    make_tree_writable(daemon.root.gen_dir(0))
    if how == "cut short":
        os.truncate(gguf, gguf.stat().st_size // 2)
    else:  # a whole, loadable GGUF, just not the one gated as generation 0
        gguf.write_bytes((daemon.root.gen_dir(1) / "model.gguf").read_bytes())
    with tally.fault(f"tamper · GGUF {how.split()[0]}"):
        changed = _problems(daemon, "artifact_changed")
        assert len(changed) == 1 and "gen_0000/model.gguf" in changed[0], changed
        r = client.post("/rollback", json={"to": 0}, headers=AUTH)
        assert r.status_code == 409 and "sha256" in r.json()["error"]["message"], r.text
        assert daemon.host.current.gen == 1 and daemon.ledger.served_generation() == 1
        assert client.post("/v1/chat/completions", json=ASK).json()["model"] == "evolution-gen-0001"
        out = CliRunner().invoke(main, ["ledger", "verify"], env={"EVOLUTION_HOME": str(daemon.root.root)})
        assert out.exit_code == 1 and "artifact_changed" in out.output


def test_a_served_gguf_cut_short_while_stopped_is_refused_at_the_next_start(daemon, tally):
    daemon.stop()
    gguf = daemon.root.gen_dir(1) / "model.gguf"
    make_tree_writable(daemon.root.gen_dir(1))
    with tally.fault("tamper · GGUF cut"):
        os.truncate(gguf, gguf.stat().st_size - 4096)
        again = Daemon(daemon.root, daemon.cfg, DaemonConfig(api_token=SERVER_TOKEN))
        with pytest.raises(IntegrityError, match=r"generation 1's GGUF .* restore the original"):
            again.prepare()
        assert again.host.current is None  # nothing was loaded, let alone served
        again.stop()


def test_a_modified_adapter_is_caught_by_verify(client, daemon, tally):
    adapter = daemon.root.gen_dir(1) / "adapter" / "adapter_model.safetensors"
    make_tree_writable(daemon.root.gen_dir(1))
    recorded = sha256_file(adapter)
    data = bytearray(adapter.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    adapter.write_bytes(bytes(data))
    with tally.fault("tamper · adapter modified"):
        changed = _problems(daemon, "artifact_changed")
        assert len(changed) == 1 and "gen_0001/adapter/adapter_model.safetensors" in changed[0], changed
        assert recorded[:12] in changed[0]
        assert daemon.host.current.gen == 1  # the adapter is never what is served: the GGUF is
