"""The Starlette app: OpenAI-compatible routes over ``GatewayCore`` (the logic the gRPC handlers use too).

Routes: POST /v1/chat/completions, POST /v1/responses, GET /v1/responses/{id}, POST /v1/conversations,
GET and DELETE /v1/conversations/{id}, GET /v1/models, /healthz, /readyz, /metrics, and the web chat page
(GET / and its files under /static, from the package's ``static`` folder: no build step, nothing from a CDN). Every refusal is a
``sinkserve.errors`` error mapped to HTTP in ``errors.py``'s one table. A streaming client that disconnects
cancels the turn (the backend stream is cancelled, the replica stops generating), as on gRPC.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from sinkserve.errors import InvalidArgument, NotFound, SinkServeError
from sinkserve.gateway.core import GatewayCore
from sinkserve.gateway.interceptors import bearer_key
from sinkserve.http import mapping
from sinkserve.http.errors import answer_for
from sinkserve.protocol import TurnDelta, TurnFinished
from sinkserve.store import Tenant, TurnRecord

logger = logging.getLogger("sinkserve.http")

MODE_HEADER = "x-sinkserve-session-mode"
SESSION_HEADER_OUT = "x-sinkserve-session-id"
CONVERSATION_PREFIX = "conv_"
RESPONSE_PREFIX = "resp_"
STATIC_DIR = Path(__file__).parent / "static"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("sinkserve_http_requests", "HTTP requests by route and status",
                                ("route", "status"), registry=self.registry)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("sinkserve_http_time_to_first_token_seconds", "request start to the first text",
                              ("route",), buckets=buckets, registry=self.registry)
        self.inter_token = Histogram("sinkserve_http_inter_token_seconds", "time between streamed text deltas",
                                     ("route",), buckets=buckets, registry=self.registry)


def model_id(core: GatewayCore) -> str:
    model = core.settings.engine.model
    return Path(model).name if "/" in model else model


def _error_response(exc: BaseException) -> JSONResponse:
    answer = answer_for(exc)
    if answer.http_status >= 500:
        logger.warning("HTTP %d: %s: %s", answer.http_status, type(exc).__name__, exc,
                       exc_info=exc if answer.http_status == 500 else None)
    return JSONResponse(answer.body, status_code=answer.http_status, headers=answer.headers)


def _sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return body


async def _watch_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, events: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """`events` until they end or the client disconnects; on a disconnect the pending step is cancelled (the
    cancellation reaches the backend stream, which stops the replica's turn). Starlette may also notice the
    disconnect itself and cancel this generator: the pending step is cancelled then too."""
    watcher = asyncio.ensure_future(_watch_disconnect(request))
    step: asyncio.Future | None = None
    try:
        while True:
            step = asyncio.ensure_future(events.__anext__())
            await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                logger.info("client disconnected: turn cancelled")
                return
            try:
                event = step.result()
            except StopAsyncIteration:
                return
            step = None
            yield event
    finally:
        watcher.cancel()
        if step is not None and not step.done():
            step.cancel()  # runs on in its own task: the turn's cleanup (lock, reservation) happens there


class Turn:
    """One turn's events as text and a final result (a replayed TurnRecord counts as a whole turn)."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.finish_reason = "stop"
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.turn = 0
        self.replica = ""
        self.cache_entries = 0
        self.finished = False
        self.cut = False

    def take(self, event: Any) -> str:
        """The text the event adds."""
        if isinstance(event, TurnDelta):
            self.text.append(event.text)
            return event.text
        if isinstance(event, (TurnFinished, TurnRecord)):
            self.finished = True
            self.finish_reason = event.finish_reason
            self.cut = event.finish_reason == "aborted"
            self.prompt_tokens, self.completion_tokens = event.prompt_tokens, event.completion_tokens
            self.turn = event.turn
            self.replica = event.replica
            self.cache_entries = getattr(event, "cache_entries", 0)  # a replayed TurnRecord has none
            self.text.append(event.text)
            return event.text
        return ""

    @property
    def reply(self) -> str:
        return "".join(self.text)


class HttpApi:
    def __init__(self, core: GatewayCore):
        self.core = core
        self.store = core.store
        self.metrics = Metrics()
        self.session_header = core.settings.gateway.http_session_header.lower()
        self.model = model_id(core)

    # ------------------------------------------------------------------ plumbing
    def route(self, name: str, handler: Callable[[Request], Awaitable[Response]]):
        async def endpoint(request: Request) -> Response:
            try:
                response = await handler(request)
            except Exception as exc:  # noqa: BLE001 - the one place errors become HTTP answers
                response = _error_response(exc)
            self.metrics.requests.labels(name, str(response.status_code)).inc()
            return response

        return endpoint

    async def tenant(self, request: Request) -> Tenant:
        return await self.core.authenticate(bearer_key(request.headers.items()))

    def timed(self, name: str, started: float, events: AsyncIterator[Any]) -> AsyncIterator[Any]:
        metrics = self.metrics

        async def wrapped() -> AsyncIterator[Any]:
            last = None
            async for event in events:
                if isinstance(event, (TurnDelta, TurnFinished, TurnRecord)) and event.text:
                    now = time.monotonic()
                    if last is None:
                        metrics.ttft.labels(name).observe(now - started)
                    else:
                        metrics.inter_token.labels(name).observe(now - last)
                    last = now
                yield event

        return wrapped()

    async def _first(self, events: AsyncIterator[Any]) -> tuple[Any, AsyncIterator[Any]]:
        """Pull the first event before answering, so that refusals (auth, quota, busy) get their HTTP status."""
        first = await events.__anext__()

        async def rest() -> AsyncIterator[Any]:
            yield first
            async for event in events:
                yield event

        return first, rest()

    async def _discard(self, tenant: Tenant, session_id: str) -> None:
        try:
            await asyncio.shield(self.core.delete_session(tenant, session_id))
        except (SinkServeError, Exception):  # noqa: BLE001 - best effort: a one-off session
            logger.info("could not close session %s", session_id, exc_info=True)

    # ------------------------------------------------------------------ chat completions
    async def chat_completions(self, request: Request) -> Response:
        started = time.monotonic()
        tenant = await self.tenant(request)
        body = await _body(request)
        fields = mapping.chat_fields(body)
        messages = mapping.chat_messages(body)
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        handle = request.headers.get(self.session_header)
        conv = self.store.conversations
        sid, text, mode = None, None, "one-off"
        if handle:
            sid = await conv.handle(tenant.name, handle)
            if sid is not None:
                try:
                    await self.core.own_session(tenant, sid)
                    text = mapping.new_user_text(await conv.chat_digests(sid), messages)
                except NotFound:
                    sid = None
            if text is not None:
                mode = "continued"
            else:
                mode = "rebuilt" if sid else "created"
                if sid:
                    await self._discard(tenant, sid)
                sid = None
        if sid is None:
            system, text = mapping.rebuild_plan(messages)
            record, _ = await self.core.create_session(tenant, system_prompt=system)
            sid = record.session_id
            if handle:
                await conv.bind_handle(tenant.name, handle, sid)
        digests = [mapping.message_digest(r, t) for r, t in messages]
        one_off = not handle
        completion_id = "chatcmpl-" + uuid.uuid4().hex
        created = int(time.time())
        headers = {MODE_HEADER: mode, SESSION_HEADER_OUT: sid}
        turn = Turn()

        async def settle() -> None:
            if one_off:
                await self._discard(tenant, sid)
            elif turn.finished and not turn.cut:
                await conv.set_chat_digests(sid, digests + [mapping.message_digest("assistant", turn.reply)])
            else:  # a cut turn: the next request rebuilds the session from its messages
                await conv.set_chat_digests(sid, [])

        try:
            events = self.timed("chat.completions", started, self.core.send_message(tenant, sid, text, fields))
            _, events = await self._first(events)
        except BaseException:
            if one_off:
                await self._discard(tenant, sid)
            raise

        if not stream:
            try:
                async for event in events:
                    turn.take(event)
            finally:
                await asyncio.shield(settle())
            return JSONResponse({
                "id": completion_id, "object": "chat.completion", "created": created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": turn.reply},
                             "finish_reason": mapping.FINISH_REASONS.get(turn.finish_reason, "stop"),
                             "logprobs": None}],
                "usage": mapping.usage(turn.prompt_tokens, turn.completion_tokens),
                "system_fingerprint": None,
            }, headers=headers)

        model = self.model

        def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
            return _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                         **extra})

        async def sse() -> AsyncIterator[str]:
            try:
                yield chunk({"role": "assistant", "content": ""}, **({"usage": None} if include_usage else {}))
                async for event in until_disconnect(request, events):
                    added = turn.take(event)
                    if added:
                        yield chunk({"content": added}, **({"usage": None} if include_usage else {}))
                if not turn.finished:
                    return
                yield chunk({}, mapping.FINISH_REASONS.get(turn.finish_reason, "stop"),
                            **({"usage": None} if include_usage else {}))
                if include_usage:
                    yield _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                "model": model, "choices": [],
                                "usage": mapping.usage(turn.prompt_tokens, turn.completion_tokens)})
                yield "data: [DONE]\n\n"
            except Exception as exc:  # noqa: BLE001 - after the headers: an error event, then the end
                yield _sse(answer_for(exc).body)
            finally:
                await asyncio.shield(settle())

        return StreamingResponse(sse(), media_type="text/event-stream", headers=headers)

    # ------------------------------------------------------------------ responses
    def _conversation_sid(self, conversation: Any) -> str:
        cid = conversation.get("id") if isinstance(conversation, dict) else conversation
        if not isinstance(cid, str) or not cid:
            raise mapping.BadRequest("conversation must be an id or {\"id\": ...}", "conversation")
        return cid.removeprefix(CONVERSATION_PREFIX)

    def _response_object(self, response_id: str, body: dict, status: str, turn: Turn | None, sid: str,
                         created: int, conversation: str | None) -> dict[str, Any]:
        output = []
        if turn is not None:
            output = [{"type": "message", "id": "msg_" + response_id.removeprefix(RESPONSE_PREFIX),
                       "status": "completed" if status == "completed" else "incomplete", "role": "assistant",
                       "content": [{"type": "output_text", "text": turn.reply, "annotations": []}]}]
        usage = None
        if turn is not None and turn.finished:
            usage = {**mapping.responses_usage(turn.prompt_tokens, turn.completion_tokens),
                     "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}
        return {
            "id": response_id, "object": "response", "created_at": created, "status": status, "model": self.model,
            "output": output, "output_text": turn.reply if turn is not None else "",
            "previous_response_id": body.get("previous_response_id"),
            "conversation": {"id": conversation} if conversation else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "temperature": body.get("temperature"), "top_p": body.get("top_p"), "store": body.get("store", True),
            "parallel_tool_calls": False, "tool_choice": "none", "tools": [], "metadata": body.get("metadata") or {},
            "incomplete_details": {"reason": "max_output_tokens"} if turn is not None and
            turn.finish_reason == "length" else None,
            "error": None, "usage": usage,
            "sinkserve": {"session_id": sid, "turn": turn.turn if turn is not None else 0,
                          "replica": turn.replica if turn is not None else "",
                          "cache_entries": turn.cache_entries if turn is not None else 0},
        }

    async def responses_create(self, request: Request) -> Response:
        started = time.monotonic()
        tenant = await self.tenant(request)
        body = await _body(request)
        fields = mapping.responses_fields(body)
        text = mapping.responses_input(body)
        instructions = body.get("instructions") or ""
        if not isinstance(instructions, str):
            raise mapping.BadRequest("instructions must be a string", "instructions")
        store_it = body.get("store", True) is not False
        conv = self.store.conversations
        conversation = None
        one_off = False
        if body.get("previous_response_id"):
            previous = await conv.response(str(body["previous_response_id"]))
            if previous is None or previous.get("tenant") != tenant.name:
                raise NotFound(f"response {str(body['previous_response_id'])[:64]!r} not found")
            sid = previous["session_id"]
            conversation = previous.get("conversation")
            await self.core.own_session(tenant, sid)
        elif body.get("conversation"):
            sid = self._conversation_sid(body["conversation"])
            await self.core.own_session(tenant, sid)
            conversation = CONVERSATION_PREFIX + sid
        else:
            record, _ = await self.core.create_session(tenant, system_prompt=instructions)
            sid = record.session_id
            one_off = not store_it
        response_id = RESPONSE_PREFIX + uuid.uuid4().hex
        created = int(time.time())
        turn = Turn()

        async def settle() -> dict[str, Any]:
            status = "completed" if turn.finished and not turn.cut else "incomplete"
            if turn.finished and turn.finish_reason == "length":
                status = "incomplete"
            obj = self._response_object(response_id, body, status, turn, sid, created, conversation)
            if store_it:
                await conv.save_response(response_id, {"tenant": tenant.name, "session_id": sid,
                                                       "conversation": conversation, "response": obj})
            if one_off:
                await self._discard(tenant, sid)
            return obj

        try:
            events = self.timed("responses", started, self.core.send_message(tenant, sid, text, fields))
            _, events = await self._first(events)
        except BaseException:
            if one_off:
                await self._discard(tenant, sid)
            raise

        if not body.get("stream"):
            try:
                async for event in events:
                    turn.take(event)
            finally:
                obj = await asyncio.shield(settle())
            return JSONResponse(obj, headers={SESSION_HEADER_OUT: sid})

        item_id = "msg_" + response_id.removeprefix(RESPONSE_PREFIX)

        async def sse() -> AsyncIterator[str]:
            seq = 0

            def event(kind: str, **data: Any) -> str:
                nonlocal seq
                seq += 1
                return _sse({"type": kind, "sequence_number": seq - 1, **data}, kind)

            pending = self._response_object(response_id, body, "in_progress", None, sid, created, conversation)
            settled = False
            try:
                yield event("response.created", response=pending)
                yield event("response.in_progress", response=pending)
                item = {"type": "message", "id": item_id, "status": "in_progress", "role": "assistant", "content": []}
                yield event("response.output_item.added", output_index=0, item=item)
                yield event("response.content_part.added", item_id=item_id, output_index=0, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": []})
                async for ev in until_disconnect(request, events):
                    added = turn.take(ev)
                    if added:
                        yield event("response.output_text.delta", item_id=item_id, output_index=0, content_index=0,
                                    delta=added, logprobs=[])
                if not turn.finished:
                    return
                settled = True
                obj = await asyncio.shield(settle())
                part = {"type": "output_text", "text": turn.reply, "annotations": []}
                yield event("response.output_text.done", item_id=item_id, output_index=0, content_index=0,
                            text=turn.reply, logprobs=[])
                yield event("response.content_part.done", item_id=item_id, output_index=0, content_index=0, part=part)
                yield event("response.output_item.done", output_index=0, item=obj["output"][0])
                yield event("response.completed" if obj["status"] == "completed" else "response.incomplete",
                            response=obj)
            except Exception as exc:  # noqa: BLE001
                yield event("error", **answer_for(exc).body["error"])
            finally:
                if not settled:
                    await asyncio.shield(settle())

        return StreamingResponse(sse(), media_type="text/event-stream", headers={SESSION_HEADER_OUT: sid})

    async def responses_get(self, request: Request) -> Response:
        tenant = await self.tenant(request)
        response_id = request.path_params["response_id"]
        record = await self.store.conversations.response(response_id)
        if record is None or record.get("tenant") != tenant.name:
            raise NotFound(f"response {response_id[:64]!r} not found")
        return JSONResponse(record["response"])

    # ------------------------------------------------------------------ conversations
    async def _conversation(self, tenant: Tenant, sid: str) -> dict[str, Any]:
        record, view, busy, _ = await self.core.session_info(tenant, sid)
        return {"id": CONVERSATION_PREFIX + sid, "object": "conversation", "created_at": record.created_ms // 1000,
                "metadata": record.labels,
                "sinkserve": {"session_id": sid, "turns": record.turns,
                              "tokens_seen": max(record.tokens_seen, view.tokens_seen if view else 0),
                              "cache_entries": view.cache_entries if view else 0,
                              "cache_capacity": view.cache_capacity if view else 0, "busy": busy}}

    async def conversations_create(self, request: Request) -> Response:
        tenant = await self.tenant(request)
        body = await _body(request) if await request.body() else {}
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise mapping.BadRequest("metadata maps strings to strings", "metadata")
        system = ""
        for i, item in enumerate(body.get("items") or []):
            if not isinstance(item, dict) or item.get("role") not in ("system", "developer"):
                raise mapping.BadRequest("initial items may only be system or developer messages", f"items[{i}]")
            system += ("\n\n" if system else "") + mapping.content_text(item.get("content"), f"items[{i}].content")
        record, _ = await self.core.create_session(tenant, system_prompt=system, labels=metadata)
        return JSONResponse(await self._conversation(tenant, record.session_id))

    async def conversations_get(self, request: Request) -> Response:
        tenant = await self.tenant(request)
        return JSONResponse(await self._conversation(tenant, self._conversation_sid(request.path_params["cid"])))

    async def conversations_delete(self, request: Request) -> Response:
        tenant = await self.tenant(request)
        cid = request.path_params["cid"]
        await self.core.delete_session(tenant, self._conversation_sid(cid))
        return JSONResponse({"id": cid, "object": "conversation.deleted", "deleted": True})

    # ------------------------------------------------------------------ the rest
    async def models(self, request: Request) -> Response:
        await self.tenant(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "sinkserve"}]})

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        try:
            await self.store.ping()
        except Exception:  # noqa: BLE001
            return JSONResponse({"status": "unavailable", "reason": "session store unavailable"}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def chat_page(self, request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    def app(self) -> Starlette:
        r = self.route
        return Starlette(routes=[
            Route("/", r("page", self.chat_page), methods=["GET"]),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
            Route("/v1/chat/completions", r("chat.completions", self.chat_completions), methods=["POST"]),
            Route("/v1/responses", r("responses", self.responses_create), methods=["POST"]),
            Route("/v1/responses/{response_id}", r("responses.get", self.responses_get), methods=["GET"]),
            Route("/v1/conversations", r("conversations", self.conversations_create), methods=["POST"]),
            Route("/v1/conversations/{cid}", r("conversations.get", self.conversations_get), methods=["GET"]),
            Route("/v1/conversations/{cid}", r("conversations.delete", self.conversations_delete),
                  methods=["DELETE"]),
            Route("/v1/models", r("models", self.models), methods=["GET"]),
            Route("/healthz", r("healthz", self.healthz), methods=["GET"]),
            Route("/readyz", r("readyz", self.readyz), methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
        ])
