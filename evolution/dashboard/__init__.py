"""The lineage dashboard: read-only pages over the ledger, live age-up state, and token-guarded actions.

``router(view, live)`` gives the routes; the daemon's server includes them (same port as the API)
and `evolve ui` serves them alone over any data root (read-only: no actions). The page is static
HTML and JS under ``static/`` that builds itself from the JSON endpoints below, putting every
stored string in as text (``textContent``), never as markup; a Content-Security-Policy allows only
the dashboard's own scripts. Charts are uPlot, vendored in ``static/vendor/`` (works offline).

=============================  =================================================================
``/``                          the page (lineage, live, experience; ``#/gen/N``: one generation)
``/ui/static/<file>``          its JS, CSS and the vendored chart library
``/ui/api/lineage``            every generation: parent, verdict, served, metrics and deltas, sha256 (*)
``/ui/api/generation/<n>``     the gate report, failed rules, child/parent replies, losses, manifest (*)
``/ui/api/live``               the daemon's ``/status`` (or, under `evolve ui`, the data root's)
``/ui/api/verify``             ``evolve ledger verify`` (``?artifacts=1`` re-hashes every artifact)
``/ui/api/experience``         recent captured chats and posted conversations with their labels (*)
=============================  =================================================================

(*) Stored user text or model replies (a rejection's reason may quote a taught probe): private where chat is. Under the daemon they need the API
token when ``[daemon] chat_requires_token`` is set or it listens beyond loopback; under
`evolve ui --allow-remote` always. The page sends the token it holds with every read and, when one of
these answers 401, asks for it in place of the page.

Actions are the API's own endpoints (``POST /rollback``, ``/resume``, ``/feedback``), called by
the page with the token as ``Authorization: Bearer``; the token is kept in the tab's
``sessionStorage``, never in a URL or a cookie.
"""

from evolution.dashboard.data import View
from evolution.dashboard.routes import add_error_handlers, router

__all__ = ["View", "add_error_handlers", "router"]
