"""The daemon: serve the current generation, watch karma, age up in the background, swap safely.

``python run_daemon.py --start-gen 0`` runs ``entry.run``. The parts:

- ``core``: ``Daemon`` — the served model (``evolution.serving.ModelHost``), start-up
  reconcile, swap and rollback, the scheduler's ``tick``, status;
- ``workers``: the age-up worker process (``evolution.worker``) at lower CPU priority;
- ``identity``: the API token and ``daemon.json``;
- ``entry``: binding the port and running the HTTP server (``evolution.server``, which
  reaches the daemon only through its ``Service`` protocol) until SIGTERM.

Generations are built in ``gen_NNNN.partial/`` and only a complete, gated, loaded and
canary-tested child is recorded as promoted (``evolution.promotion``). SIGTERM: uvicorn stops
accepting and drains open requests; the worker writes a checkpoint and exits; the daemon exits 0.
"""

from evolution.daemon.core import Daemon
from evolution.daemon.entry import listen_socket, run
from evolution.daemon.identity import INFO_FILE, TOKEN_ENV, TOKEN_FILE

__all__ = ["INFO_FILE", "TOKEN_ENV", "TOKEN_FILE", "Daemon", "listen_socket", "run"]
