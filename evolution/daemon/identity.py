"""Who the daemon is on a data root: its API token and ``daemon.json`` (address, threshold, pid).

The token guards every write endpoint, and the reads of stored chats and model replies where chat
needs it or the daemon listens beyond loopback (``evolution.server``). It comes from the config
(``[daemon] api_token``), else ``$EVOLUTION_API_TOKEN``, else a file generated on first start (mode
0600) beside the data.
``daemon.json`` lets `evolve status` find a running daemon. ``daemon.lock`` is held for the
daemon's life (an OS file lock, released by the kernel when the process dies, even by kill -9), so
a second daemon on the same data root is refused instead of serving beside the first, running its
age-up requests and overwriting its ``daemon.json``. All three are per lineage (in ``DataRoot.home``:
the data root itself for ``main``, ``lineages/NAME/`` otherwise): a daemon serving several lineages
claims each, and another daemon may serve a lineage it does not.
"""

from __future__ import annotations

import logging
import os
import secrets

from filelock import FileLock

from evolution.config import DaemonConfig
from evolution.errors import EvolutionError
from evolution.fsutil import atomic_write_json, atomic_write_text, try_lock
from evolution.paths import INFO_FILE, MAIN, DataRoot

log = logging.getLogger(__name__)

TOKEN_ENV = "EVOLUTION_API_TOKEN"
TOKEN_FILE = "daemon.token"
LOCK_FILE = "daemon.lock"


def claim(root: DataRoot) -> FileLock:
    """Hold the data root for this daemon, or say which daemon already does and what to do."""
    lock = try_lock(root.home / LOCK_FILE)
    if lock is None:
        info = root.daemon_info() or {}
        who = f" (pid {info['pid']}, http://{info.get('host')}:{info.get('port')})" if "pid" in info else ""
        where = f"the data root {root.root}" if root.lineage == MAIN else \
            f"lineage {root.lineage} of the data root {root.root}"
        raise EvolutionError(
            f"another daemon is already running on {where}{who}; one lineage is served by one daemon: use that "
            "one (`evolve status`), stop it first (SIGTERM), or start this one on another data root (--home / "
            "$EVOLUTION_HOME) or lineage (--lineage / --lineages)")
    return lock


def write_info(root: DataRoot, dcfg: DaemonConfig, port: int, started: float) -> None:
    atomic_write_json(root.home / INFO_FILE, {
        "pid": os.getpid(), "host": dcfg.host, "port": port, "threshold": dcfg.threshold,
        "threshold_growth": dcfg.threshold_growth, "started": started,
    })


def api_token(root: DataRoot, dcfg: DaemonConfig) -> tuple[str, str]:
    """The bearer token (write endpoints, private reads), and where it came from (said in 401 messages)."""
    if dcfg.api_token:
        return dcfg.api_token, "the config's daemon.api_token"
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV], f"${TOKEN_ENV}"
    f = root.home / TOKEN_FILE
    if not f.is_file():
        atomic_write_text(f, secrets.token_urlsafe(32) + "\n")
        f.chmod(0o600)
        log.info("generated an API token for write endpoints in %s", f)
    return f.read_text().strip(), str(f)
