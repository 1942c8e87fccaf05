"""`evolve ui`: the lineage dashboard, read-only, over any data root (a backup, a copy) without a daemon."""

from __future__ import annotations

import click

from evolution.cli.ledger import url_option
from evolution.ledger import Ledger
from evolution.paths import DataRoot
from evolution.cli.lineage import lineage_option


def create_app(root: DataRoot, ledger: Ledger):
    """The dashboard's routes alone: pages and JSON, no API, no actions (they need the daemon)."""
    from fastapi import FastAPI

    from evolution.cli.karma import open_karma
    from evolution.dashboard import View, add_error_handlers, router

    view = View(root, ledger)
    karma = open_karma(root, ledger)
    app = FastAPI(title="evolution dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(router(view, lambda: view.offline_status(karma)))
    add_error_handlers(app)
    return app


@click.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8766, show_default=True, help="Port.")
@click.option("--allow-remote", is_flag=True,
              help="Allow a non-loopback --host (the pages show stored chats to whoever can reach it).")
@url_option
@lineage_option
def ui(host: str, port: int, allow_remote: bool, ledger_url: str | None) -> None:
    """Serve the lineage dashboard, read-only, for the data root ($EVOLUTION_HOME); open the printed URL.

    A running daemon serves the same pages, with its live state and the actions, at its own
    address (http://127.0.0.1:8765/ by default).
    """
    import ipaddress

    import uvicorn

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise click.UsageError(f"--host {host!r} is not a loopback address: the dashboard shows stored chats and "
                               "transcripts to anyone who can reach it; add --allow-remote if that is intended")
    root = DataRoot.from_env().existing()
    with Ledger.open(root, ledger_url) as ledger:
        app = create_app(root, ledger)
        click.echo(f"dashboard of {root.root} (read-only): http://{host}:{port}/  (Ctrl-C stops it)")
        uvicorn.run(app, host=host, port=port, log_level="warning")
