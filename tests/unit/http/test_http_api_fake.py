"""The HTTP API through a real uvicorn server and real Redis, the replicas faked (no Ray): routes, auth, errors,
sessions bound by x-session-id, Responses chains, conversations, and a disconnect cancelling the turn."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest

from sinkserve import errors
from sinkserve.config import Settings
from sinkserve.protocol import SessionView, TurnDelta, TurnFinished


class EchoBackend:
    def __init__(self) -> None:
        self.chats: list[tuple[str, str]] = []
        self.deleted: list[str] = []
        self.turns: dict[str, int] = {}
        self.endless = False
        self.cancelled = asyncio.Event()

    async def create(self, session_id):
        return SessionView(session_id, "r-1", resident=True, cache_capacity=32)

    async def info(self, session_id):
        return SessionView(session_id, "r-1", resident=True, cache_entries=5, cache_capacity=32)

    async def delete(self, session_id):
        self.deleted.append(session_id)
        return True

    async def chat(self, session_id, text, params, deadline_unix, turn_id=None, request_id=None):
        self.chats.append((session_id, text))
        try:
            if self.endless:
                while True:
                    yield TurnDelta("more ")
                    await asyncio.sleep(0.01)
            yield TurnDelta("echo: ")
            yield TurnDelta(text[:20])
            self.turns[session_id] = self.turns.get(session_id, 0) + 1
            yield TurnFinished("eos", len(text), 2, self.turns[session_id], "r-1", 9)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


@pytest.fixture
async def api(redis_server, request):
    from sinkserve.gateway.server import Gateway
    from sinkserve.http.server import HttpFrontEnd

    settings = Settings(redis={"url": redis_server.url, "key_prefix": f"http-{request.node.name}"},
                        gateway={"host": "127.0.0.1", "port": 0, "http_port": 0})
    backend = EchoBackend()
    http = HttpFrontEnd(settings, port=0)
    gateway = Gateway(settings, backend, frontends=[http])
    await gateway.start()
    _, alice = await gateway.store.tenants.create("alice")
    _, bob = await gateway.store.tenants.create("bob")
    yield http.url, backend, {"alice": alice, "bob": bob}, gateway
    await gateway.stop(grace_s=0)


def _call(url, method="GET", body=None, key=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("content-type", "application/json")
    if key:
        req.add_header("authorization", f"Bearer {key}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


async def call(*args, **kwargs):
    status, headers, raw = await asyncio.to_thread(_call, *args, **kwargs)
    headers = {k.lower(): v for k, v in headers.items()}
    ctype = headers.get("content-type", "")
    return status, headers, (json.loads(raw) if "json" in ctype else raw.decode())


def sse_data(text):
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


async def test_auth_models_health_metrics(api):
    url, _, keys, _ = api
    status, _, body = await call(url + "/v1/models")
    assert status == 401 and body["error"]["type"] == "authentication_error"
    status, _, body = await call(url + "/v1/models", key="sk-ss-nope")
    assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}
    status, _, body = await call(url + "/v1/models", key=keys["alice"])
    assert status == 200 and body["data"][0]["object"] == "model"
    assert (await call(url + "/healthz"))[0] == 200
    assert (await call(url + "/readyz"))[0] == 200
    status, _, text = await call(url + "/metrics")
    assert status == 200 and 'sinkserve_http_requests_total{route="models",status="401"} 2.0' in text


async def test_chat_completion_one_off_and_stream_with_usage(api):
    url, backend, keys, gateway = api
    body = {"model": "m", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]}
    status, headers, reply = await call(url + "/v1/chat/completions", "POST", body, keys["alice"])
    assert status == 200, reply
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["content"] == "echo: hi"
    assert reply["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    assert headers["x-sinkserve-session-mode"] == "one-off"
    assert await gateway.store.sessions.count_sessions("alice") == 0  # closed after the reply
    status, headers, text = await call(url + "/v1/chat/completions", "POST",
                                       {**body, "stream": True, "stream_options": {"include_usage": True}},
                                       keys["alice"])
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    data = sse_data(text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "echo: hi"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 4
    assert (await call(url + "/v1/chat/completions", "POST", {**body, "n": 2}, keys["alice"]))[0] == 400


async def test_x_session_id_continues_or_rebuilds(api):
    url, backend, keys, gateway = api
    h = {"x-session-id": "my-chat"}
    msgs = [{"role": "user", "content": "one"}]
    status, headers, r1 = await call(url + "/v1/chat/completions", "POST", {"messages": msgs}, keys["alice"], h)
    assert status == 200 and headers["x-sinkserve-session-mode"] == "created"
    sid = headers["x-sinkserve-session-id"]
    msgs += [{"role": "assistant", "content": r1["choices"][0]["message"]["content"]},
             {"role": "user", "content": "two"}]
    status, headers, _ = await call(url + "/v1/chat/completions", "POST", {"messages": msgs}, keys["alice"], h)
    assert headers["x-sinkserve-session-mode"] == "continued" and headers["x-sinkserve-session-id"] == sid
    assert backend.chats[-1] == (sid, "two")  # only the new message was ingested
    diverged = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "something else"},
                {"role": "user", "content": "three"}]
    status, headers, _ = await call(url + "/v1/chat/completions", "POST", {"messages": diverged}, keys["alice"], h)
    assert headers["x-sinkserve-session-mode"] == "rebuilt" and headers["x-sinkserve-session-id"] != sid
    with pytest.raises(errors.SessionNotFound):  # the old session was replaced
        await gateway.store.sessions.get_session(sid)
    assert backend.chats[-1][1] == "three"
    # Another tenant's handle of the same name is its own session.
    status, headers, _ = await call(url + "/v1/chat/completions", "POST", {"messages": msgs}, keys["bob"], h)
    assert headers["x-sinkserve-session-mode"] == "created"


async def test_responses_chain_and_conversations(api):
    url, backend, keys, _ = api
    status, _, r1 = await call(url + "/v1/responses", "POST", {"input": "first", "instructions": "I"}, keys["alice"])
    assert status == 200 and r1["status"] == "completed" and r1["output"][0]["content"][0]["text"] == "echo: first"
    assert r1["usage"]["input_tokens"] == 5
    status, _, r2 = await call(url + "/v1/responses", "POST", {"input": "second", "previous_response_id": r1["id"]},
                               keys["alice"])
    assert r2["sinkserve"]["session_id"] == r1["sinkserve"]["session_id"] and r2["sinkserve"]["turn"] == 2
    status, _, got = await call(url + f"/v1/responses/{r2['id']}", key=keys["alice"])
    assert status == 200 and got["id"] == r2["id"]
    assert (await call(url + f"/v1/responses/{r2['id']}", key=keys["bob"]))[0] == 404
    assert (await call(url + "/v1/responses", "POST", {"input": "x", "previous_response_id": r1["id"]},
                       keys["bob"]))[0] == 404
    status, _, text = await call(url + "/v1/responses", "POST", {"input": "s", "stream": True}, keys["alice"])
    kinds = [json.loads(d)["type"] for d in sse_data(text)]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and "response.output_text.done" in kinds

    status, _, conv = await call(url + "/v1/conversations", "POST", {"metadata": {"k": "v"}}, keys["alice"])
    assert status == 200 and conv["id"].startswith("conv_")
    status, _, r = await call(url + "/v1/responses", "POST", {"input": "in conv", "conversation": conv["id"]},
                              keys["alice"])
    assert r["conversation"] == {"id": conv["id"]}
    status, _, got = await call(url + f"/v1/conversations/{conv['id']}", key=keys["alice"])
    assert status == 200 and got["metadata"] == {"k": "v"}
    assert (await call(url + f"/v1/conversations/{conv['id']}", key=keys["bob"]))[0] == 404
    assert (await call(url + f"/v1/conversations/{conv['id']}", "DELETE", key=keys["bob"]))[0] == 404
    status, _, gone = await call(url + f"/v1/conversations/{conv['id']}", "DELETE", key=keys["alice"])
    assert status == 200 and gone["deleted"] is True
    assert (await call(url + f"/v1/conversations/{conv['id']}", key=keys["alice"]))[0] == 404


async def test_quotas_are_429_with_retry_after(api):
    url, _, _, gateway = api
    _, key = await gateway.store.tenants.create("poor", tokens_per_minute=40, requests_per_second=0.01,
                                                request_burst=2)
    message = {"messages": [{"role": "user", "content": "x"}]}
    status, headers, body = await call(url + "/v1/chat/completions", "POST", {**message, "max_tokens": 500}, key)
    assert status == 429 and "retry-after" not in headers, body  # can never fit the tenant's minute
    status, headers, body = await call(url + "/v1/chat/completions", "POST", {**message, "max_tokens": 5}, key)
    assert status == 200
    status, headers, body = await call(url + "/v1/chat/completions", "POST", {**message, "max_tokens": 5}, key)
    assert status == 429 and int(headers["retry-after"]) >= 1 and body["error"]["type"] == "rate_limit_error"


async def test_a_client_disconnect_cancels_the_turn(api):
    url, backend, keys, _ = api
    backend.endless = True
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = json.dumps({"messages": [{"role": "user", "content": "go"}], "stream": True}).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 + f"authorization: Bearer {keys['alice']}\r\ncontent-length: {len(payload)}\r\n\r\n".encode()
                 + payload)
    await writer.drain()
    got = b""
    while got.count(b"more") < 3:
        got += await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    await asyncio.wait_for(backend.cancelled.wait(), 10)


async def test_chat_page_and_its_files_are_served_locally(api):
    url = api[0]
    status, headers, page = await call(url + "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert '<script src="/static/chat.js">' in page and 'href="/static/chat.css"' in page
    for name, kind in (("chat.js", "javascript"), ("chat.css", "text/css")):
        status, headers, text = await call(url + "/static/" + name)
        assert status == 200 and kind in headers["content-type"] and text
    for text in (page, (await call(url + "/static/chat.js"))[2], (await call(url + "/static/chat.css"))[2]):
        assert "https://" not in text and "http://" not in text  # nothing from a CDN
    assert (await call(url + "/static/nope.js"))[0] == 404
