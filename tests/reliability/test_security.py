"""Security: who can reach the daemon and change it, and what it trusts from disk.

- It listens on loopback only unless told otherwise (``--host`` elsewhere also needs
  ``allow_remote``: ``tests/test_daemon.py``).
- Every write endpoint wants the token, and compares it in constant time (``hmac.compare_digest``).
- No pickle is read from disk: weights are safetensors and every ``torch.load`` is weights-only
  (a checkpoint carrying pickled code: ``test_tamper.py``).
- The GGUF that llama.cpp loads is the very file whose hash was checked against the ledger, even
  if another is renamed over its path in between.
"""

from __future__ import annotations

import ast
import hmac
import os
import socket
from pathlib import Path

import pytest

from evolution.errors import IntegrityError
from evolution.fsutil import make_tree_writable
from evolution.ledger import check_servable
from evolution.paths import DataRoot
from tests.conftest import SERVER_TOKEN
from tests.daemon_util import DaemonProc
from tests.reliability.conftest import copy_root, daemon_config_file

SOURCE = Path(__file__).resolve().parents[2] / "evolution"


def _listening(port: int) -> set[str]:
    """The local addresses a socket is listening on at ``port`` (read from /proc/net/tcp and tcp6)."""
    found = set()
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        table = Path("/proc/net") / name
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            host, hex_port = local.split(":")
            if int(hex_port, 16) != port or state != "0A":  # 0A: LISTEN
                continue
            raw = bytes.fromhex(host)  # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(socket.inet_ntop(family, raw))
    return found


def test_the_daemon_listens_on_loopback_only_by_default(gen0, tmp_path, tally):
    if not Path("/proc/net/tcp").exists():
        pytest.skip("reads the listening sockets from /proc/net (Linux)")
    src, cfg = gen0
    root = DataRoot(copy_root(src.root, tmp_path / "root"))
    d = DaemonProc(root.root, "--config", str(daemon_config_file(tmp_path, cfg))).start()  # no --host
    try:
        d.wait_serving(0, timeout=180)
        tally.trial("security · listens on loopback only")
        assert _listening(d.port) == {"127.0.0.1"}, d.output()[-2000:]
    finally:
        assert d.stop() == 0


NEAR_MISSES = [
    {},  # no header
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": f"Basic {SERVER_TOKEN}"},
    {"Authorization": SERVER_TOKEN},  # no scheme
    {"Authorization": f"Bearer {SERVER_TOKEN[:-1]}"},  # a prefix
    {"Authorization": f"Bearer {SERVER_TOKEN}0"},  # one character more
    {"Authorization": f"Bearer {SERVER_TOKEN[:-1]}X"},  # the last character differs
    {"Authorization": f"Bearer {SERVER_TOKEN.upper()}"},
    {"Authorization": f"Bearer {SERVER_TOKEN[:8]} {SERVER_TOKEN[8:]}"},
    {"Authorization": f"Bearer {SERVER_TOKEN}\u00e9".encode("latin-1")},  # not ASCII
    {"X-Api-Key": SERVER_TOKEN},  # the right token in the wrong place
]


def test_every_near_miss_of_the_token_is_refused_and_compared_in_constant_time(client, daemon, monkeypatch, tally):
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    writes = (("/karma", {"amount": 1}), ("/conversations", {"messages": [{"role": "user", "content": "hi"}]}),
              ("/rollback", {"to": 0}))
    for path, body in writes:
        for headers in NEAR_MISSES:
            tally.bad_input("security · token near misses (HTTP)")
            r = client.post(path, json=body, headers=headers)
            assert r.status_code == 401, (path, headers, r.text)
            assert "Authorization: Bearer <token>" in r.json()["error"]["message"]
        r = client.post(f"{path}?token={SERVER_TOKEN}", json=body)
        assert r.status_code == 401
    assert daemon.intake.karma.state().total == 0 and daemon.intake.conversations.count() == (0, 0)
    assert daemon.host.current.gen == 1 and daemon.ledger.served_generation() == 1
    bearer = sum(1 for h in NEAR_MISSES if str(h.get("Authorization", "")).lower().startswith("bearer "))
    assert len(compared) >= bearer * len(writes)  # each presented token went through compare_digest
    assert all(b == SERVER_TOKEN.encode() for _, b in compared)
    assert client.post("/karma", json={"amount": 1}, headers={"Authorization": f"Bearer {SERVER_TOKEN}"}
                       ).status_code == 201
    assert daemon.intake.karma.state().total == 1


def _calls(tree: ast.AST, module: str, name: str):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name
                and isinstance(node.func.value, ast.Name) and node.func.value.id == module):
            yield node


def test_no_pickle_is_read_from_disk_by_our_code():
    """Every ``torch.load`` in ``evolution/`` passes ``weights_only=True``; nothing calls pickle or numpy pickles."""
    checked = 0
    for path in SOURCE.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree, "torch", "load"):
            kw = {k.arg: k.value for k in call.keywords}
            assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                f"{path}:{call.lineno}: torch.load without weights_only=True"
            checked += 1
        for name in ("load", "loads", "Unpickler"):
            assert not list(_calls(tree, "pickle", name)), f"{path}: unpickles"
        for call in _calls(tree, "np", "load"):
            kw = {k.arg: k.value for k in call.keywords}
            assert not (isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value), path
    saved = [p for p in SOURCE.rglob("*.py") if "save_pretrained(" in p.read_text()]
    for path in saved:  # and every model or adapter we write is safetensors
        for line in path.read_text().splitlines():
            if "save_pretrained(" in line and "tokenizer" not in line.lower():
                assert "safe_serialization=True" in line, f"{path}: {line.strip()}"
    assert saved  # the scan found the code it is about


def test_the_gguf_loaded_is_the_file_that_was_hash_checked(daemon, monkeypatch, tally):
    """Renaming another file over the GGUF between the hash check and llama.cpp's open changes nothing."""
    from evolution import serving

    path = daemon.root.gen_dir(0) / "model.gguf"
    sha256 = check_servable(daemon.ledger, 0)["sha256"]
    real_hash = serving._hash_fd
    make_tree_writable(daemon.root.gen_dir(0))
    impostor = daemon.root.gen_dir(0) / "impostor.gguf"

    def hash_then_swap(fd: int) -> str:
        digest = real_hash(fd)
        impostor.write_bytes(b"GGUF" + os.urandom(4096))  # not a model llama.cpp could load
        os.replace(impostor, path)  # the path now names another file; the open fd does not
        return digest

    monkeypatch.setattr(serving, "_hash_fd", hash_then_swap)
    with tally.fault("tamper · GGUF renamed over after its hash check"):
        slot = daemon.host.load(0, path, sha256)
        try:
            assert slot.canary_reply  # the gated model loaded and answered
        finally:
            slot.close()
    monkeypatch.setattr(serving, "_hash_fd", real_hash)
    with pytest.raises(IntegrityError, match="will not be served"):  # the next load sees the impostor for what it is
        daemon.host.load(0, path, sha256)
