"""Tampered files: a GGUF cut short or swapped for another, an adapter modified after the gate,
a training checkpoint changed on disk or made to carry pickled code.

Each is caught by ``ledger verify`` and by the hash check before a model is served; the served
generation never changes to a file that is not the one the ledger recorded. Ledger entries edited,
deleted or cut from the tail: no generation is served, rolled back to or trained from until the
chain verifies (every kind of ledger tampering ``verify`` names: ``tests/ledger/test_ledger_verify.py``;
a flipped byte in a GGUF:
``tests/test_server.py``; an adapter changed between the gate and the promotion: ``test_kill.py``.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from evolution.cli import main
from evolution.config import DaemonConfig
from evolution.daemon import Daemon
from evolution.errors import EvolutionError, IntegrityError
from evolution.fsutil import make_tree_writable, sha256_file
from evolution.train import COMPLETE, train
from tests.conftest import SERVER_TOKEN
from tests.ledger.conftest import tamper_sqlite
from tests.test_train import DATA, _Crash

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


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_modified_adapter_is_caught_by_verify(client, daemon, tally):
    adapter = daemon.root.gen_dir(1) / "adapter" / "adapter_model.safetensors"
    make_tree_writable(daemon.root.gen_dir(1))
    recorded = sha256_file(adapter)
    _flip(adapter)  # one bit of one weight
    with tally.fault("tamper · adapter modified"):
        changed = _problems(daemon, "artifact_changed")
        assert len(changed) == 1 and "gen_0001/adapter/adapter_model.safetensors" in changed[0], changed
        assert recorded[:12] in changed[0]
        assert daemon.host.current.gen == 1  # the adapter is never what is served: the GGUF is


# -- training checkpoints: a kill leaves them on disk for days, and the next run loads them --------


class _Payload:
    """A pickle that runs code when loaded: what an attacker would put in a checkpoint."""

    def __init__(self, proof: Path):
        self.proof = proof

    def __reduce__(self):
        return (Path.write_text, (self.proof, "unpickled"))


def _interrupted(tiny_base, tiny_cfg, work: Path) -> Path:
    with pytest.raises(KeyboardInterrupt):
        train(tiny_base, DATA, tiny_cfg.train, work, extra_callbacks=[_Crash("sft", 5)])
    assert sorted(p.name for p in (work / "sft").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    return work / "sft" / "checkpoint-4"


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_a_checkpoint_changed_on_disk_is_set_aside_and_training_resumes_before_it(tiny_base, tiny_cfg, tmp_path,
                                                                                  name, tally):
    work = tmp_path / "work"
    ckpt = _interrupted(tiny_base, tiny_cfg, work)
    _flip(ckpt / name)  # one bit, the file still parses (or nearly): only its hash tells
    with tally.fault("tamper · training checkpoint changed"):
        result = train(tiny_base, DATA, tiny_cfg.train, work)
        assert result.stages["sft"].resumed_from_step == 2 and result.stages["sft"].steps == 6
        rejected = list((work / "sft" / "rejected").glob("checkpoint-4-*"))
        assert len(rejected) == 1 and (rejected[0] / name).is_file()  # kept for a post-mortem, not loaded
        assert load_file(result.adapter_dir / "adapter_model.safetensors")


def test_a_checkpoint_holding_pickled_code_is_never_unpickled(tiny_base, tiny_cfg, tmp_path, tally):
    """Even with its marker rewritten to match (whoever wrote the file knew the format), the code never runs."""
    work = tmp_path / "work"
    ckpt = _interrupted(tiny_base, tiny_cfg, work)
    proof = tmp_path / "pwned"
    torch.save({"state": _Payload(proof), "param_groups": []}, ckpt / "optimizer.pt")
    marker = json.loads((ckpt / COMPLETE).read_text())
    marker["sha256"]["optimizer.pt"] = sha256_file(ckpt / "optimizer.pt")
    (ckpt / COMPLETE).write_text(json.dumps(marker))
    with tally.fault("tamper · training checkpoint pickle"):
        with pytest.raises(EvolutionError, match=r"checkpoint-4 holds a pickled object that is not plain tensors"):
            train(tiny_base, DATA, tiny_cfg.train, work)
        assert not proof.exists()
        assert not ckpt.exists() and list((work / "sft" / "rejected").glob("checkpoint-4-*"))
        result = train(tiny_base, DATA, tiny_cfg.train, work)  # the next attempt: from checkpoint 2
        assert result.stages["sft"].resumed_from_step == 2 and result.stages["sft"].steps == 6 and not proof.exists()


def test_a_finished_stage_whose_adapter_changed_is_trained_again(tiny_base, tiny_cfg, tmp_path, tally):
    work = tmp_path / "work"
    first = train(tiny_base, DATA, tiny_cfg.train, work)
    good = sha256_file(first.adapter_dir / "adapter_model.safetensors")
    _flip(first.adapter_dir / "adapter_model.safetensors")
    with tally.fault("tamper · finished stage adapter changed"):
        again = train(tiny_base, DATA, tiny_cfg.train, work)
        assert again.stages["cpt"].skipped and not again.stages["sft"].skipped  # only the changed stage runs again
        assert list((work / "sft" / "rejected").glob("adapter-*"))
        # resumed from its last checkpoint, which was the last step: the same weights come back
        assert again.stages["sft"].resumed_from_step == 6
        assert sha256_file(again.adapter_dir / "adapter_model.safetensors") == good


# -- the ledger itself: an entry edited to vouch for another file, or history cut ----------------


@pytest.mark.parametrize("how", ["edited", "deleted", "truncated"])
def test_a_tampered_ledger_is_never_served_from(client, daemon, how, tally):
    """``edited``: generation 0's GGUF replaced by another and its ledger entry edited to vouch for it —
    the file now matches the ledger, so only the hash chain tells."""
    root = daemon.root
    exported0 = next(e for e in daemon.ledger.entries(gen=0) if e.kind == "exported")
    if how == "edited":
        make_tree_writable(root.gen_dir(0))
        old, new = sha256_file(root.gen_dir(0) / "model.gguf"), sha256_file(root.gen_dir(1) / "model.gguf")
        (root.gen_dir(0) / "model.gguf").write_bytes((root.gen_dir(1) / "model.gguf").read_bytes())
        tamper_sqlite(root.ledger_dir / "ledger.db", f"UPDATE ledger_entries SET payload = replace(payload, "
                      f"'{old}', '{new}') WHERE seq = {exported0.seq}")
    elif how == "deleted":
        tamper_sqlite(root.ledger_dir / "ledger.db", f"DELETE FROM ledger_entries WHERE seq = {exported0.seq + 1}")
    else:
        last = daemon.ledger.entries()[-1].seq
        tamper_sqlite(root.ledger_dir / "ledger.db", f"DELETE FROM ledger_entries WHERE seq >= {last - 1}")
    with tally.fault(f"tamper · ledger entry {how}"):
        assert not daemon.ledger.verify(artifacts=False).ok
        r = client.post("/rollback", json={"to": 0}, headers=AUTH)
        assert r.status_code == 409 and "does not verify" in r.json()["error"]["message"], r.text
        assert daemon.host.current.gen == 1  # the model served before the tampering goes on serving
        assert client.post("/v1/chat/completions", json=ASK).json()["model"] == "evolution-gen-0001"
        daemon.stop()
        again = Daemon(daemon.root, daemon.cfg, DaemonConfig(api_token=SERVER_TOKEN))
        with pytest.raises(IntegrityError, match=r"does not verify: .*restore the ledger"):
            again.prepare()
        assert again.host.current is None  # a restart serves nothing from it
        again.stop()
