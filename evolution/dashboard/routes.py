"""The dashboard's HTTP routes (FastAPI), over a ``View``, a live-status function and a token guard.

The reads that return stored user text or model replies run the caller's ``guard`` first:
``/ui/api/experience`` (chats and transcripts), ``/ui/api/generation/<n>`` (both models' eval replies,
taught questions) and ``/ui/api/lineage`` (a rejected generation's reason quotes the gate, which may quote
a probe the user taught). The daemon's guard and `evolve ui --allow-remote`'s refuse them without the API
token (401 naming where it is). The page itself, its files, the live state and verify stay open, and the
live state says whether the others need the token (``token_for_reads``) so the page can ask for it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse

from evolution.dashboard.data import View
from evolution.errors import UnknownGeneration

STATIC = Path(__file__).parent / "static"
FILES = {"app.js": "text/javascript", "app.css": "text/css", "vendor/uPlot.iife.min.js": "text/javascript",
         "vendor/uPlot.min.css": "text/css"}
"""Everything the page loads; nothing else under ``static/`` is served."""

CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
"""Only the dashboard's own files run: an injected ``<script>`` or ``onerror`` would be refused even if
a string ever reached the page as markup. Inline styles are allowed for the chart library."""

HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-store"}


def add_error_handlers(app: FastAPI) -> None:
    """A query or path value of the wrong type (``/ui/api/generation/abc``, ``?limit=0``) is answered in the API's
    error format (400, ``{"error": {"message", "type", "code", "param"}}``), not FastAPI's 422 list."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        name = str((first.get("loc") or ("", ""))[-1])
        value = first.get("input")
        message = f"'{name}' {first.get('msg', 'is invalid').lower()}" + ("" if value is None else
                                                                          f", got {str(value)[:40]!r}")
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": "invalid_value",
                                       "param": name or None}}, status_code=400)


def _json(obj) -> JSONResponse:
    return JSONResponse(obj, headers={"Cache-Control": "no-store"})


def router(view: View, live: Callable[[], dict], guard: Callable[[Request], None] | None = None) -> APIRouter:
    """The routes. ``guard(request)`` raises (a 401) unless the request may read stored user text and model
    replies; None leaves those reads open (loopback, chat open)."""
    r = APIRouter()
    private = [Depends(guard)] if guard is not None else []

    @r.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=HEADERS)

    @r.get("/ui/static/{name:path}", include_in_schema=False)
    def static(name: str):
        if name not in FILES:
            raise HTTPException(404)
        return FileResponse(STATIC / name, media_type=FILES[name], headers=HEADERS | {"Cache-Control": "max-age=300"})

    @r.get("/ui/api/lineage", dependencies=private)
    def lineage():
        return _json(view.lineage())

    @r.get("/ui/api/generation/{n}", dependencies=private)
    def generation(n: int):
        try:
            return _json(view.generation(n))
        except UnknownGeneration as exc:
            return JSONResponse({"error": {"message": str(exc), "type": "invalid_request_error",
                                           "code": "generation_not_found"}}, status_code=404)

    @r.get("/ui/api/live")
    def live_state():
        return _json(live() | {"token_for_reads": guard is not None})

    @r.get("/ui/api/verify")
    def verify(artifacts: bool = Query(False)):
        return _json(view.verify(artifacts))

    @r.get("/ui/api/experience", dependencies=private)
    def experience(limit: int = Query(30, ge=1, le=200)):
        return _json(view.experience(limit))

    return r
