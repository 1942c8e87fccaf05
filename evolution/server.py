"""The daemon's HTTP API: OpenAI-compatible chat for the agent, plus karma, conversations and control.

===========================  ======  =====================================================
path                         token   what
===========================  ======  =====================================================
``/v1/chat/completions``     opt.    chat with the served generation (``stream`` or not)
``/v1/models``               opt.    the served generation, as an OpenAI model; then each one by name (``@N``)
``/health``                  no      200 when a model is served, 503 while starting
``/status``                  no      served generation, age-up stage / step / ETA, karma
``/metrics``                 no      the same state and request counts in the Prometheus text format (``evolution.monitoring``)
``/karma`` (POST)            yes     ``{"amount", "reason", "idempotency_key"}``
``/karma`` (GET)             no      karma total, progress and threshold
``/conversations`` (POST)    yes     ``{"messages": [...], "label", "idempotency_key"}``
``/probes`` (POST)           yes     ``{"question", "answers": [...]}``: asked by every later gate, never trained on
``/feedback`` (POST)         yes     ``{"completion_id" | "conversation_id", "label", "correction", "karma"}``
``/rollback`` (POST)         yes     ``{"to": N, "reason"}``: serve an earlier gated generation
``/resume`` (POST)           yes     ``{"reason"}``: lift the stop rule (as `evolve resume`)
``/`` and ``/ui/...``        no      the lineage dashboard (``evolution.dashboard``): the page, live state, verify
``/ui/api/lineage``          priv.   every generation (a rejection's reason may quote a taught probe)
``/ui/api/generation/<n>``   priv.   one generation's gate report with both models' eval replies
``/ui/api/experience``       priv.   stored chats and transcripts
===========================  ======  =====================================================

"priv." reads return stored user text or model replies: they need the token whenever chat does
(``[daemon] chat_requires_token``) and whenever the daemon listens beyond loopback (``allow_remote``),
so nobody reads what a chat that needs the token would keep from them; otherwise (loopback, chat
open) they are open like the rest of the dashboard.

The token is sent as ``Authorization: Bearer <token>`` (what the ``openai`` client sends as
its ``api_key``) and compared in constant time. Errors use OpenAI's shape,
``{"error": {"message", "type", "code"}}``, with 400 (malformed), 401 (token), 404 (unknown
generation, model or rated item), 409 (not servable, idempotency key reused), 413 (too large), 503 (no
model yet), 507 (the disk is full: nothing was recorded).

Every chat completion served is kept as an experience (scrubbed, as the reply is finished)
unless the request says ``"store": false`` or ``[daemon] capture = false``; a streamed reply only
once it ran to its end.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from evolution import dashboard, monitoring
from evolution import messages as messages_mod
from evolution.config import AgeUpConfig, DaemonConfig
from evolution.errors import (
    ConversationError,
    DiskFull,
    EvolutionError,
    ExperienceError,
    IdempotencyConflict,
    IntegrityError,
    KarmaError,
    LedgerError,
    LoadError,
    MessageError,
    NotReady,
    ProbeError,
    UnknownExperience,
    UnknownGeneration,
)
from evolution.intake import Intake
from evolution.ledger import Ledger
from evolution.paths import DataRoot
from evolution.serving import (Slot, Stream, answered_by, model_alias, model_id, parse_model, parse_pinned, pinned_id,
                               pinned_model, split_task)

log = logging.getLogger(__name__)


class Service(Protocol):
    """What the HTTP layer asks of the daemon (``evolution.daemon.core.Daemon`` implements it).

    Blocking methods are called from a worker thread; each raises the domain errors of
    ``evolution.errors``, which the handlers below turn into statuses.
    """

    dcfg: DaemonConfig
    cfg: AgeUpConfig
    """The lineage's age-up settings: its ``[tasks]`` are what ``evolution:TASK`` and a posted ``"task"`` may name."""
    token: str
    token_source: str
    root: DataRoot
    ledger: Ledger
    """Read by the dashboard's pages (``evolution.dashboard.View``); written only through the methods below."""
    intake: Intake
    """The user's data: probes are added to it, karma read from it, directly; a karma grant, a rating and a
    transcript go through ``add_karma``, ``rate`` and ``add_conversation`` (they may start an age-up, or teach
    what retrieval gives the next chat)."""

    def served(self) -> Slot | None:
        """The generation answering chats now (None while generation 0 is built)."""

    def notes(self, args: dict, retrieve: bool) -> list:
        """The lessons retrieval puts into this chat's prompt (``evolution.retrieval``; none when not ``retrieve``)."""

    def chat(self, args: dict, notes: list = (), gen: int | None = None, task: str | None = None) -> tuple[dict, Slot]:
        """One chat completion (OpenAI's shape), ``notes`` in its prompt, and the generation that answered it: the
        served one, or gated generation ``gen`` asked by name (LedgerError, IntegrityError, LoadError when it cannot
        answer); with ``task``'s adapters applied; ValueError when the prompt does not fit; NotReady."""

    def stream(self, args: dict, notes: list = (), gen: int | None = None, task: str | None = None) -> Stream:
        """A streamed completion whose first chunk has been decoded."""

    def task_models(self) -> list[dict]:
        """The OpenAI model object of each task (``evolution:TASK``), with the adapters the served generation has."""

    def task_problem(self, task: str) -> str | None:
        """Why ``task`` cannot be answered now (its adapter would not load), else None."""

    def older_generations(self) -> list[dict]:
        """The gated generations that may be asked by name (``evolution@N``), kept, not pruned: ``generation``,
        ``created`` (Unix time), ``sha256``."""

    def add_conversation(self, messages, key: str | None, label: str | None, task: str | None = None):
        """Store a posted transcript (``ConversationStore.add``); the next chat can retrieve it."""

    def add_karma(self, amount, reason: str, key: str | None):
        """Grant karma (``Karma.add``); one that crosses the threshold wakes the scheduler."""

    def capture(self, messages: list[dict], reply: str, completion_id: str, slot: Slot, finish_reason: str | None,
                cut_off: bool = False, task: str | None = None) -> None:
        """Keep a served chat as an experience (scrubbed; ``task``'s where one was asked); never raises."""

    def rate(self, item_id, label, correction, karma, key: str | None, by: str):
        """Rate a served completion (``by="completion"``) or a posted transcript (``"conversation"``)
        (``ExperienceStore.rate``); karma granted with it that crosses the threshold wakes the scheduler."""

    def rollback(self, to: int, reason: str): ...

    def resume(self, reason: str):
        """Lift the stop rule (``ageups_resumed``); ``LedgerError`` when age-ups are not paused."""

    def status(self) -> dict: ...

    def telemetry(self) -> dict:
        """What ``GET /metrics`` shows of the daemon (``evolution.monitoring.DaemonCollector`` reads it)."""

SMALL_BODY = 16_384
"""Limit of karma and rollback bodies."""


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def _error(status: int, message: str, type_: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": code, "param": param}}, status_code=status)


async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    """The exception handler that answers an ``ApiError`` in OpenAI's error shape."""
    return _error(exc.status, exc.message, exc.type, exc.code, exc.param)


def require_token(request: Request, token: str, source: str) -> None:
    """Refuse a request without ``Authorization: Bearer <token>`` (compared in constant time): 401 naming
    ``source``, where the token is."""
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, "missing or wrong API token: send 'Authorization: Bearer <token>' (the token is in "
                            f"{source})", "authentication_error", "invalid_api_key")


def token_guard(token: str, source: str):
    """A FastAPI dependency that runs ``require_token`` (the dashboard's guard of private reads)."""
    def guard(request: Request) -> None:
        require_token(request, token, source)
    return guard


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address or ``localhost``) is reachable from this machine only."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BodyLimit:
    """ASGI middleware: refuse a body over the path's limit with 413, before reading it all."""

    def __init__(self, app, limits: dict[str, int], default: int):
        self.app, self.limits, self.default = app, limits, default

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits.get(scope["path"], self.default)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _error(413, f"request body larger than the {limit}-byte limit of {scope['path']}",
                                "invalid_request_error", "body_too_large")(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise ApiError(413, f"request body larger than the {limit}-byte limit of {scope['path']}",
                                   code="body_too_large")
            return message

        return await self.app(scope, limited, send)


async def _json(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}", code="malformed_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the JSON body must be an object, got {type(body).__name__}", code="malformed_json")
    return body


def _number(body: dict, name: str, lo: float, hi: float, default=None, integer: bool = False):
    v = body.get(name, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()) \
            or not math.isfinite(v) or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        bounds = f"{lo:d} and {hi:d}" if integer else f"{lo:g} and {hi:g}"
        raise ApiError(400, f"'{name}' must be {kind} between {bounds}, got {v!r}", param=name)
    return int(v) if integer else float(v)


_PASSTHROUGH_NUMBERS = (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0), ("presence_penalty", -2.0, 2.0),
                        ("frequency_penalty", -2.0, 2.0))


def _chat_args(body: dict, default_max_tokens: int, n_ctx: int) -> dict[str, Any]:
    try:
        clean = messages_mod.validate(body.get("messages"), messages_mod.CHAT)
    except MessageError as exc:
        raise ApiError(400, str(exc), param="messages") from None
    if body.get("tools") or body.get("functions"):
        raise ApiError(400, "tools / function calling are not supported by this server", param="tools")
    n = _number(body, "n", 1, 1, 1, integer=True)
    del n
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", 1, n_ctx, default_max_tokens, integer=True)
    args: dict[str, Any] = {"messages": clean, "max_tokens": max_tokens}
    for name, lo, hi in _PASSTHROUGH_NUMBERS:
        if body.get(name) is not None:
            args[name] = _number(body, name, lo, hi)
    if body.get("seed") is not None:
        args["seed"] = _number(body, "seed", -(2**63), 2**63 - 1, integer=True)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
        args["stop"] = stop
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object"):
            raise ApiError(400, "'response_format' supports {\"type\": \"text\"} or {\"type\": \"json_object\"}",
                           param="response_format")
        if rf["type"] == "json_object":
            args["response_format"] = {"type": "json_object"}
    return args


RETRIEVAL_HEADER = "X-Evolution-Retrieval"
"""A request's header that turns retrieval off for it (``off``), like the body field ``"retrieval": false``."""
NOTES_HEADER = "X-Evolution-Notes"
"""A chat reply's header: how many retrieved lessons its prompt held."""


def _retrieval_wanted(request: Request, body: dict) -> bool:
    flag = body.get("retrieval")
    if flag is not None and not isinstance(flag, bool):
        raise ApiError(400, f"'retrieval' must be true or false, got {flag!r}", param="retrieval")
    header = request.headers.get(RETRIEVAL_HEADER)
    if header is not None and header.strip().lower() not in ("on", "off"):
        raise ApiError(400, f"header {RETRIEVAL_HEADER} must be 'on' or 'off', got {header[:20]!r}",
                       param=RETRIEVAL_HEADER)
    return flag is not False and (header or "on").strip().lower() != "off"


def create_app(daemon: Service) -> FastAPI:
    d = daemon.dcfg
    app = FastAPI(title="evolution", docs_url=None, redoc_url=None, openapi_url=None)
    stats = {"requests": 0, "completions": 0, "rejected": 0, "errors": 0}
    metrics = monitoring.Metrics(daemon.telemetry)

    def authorize(request: Request, required: bool) -> None:
        if required:
            require_token(request, daemon.token, daemon.token_source)

    def private_read(request: Request) -> None:
        authorize(request, True)

    # Stored user text and model replies are as private as chat (a reader must not see what a chat that
    # needs the token keeps from them), and private beyond loopback even where chat is left open.
    reads_private = d.chat_requires_token or not is_loopback(d.host)
    app.add_exception_handler(ApiError, api_error)

    @app.exception_handler(NotReady)
    async def _not_ready(request, exc):
        return _error(503, str(exc), "server_error", "model_not_ready")

    def _counted(fn):
        async def wrapper(request: Request):
            stats["requests"] += 1
            try:
                return await fn(request)
            except (ApiError, NotReady):
                stats["rejected"] += 1
                raise
            except Exception:
                stats["errors"] += 1
                raise
        wrapper.__name__ = fn.__name__
        return wrapper

    @app.get("/health")
    async def health():
        slot = daemon.served()
        if slot is None and d.idle_unload_s:  # unloaded for idling: the next chat loads it
            gen = await run_in_threadpool(daemon.ledger.served_generation)
            if gen is not None:
                return {"status": "ok", "served_generation": gen, "model": model_id(gen, daemon.root.lineage),
                        "loaded": False}
        if slot is None:
            return JSONResponse({"status": "starting", "served_generation": None}, status_code=503)
        return {"status": "ok", "served_generation": slot.gen, "model": slot.id}

    @app.get("/status")
    async def status():
        return (await run_in_threadpool(daemon.status)) | {"requests": dict(stats)}

    @app.get("/metrics")
    async def prometheus_metrics():
        # Read-only and open like /status (which shows the same state): a scraper needs no token.
        return Response(await run_in_threadpool(metrics.render), media_type=monitoring.CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request, d.chat_requires_token)
        slot = daemon.served()
        data = [] if slot is None else [{"id": slot.id, "object": "model", "created": int(slot.loaded_at),
                                         "owned_by": "evolution", "generation": slot.gen, "sha256": slot.sha256}]
        data += daemon.task_models()  # the served generation with each task's adapters
        # every gated generation kept, by name, for comparison (loaded on first use)
        data += [pinned_model(g, daemon.root.lineage) for g in await run_in_threadpool(daemon.older_generations)]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{name}")
    async def model(name: str, request: Request):
        authorize(request, d.chat_requires_token)
        slot = daemon.served()
        pinned = parse_pinned(name)
        if pinned is not None and pinned[0] == daemon.root.lineage:
            for g in await run_in_threadpool(daemon.older_generations):
                if g["generation"] == pinned[1]:
                    return pinned_model(g, daemon.root.lineage)
        for m in daemon.task_models():
            if m["id"] == name:
                return m
        if slot is None or name != slot.id:
            raise ApiError(404, f"model {name!r} is not served here; GET /v1/models lists the one that is",
                           code="model_not_found")
        return {"id": slot.id, "object": "model", "created": int(slot.loaded_at), "owned_by": "evolution"}

    @app.post("/v1/chat/completions")
    @_counted
    async def chat(request: Request):
        authorize(request, d.chat_requires_token)
        body = await _json(request)
        args = _chat_args(body, d.max_tokens, d.n_ctx)
        gen, task = _check_model(body.get("model"), daemon.served())
        store = body.get("store")
        if store is not None and not isinstance(store, bool):
            raise ApiError(400, f"'store' must be true or false, got {store!r}", param="store")
        keep = d.capture if store is None else store
        notes = await run_in_threadpool(daemon.notes, args, _retrieval_wanted(request, body))
        if body.get("stream"):
            return await _stream(args, keep, notes, gen, task)
        out = await run_in_threadpool(_complete, args, keep, notes, gen, task)
        return JSONResponse(out, headers={NOTES_HEADER: str(len(notes))})

    def _check_model(asked, slot: Slot | None) -> tuple[int | None, str | None]:
        """``(generation, task)``: the generation asked for by name (``evolution@N``: ``Daemon.older_host``) or None
        for the served one, and the task whose adapters answer (``evolution:TASK``, ``[tasks]``) or None.
        Refuse a model id of ours that this daemon does not serve: another lineage, an unknown task, or a ``-gen-N``
        id that is not the served one. Any other name gets the served generation (clients that insist on a name)."""
        if not isinstance(asked, str):
            return None, None
        lineage, alias = daemon.root.lineage, model_alias(daemon.root.lineage)
        asked, task = split_task(asked)
        if task is not None:
            return _check_task(asked, task, lineage, alias)
        pinned = parse_pinned(asked)
        if pinned is not None:
            if pinned[0] != lineage:
                raise ApiError(404, f"model {asked!r} is not served here: this daemon serves lineage {lineage!r} "
                                    f"({alias}@N names its generation N)", code="model_not_found", param="model")
            return pinned[1], None
        if asked.startswith(alias + "@"):
            raise ApiError(400, f"model {asked!r}: put a generation number after '@' ({alias}@3 asks generation 3)",
                           param="model")
        ours = parse_model(asked)
        if ours is not None and ours[0] != lineage:
            raise ApiError(404, f"model {asked!r} is not served here: this daemon serves lineage {lineage!r} "
                                f"({alias}); GET /v1/models lists it", code="model_not_found")
        if asked.startswith(alias + "-gen-") and slot is not None and asked != slot.id:  # malformed ones too
            raise ApiError(404, f"model {asked!r} is not the served generation ({slot.id}); "
                                f"omit 'model' or use {alias!r} to get whichever is served", code="model_not_found")
        return None, None

    def _check_task(asked: str, task: str, lineage: str, alias: str) -> tuple[None, str]:
        """``evolution[-LINEAGE]:TASK``: the served generation with ``task``'s adapters, if this lineage has it."""
        shown = repr(f"{asked}:{task}"[:120])  # the name as asked (untrusted: cut short)
        ours = parse_model(asked)
        if ours is not None and ours[0] != lineage:
            raise ApiError(404, f"model {shown} is not served here: this daemon serves lineage {lineage!r} "
                                f"({alias}:TASK names its tasks)", code="model_not_found", param="model")
        if asked != alias:
            raise ApiError(400, f"model {shown}: a task is asked of the served generation, as "
                                f"'{alias}:{task[:60]}' (not of a generation by number)", param="model")
        if task not in daemon.cfg.tasks.names:
            raise ApiError(404, f"model {shown}: lineage {lineage!r} has no task {task[:60]!r}; its tasks: "
                                f"{_task_names()}", code="model_not_found", param="model")
        problem = daemon.task_problem(task)
        if problem is not None:
            raise ApiError(409, f"model {shown}: {problem}", code="not_servable", param="model")
        return None, task

    def _by_name(gen: int | None, call):
        """``call()``, with the errors of asking generation ``gen`` by name (it cannot be loaded) as statuses."""
        try:
            return call()
        except (LedgerError, IntegrityError, LoadError) as exc:
            if gen is None:
                raise
            # the ledger's refusal (unknown, rejected, pruned, missing; asking by name off) is 404; a file that
            # changed or would not load, 409
            status, code = (404, "model_not_found") if isinstance(exc, LedgerError) else (409, "not_servable")
            raise ApiError(status, f"model {pinned_id(gen, daemon.root.lineage)!r}: {exc}", code=code,
                           param="model") from None

    def _complete(args: dict, keep: bool, notes: list, gen: int | None = None, task: str | None = None) -> dict:
        try:
            out, slot = _by_name(gen, lambda: daemon.chat(args, notes, gen, task))
        except ValueError as exc:  # e.g. the prompt does not fit the context window
            raise ApiError(400, str(exc), code="context_length_exceeded") from None
        stats["completions"] += 1
        metrics.tokens.inc((out.get("usage") or {}).get("completion_tokens") or 0)
        if keep:
            # Kept before the reply goes out, so the agent can rate it the moment it has the id (a few ms
            # against a reply's hundreds); a capture that fails is counted, never raised.
            choice = out["choices"][0]
            daemon.capture(args["messages"], choice["message"].get("content") or "", out["id"], slot,
                           choice.get("finish_reason"), task=task)
        return out

    async def _stream(args: dict, keep: bool, notes: list, gen: int | None = None, task: str | None = None):
        try:
            st = await run_in_threadpool(_by_name, gen, lambda: daemon.stream(args, notes, gen, task))
        except ValueError as exc:
            raise ApiError(400, str(exc), code="context_length_exceeded") from None

        async def events():
            parts: list[str] = []
            finish, completion_id = None, None
            try:
                item = st.first
                while item is not None:
                    if isinstance(item, Exception):
                        stats["errors"] += 1
                        log.error("stream failed: %s", item)
                        err = {"error": {"message": str(item), "type": "server_error", "code": None}}
                        yield f"data: {json.dumps(err)}\n\n"
                        return
                    item["model"] = answered_by(st.slot, task)
                    completion_id = item.get("id", completion_id)
                    for choice in item.get("choices") or []:
                        parts.append((choice.get("delta") or {}).get("content") or "")
                        if parts[-1]:
                            metrics.tokens.inc()  # llama.cpp streams a chunk per token (a few merged when a stop string is held back)
                        finish = choice.get("finish_reason") or finish
                    yield f"data: {json.dumps(item)}\n\n"
                    item = await run_in_threadpool(st.get)
                stats["completions"] += 1
                # Only a stream that ran to its end is kept (one cut off by a client that hung up is closed
                # at a yield above), and before [DONE]: the agent may rate it as soon as the stream ends.
                if keep and completion_id:
                    await run_in_threadpool(daemon.capture, args["messages"], "".join(parts), completion_id,
                                            st.slot, finish, False, task)
                yield "data: [DONE]\n\n"
            finally:
                st.cancel()  # a client that hung up lets the model go at the next chunk

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", NOTES_HEADER: str(len(notes))})

    async def _intake(request: Request, body: dict, param: str, fn, item_param: str | None = None):
        """Store something the agent sent (``fn(idempotency_key)``), once per idempotency key: 201 new,
        200 repeated, 409 key reused, 404 an unknown item to rate (``item_param`` names its field)."""
        key = body.get("idempotency_key") or request.headers.get("idempotency-key")
        try:
            result = await run_in_threadpool(fn, key)
        except IdempotencyConflict as exc:
            raise ApiError(409, str(exc), param="idempotency_key", code="idempotency_key_reused") from None
        except UnknownExperience as exc:
            raise ApiError(404, str(exc), param=item_param or param, code="not_found") from None
        except (KarmaError, ConversationError, ExperienceError, ProbeError) as exc:
            raise ApiError(400, str(exc), param=exc.param or param) from None
        return JSONResponse(result.to_dict(), status_code=200 if result.duplicate else 201)

    @app.get("/karma")
    async def karma_state():
        return (await run_in_threadpool(daemon.intake.karma.state)).to_dict()

    @app.post("/karma")
    @_counted
    async def karma_add(request: Request):
        authorize(request, True)
        body = await _json(request)
        if "amount" not in body:
            raise ApiError(400, "'amount' is required: the karma to add, a number greater than 0", param="amount")
        return await _intake(request, body, "amount",
                             lambda key: daemon.add_karma(body["amount"], body.get("reason", ""), key))

    @app.post("/conversations")
    @_counted
    async def conversations(request: Request):
        authorize(request, True)
        body = await _json(request)
        task = _task_field(body)
        return await _intake(request, body, "messages",
                             lambda key: daemon.add_conversation(body.get("messages"), key, body.get("label"), task))

    @app.post("/probes")
    @_counted
    async def probes(request: Request):
        authorize(request, True)
        body = await _json(request)
        task = _task_field(body)
        return await _intake(request, body, "question",
                             lambda key: daemon.intake.probes.add(body.get("question"), body.get("answers"), key, task))

    def _task_field(body: dict) -> str | None:
        """A posted transcript's or probe's ``task`` (``[tasks] names``), checked; None: the lineage's own."""
        task = body.get("task")
        if task is not None and task not in daemon.cfg.tasks.names:
            raise ApiError(400, f"unknown task {str(task)[:60]!r}; this lineage's tasks: {_task_names()}", param="task")
        return task

    def _task_names() -> str:
        """What an unknown task's error lists: the lineage's ``[tasks] names``, or where to set them."""
        return ", ".join(daemon.cfg.tasks.names) or "none ([tasks] names in evolution.toml)"

    @app.post("/feedback")
    @_counted
    async def feedback(request: Request):
        authorize(request, True)
        body = await _json(request)
        unknown = set(body) - {"completion_id", "conversation_id", "label", "correction", "karma", "idempotency_key"}
        if unknown:
            raise ApiError(400, f"unknown field(s) {', '.join(sorted(unknown))}; /feedback takes completion_id or "
                                "conversation_id, label, correction, karma, idempotency_key", param=sorted(unknown)[0])
        if ("completion_id" in body) == ("conversation_id" in body):
            raise ApiError(400, "give exactly one of 'completion_id' (a chatcmpl-… id this server returned) or "
                                "'conversation_id' (from POST /conversations)", param="completion_id")
        by = "completion" if "completion_id" in body else "conversation"
        item = body[f"{by}_id"]
        return await _intake(request, body, "label", lambda key: daemon.rate(
            item, body.get("label"), body.get("correction"), body.get("karma"), key, by), item_param=f"{by}_id")

    @app.post("/rollback")
    @_counted
    async def rollback(request: Request):
        authorize(request, True)
        body = await _json(request)
        to = _number(body, "to", 0, 2**31 - 1, integer=True)
        if to is None:
            raise ApiError(400, "'to' is required: the generation number to serve", param="to")
        reason = body.get("reason", "rollback over HTTP")
        if not isinstance(reason, str) or len(reason) > 500:
            raise ApiError(400, "'reason' must be text of at most 500 characters", param="reason")
        try:
            entry = await run_in_threadpool(daemon.rollback, to, reason)
        except LedgerError as exc:
            unknown = isinstance(exc, UnknownGeneration)
            raise ApiError(404 if unknown else 409, str(exc), code="generation_not_found" if unknown
                           else "not_servable", param="to") from None
        except (IntegrityError, LoadError) as exc:
            raise ApiError(409, str(exc), code="not_servable", param="to") from None
        return {"served_generation": to, "ledger_seq": entry.seq}

    @app.post("/resume")
    @_counted
    async def resume(request: Request):
        authorize(request, True)
        body = await _json(request)
        reason = body.get("reason", "resumed over HTTP")
        if not isinstance(reason, str) or len(reason) > 500:
            raise ApiError(400, "'reason' must be text of at most 500 characters", param="reason")
        try:
            entry = await run_in_threadpool(daemon.resume, reason)
        except LedgerError as exc:
            raise ApiError(409, str(exc), code="not_paused") from None
        return {"resumed": True, "ledger_seq": entry.seq}

    app.include_router(dashboard.router(dashboard.View(daemon.root, daemon.ledger, daemon.intake), daemon.status,
                                        guard=private_read if reads_private else None))
    dashboard.add_error_handlers(app)

    @app.exception_handler(DiskFull)
    async def _disk_full(request, exc):
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return _error(507, str(exc), "server_error", "insufficient_storage")

    @app.exception_handler(EvolutionError)
    async def _evolution_error(request, exc):
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return _error(500, str(exc), "server_error")

    @app.exception_handler(404)
    async def _not_found(request, exc):
        return _error(404, f"no such endpoint: {request.method} {request.url.path}", "invalid_request_error",
                      "not_found")

    @app.exception_handler(405)
    async def _method(request, exc):
        return _error(405, f"{request.method} is not allowed on {request.url.path}", "invalid_request_error",
                      "method_not_allowed")

    limits = {"/v1/chat/completions": d.max_body_bytes, "/conversations": d.max_conversation_bytes,
              "/feedback": d.max_conversation_bytes}
    app.add_middleware(BodyLimit, limits=limits, default=SMALL_BODY)
    app.add_middleware(monitoring.HttpMetrics, metrics=metrics, router=app.router)  # outermost: a 413 is counted too
    return app
