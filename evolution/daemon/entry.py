"""The daemon's process entry: bind the port, prepare, serve HTTP with uvicorn until SIGTERM / SIGINT."""

from __future__ import annotations

import logging
import signal
import socket

from evolution.daemon.core import Daemon
from evolution.errors import EvolutionError

log = logging.getLogger(__name__)


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for the server, or an error that says what to do.

    ``SO_REUSEADDR`` as uvicorn sets it: a daemon restarted right after it stopped must not be
    refused for the minute its closed connections linger in TIME_WAIT. A port another process
    is listening on is still refused.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise EvolutionError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another port with --port "
                             "(another daemon may be running: `evolve status`)") from None
    return sock


def app_for(daemons: list[Daemon]):
    """The HTTP app: one lineage's own, or a ``Router`` over several (one token: the first lineage's)."""
    from evolution.daemon.router import Router
    from evolution.server import create_app

    if len(daemons) == 1:
        return create_app(daemons[0])
    for other in daemons[1:]:
        other.token, other.token_source = daemons[0].token, daemons[0].token_source
    by_name = {dm.root.lineage: dm for dm in daemons}
    return Router({n: create_app(dm) for n, dm in by_name.items()}, by_name, daemons[0].dcfg.max_body_bytes)


def prepare_all(daemons: list[Daemon], port: int) -> None:
    """Prepare every lineage served on ``port``, the first one first. One port has one token: the first
    lineage's, handed to the others before they prepare, so none of them generates a token file of its own
    that nothing would accept. If one fails, those prepared are stopped (their daemon.lock claims released)."""
    prepared: list[Daemon] = []
    try:
        for dm in daemons:
            dm.port = port
            if prepared:
                dm.token, dm.token_source = daemons[0].token, daemons[0].token_source
            prepared.append(dm)
            dm.prepare()
    except BaseException:
        for dm in prepared:  # the one that failed too: its claim is released
            try:
                dm.stop()
            except Exception:  # the start's own error is the one to report
                log.exception("stopping lineage %s after a failed start", dm.root.lineage)
        raise


def run(daemon: Daemon, *others: Daemon) -> int:
    """Prepare, then serve until SIGTERM / SIGINT; return the exit code. ``others``: more lineages served
    by the same process and port (routed by ``evolution.daemon.router``)."""
    import uvicorn

    daemons = [daemon, *others]
    d = daemon.dcfg
    sock = listen_socket(d.host, d.port)
    try:
        prepare_all(daemons, sock.getsockname()[1])
    except BaseException:
        sock.close()
        raise
    app = app_for(daemons)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=60,
                                           limit_concurrency=256, access_log=False))
    for dm in daemons:
        dm.start_scheduler()
    log.info("serving on http://%s:%d (OpenAI base_url http://%s:%d/v1); write endpoints need the token in %s",
             d.host, daemon.port, d.host, daemon.port, daemon.token_source)
    # uvicorn handles SIGTERM/SIGINT (stop accepting, drain open requests) and re-raises the signal
    # to the handler that was installed before it once it is done: ours, so the exit stays clean.
    stopped_by: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopped_by.append(signum))
    try:
        server.run(sockets=[sock])
    finally:
        for dm in daemons:
            dm.stop()
    log.info("stopped cleanly")
    return 0
