"""One HTTP server for several lineages: each request handed to its lineage's own app (``server.create_app``).

Which lineage a request is for:

- ``POST /v1/chat/completions``: the OpenAI ``model`` field (``evolution-NAME``, ``evolution-NAME-gen-N``,
  ``evolution-NAME@N``, ``evolution-NAME:TASK``; ``evolution`` / ``evolution-gen-N`` / ``evolution@N`` are ``main``'s); a name that is not ours goes to the first lineage;
  a lineage of ours that is not served here is refused with 404 ``model_not_found``;
- ``GET /v1/models``: every lineage's served generation (loaded or not: one unloaded for idling is
  loaded by its next request), then every lineage's gated generations by name (``evolution-NAME@N``); ``GET /v1/models/NAME``: NAME's lineage;
- ``/lineages/NAME/...``: everything else for lineage NAME (``/lineages/deacon/karma``,
  ``/feedback``, ``/rollback``, ``/status`` …); any other path is the first lineage's.

The router reads a chat body (up to the lineage's ``max_body_bytes``) to find its ``model`` and hands
the same bytes on; it adds no rule of its own beyond the routing, so every lineage's app checks its
token, limits and input as a single-lineage daemon does.
"""

from __future__ import annotations

import json

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse

from evolution.serving import model_alias, model_id, model_lineage, pinned_model

CHAT, MODELS, PREFIX = "/v1/chat/completions", "/v1/models", "/lineages/"


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": code,
                                   "param": None}}, status_code=status)


class Router:
    """``apps``: lineage name -> its ASGI app; ``daemons``: name -> its ``Daemon`` (for ``/v1/models``)."""

    def __init__(self, apps: dict, daemons: dict, max_body_bytes: int):
        self.apps, self.daemons, self.max_body = apps, daemons, max_body_bytes
        self.first = next(iter(apps))

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":  # the lineages' apps have no start-up or shutdown hooks
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return await self.apps[self.first](scope, receive, send)
        path = scope["path"]
        if path.startswith(PREFIX):
            name, _, rest = path[len(PREFIX):].partition("/")
            if name not in self.apps:
                return await self._unknown(name)(scope, receive, send)
            inner = dict(scope, path="/" + rest, raw_path=("/" + rest).encode())
            return await self.apps[name](inner, receive, send)
        if path == MODELS and scope["method"] == "GET":
            return await self._models(scope, receive, send)
        if path.startswith(MODELS + "/"):
            return await self._by_model(path[len(MODELS) + 1:], scope, receive, send)
        if path == CHAT and scope["method"] == "POST":
            return await self._chat(scope, receive, send)
        return await self.apps[self.first](scope, receive, send)

    def _unknown(self, name: str) -> JSONResponse:
        served = ", ".join(model_alias(n) for n in self.apps)
        return _error(404, f"lineage {name!r} is not served here; this daemon serves {served}", "model_not_found")

    async def _by_model(self, name: str, scope, receive, send):
        lineage = model_lineage(name)
        if lineage is not None and lineage not in self.apps:
            return await self._unknown(lineage)(scope, receive, send)
        return await self.apps[lineage or self.first](scope, receive, send)

    async def _chat(self, scope, receive, send):
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            return await self.apps[self.first](scope, receive, send)  # its own limit answers 413, unread
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await _error(413, f"request body larger than the {self.max_body}-byte limit of {CHAT}",
                                    "body_too_large")(scope, receive, send)
        try:
            asked = json.loads(body).get("model")
        except (ValueError, AttributeError):  # not JSON, or not an object: the app says what is wrong
            asked = None
        lineage = model_lineage(asked)
        if lineage is not None and lineage not in self.apps:
            return await self._unknown(lineage)(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.apps[lineage or self.first](scope, replay, send)

    async def _models(self, scope, receive, send):
        """The first lineage's app answers (its token check included); every lineage's model is listed."""
        captured: dict = {}

        async def keep(message):
            if message["type"] == "http.response.start":
                captured["status"] = message["status"]
            elif message["type"] == "http.response.body":
                captured["body"] = captured.get("body", b"") + message.get("body", b"")

        await self.apps[self.first](scope, receive, keep)
        if captured.get("status") != 200:
            return await JSONResponse(json.loads(captured.get("body") or b"{}"),
                                      status_code=captured.get("status", 500))(scope, receive, send)
        data = []
        for name, d in self.daemons.items():
            slot = d.served()
            if slot is not None:
                data.append({"id": slot.id, "object": "model", "created": int(slot.loaded_at), "owned_by": "evolution",
                             "generation": slot.gen, "sha256": slot.sha256, "lineage": name, "loaded": True})
                continue
            gen = d.ledger.served_generation()
            if gen is not None:
                data.append({"id": model_id(gen, name), "object": "model", "created": 0, "owned_by": "evolution",
                             "generation": gen, "lineage": name, "loaded": False})
        for name, d in self.daemons.items():  # each task: the served generation with the task's adapters
            data += [m | {"lineage": name} for m in d.task_models()]
        for name, d in self.daemons.items():  # every gated generation kept, by name (loaded on first use)
            loaded = set(d.older.loaded())
            data += [pinned_model(g, name) | {"lineage": name, "loaded": g["generation"] in loaded}
                     for g in await run_in_threadpool(d.older_generations)]
        return await JSONResponse({"object": "list", "data": data})(scope, receive, send)
