"""`evolve ui`: the lineage dashboard, read-only, over any data root (a backup, a copy) without a daemon.

On loopback its pages are open, like a local daemon's. With ``--allow-remote`` the reads that return
stored chats, transcripts and model replies need the API token (the daemon's, found as the daemon finds
it: ``[daemon] api_token``, ``$EVOLUTION_API_TOKEN``, else ``daemon.token`` in the data root, made there
if there is none), which the page asks for.
"""

from __future__ import annotations

import click

from evolution.cli.ledger import url_option
from evolution.ledger import Ledger
from evolution.paths import DataRoot
from evolution.cli.lineage import lineage_option


def create_app(root: DataRoot, ledger: Ledger, token: tuple[str, str] | None = None):
    """The dashboard's routes alone: pages and JSON, no API, no actions (they need the daemon).

    ``token``: (the token, where it is); given, reads of stored user text and model replies need it."""
    from fastapi import FastAPI

    from evolution import status
    from evolution.cli.karma import open_intake
    from evolution.dashboard import View, add_error_handlers, router
    from evolution.server import ApiError, api_error, token_guard

    intake = open_intake(root, ledger)
    view = View(root, ledger, intake)
    app = FastAPI(title="evolution dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(ApiError, api_error)
    guard = None if token is None else token_guard(*token)
    app.include_router(router(view, lambda: status.read(root, ledger, intake) | {"readonly": True}, guard=guard))
    add_error_handlers(app)
    return app


def _token(root: DataRoot) -> tuple[str, str]:
    from evolution import config
    from evolution.daemon import identity

    try:
        return identity.api_token(root, config.resolve_daemon(home=root.home))
    except OSError as exc:  # no token yet and a data root we cannot write (a read-only copy)
        raise click.ClickException(f"--allow-remote needs an API token and none could be made in {root.home} "
                                   f"({exc}); set ${identity.TOKEN_ENV} or [daemon] api_token") from None


@click.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8766, show_default=True, help="Port.")
@click.option("--allow-remote", is_flag=True,
              help="Allow a non-loopback --host; the lineage, replies and stored chats then need the API token.")
@url_option
@lineage_option
def ui(host: str, port: int, allow_remote: bool, ledger_url: str | None) -> None:
    """Serve the lineage dashboard, read-only, for the data root ($EVOLUTION_HOME); open the printed URL.

    A running daemon serves the same pages, with its live state and the actions, at its own
    address (http://127.0.0.1:8765/ by default).
    """
    import uvicorn

    from evolution.server import is_loopback

    if not is_loopback(host) and not allow_remote:
        raise click.UsageError(f"--host {host!r} is not a loopback address: the dashboard shows stored chats and "
                               "transcripts to anyone who can reach it; add --allow-remote if that is intended "
                               "(they then need the API token)")
    root = DataRoot.from_env().existing()
    token = _token(root) if allow_remote else None
    with Ledger.open(root, ledger_url) as ledger:
        app = create_app(root, ledger, token)
        click.echo(f"dashboard of {root.root} (read-only): http://{host}:{port}/  (Ctrl-C stops it)")
        if token is not None:
            click.echo(f"stored chats and replies need the API token, in {token[1]}")
        uvicorn.run(app, host=host, port=port, log_level="warning")
