"""Locust HTTP users for sinkserve: every user is one endless chat through the OpenAI-compatible Responses API.

The same chat and the same metrics as the gRPC user (``locustfile.py``, whose options, tally and summary this
file shares), over HTTP: a user creates one conversation (``POST /v1/conversations``; its session, with the
load test's system prompt) and then sends turn after turn to ``POST /v1/responses`` with ``conversation`` and
``stream: true``, reading the SSE events as they arrive:

    TTFT   / SendMessage   request sent to the first ``response.output_text.delta``
    ITL    / SendMessage   gap between two consecutive deltas of one reply
    TURN   / SendMessage   request sent to ``response.completed`` (or ``response.incomplete``: max tokens)
    SESSION/ CreateSession ``POST /v1/conversations``
    CHECK  / GetSession    ``GET /v1/conversations/{id}``: the session holds exactly the turns the user saw finish

Failures are named like the gRPC user's (the gRPC status of the HTTP error, through sinkserve's one error
table), so the two protocols' reports compare. Run it through ``python -m loadtest.run --protocol http``, or:
    locust -f loadtest/locustfile_http.py --headless -u 100 -r 10 -t 5m --host http://127.0.0.1:8000 --api-key KEY
"""

from __future__ import annotations

import json
import time
from typing import Any, NamedTuple

import gevent
import requests
from locust import task

from loadtest import locustfile as grpc_users  # noqa: F401 - its options, tally and listeners serve both
from loadtest.locustfile import TALLY, GrpcStatus
from loadtest.messages import SYSTEM_PROMPT
from sinkserve.http.errors import TABLE

# An HTTP error back to the gRPC status it stands for (both from sinkserve.http.errors' one table).
STATUS_OF_HTTP = {kind.http_status: status.name for status, kind in TABLE.items()}
STATUS_OF_CODE = {kind.code: status.name for status, kind in TABLE.items()}
STATUS_OF_HTTP[409] = "ABORTED"  # 409 is also ALREADY_EXISTS; a turn gets it only for a busy session


class Final(NamedTuple):
    """What the gRPC user's TurnFinished carries, from a Responses ``response.completed`` event."""

    turn: int
    cache_entries: int
    replica: str
    completion_tokens: int


def _http_failure(response: requests.Response) -> GrpcStatus:
    try:
        error = response.json()["error"]
        message, code = error.get("message", ""), error.get("code", "")
    except (ValueError, KeyError, TypeError):
        message, code = response.text[:200], ""
    return GrpcStatus(STATUS_OF_CODE.get(code) or STATUS_OF_HTTP.get(response.status_code, f"HTTP_{response.status_code}"),
                      message)


def sse_events(response: requests.Response):
    """The JSON data of each SSE event, as its bytes arrive (chunk by chunk, not in 512-byte blocks)."""
    buffer = b""
    for chunk in response.iter_content(chunk_size=None):
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            data = b"\n".join(line[5:].strip() for line in block.split(b"\n") if line.startswith(b"data:"))
            if data:
                yield json.loads(data)


class HttpEndlessChatUser(grpc_users.EndlessChatUser):
    """One endless conversation over the OpenAI-compatible HTTP API."""

    def __init__(self, environment) -> None:
        self.conversation: str | None = None
        super().__init__(environment)

    def connect(self, index: int) -> None:
        if not self.host.startswith(("http://", "https://")):
            raise ValueError(f"--host must be the HTTP API's URL (http://HOST:PORT), not {self.host!r}")
        self.base = self.host.rstrip("/")
        self.http = requests.Session()
        self.http.headers["authorization"] = f"Bearer {self.opts.api_key}"

    def _create_session(self) -> bool:
        started = time.time()
        t0 = time.perf_counter()
        body = {"metadata": {"source": "loadtest"},
                "items": [{"type": "message", "role": "system", "content": SYSTEM_PROMPT}]}
        try:
            response = self.http.post(f"{self.base}/v1/conversations", json=body, timeout=self.opts.turn_timeout)
            failure = _http_failure(response) if response.status_code != 200 else None
        except requests.RequestException as err:
            failure = GrpcStatus("UNAVAILABLE", str(err))
        if failure is not None:
            with TALLY.lock:
                TALLY.session_errors[failure.code] += 1
            self._fire("SESSION", "CreateSession", started, time.perf_counter() - t0, exception=failure)
            return False
        self._fire("SESSION", "CreateSession", started, time.perf_counter() - t0)
        conversation = response.json()
        self.conversation = conversation["id"]
        self.session_id = conversation["sinkserve"]["session_id"]
        self.capacity = conversation["sinkserve"]["cache_capacity"]
        self.expected_turn = conversation["sinkserve"]["turns"] + 1
        with TALLY.lock:
            TALLY.sessions_created += 1
            TALLY.turns_per_session[self.session_id] = 0
        return True

    @task
    def turn(self) -> None:
        if self.session_id is None and not self._create_session():
            return
        body: dict[str, Any] = {"input": self._message(), "conversation": self.conversation, "stream": True,
                                "max_output_tokens": self.opts.max_tokens, "temperature": self.opts.temperature,
                                "top_p": self.opts.top_p}
        started = time.time()
        t0 = time.perf_counter()
        first_at = last_at = None
        final = None
        response = None
        try:
            response = self.http.post(f"{self.base}/v1/responses", json=body, stream=True,
                                      timeout=self.opts.turn_timeout)
            if response.status_code != 200:
                failure = _http_failure(response)
                self._failed(started, t0, failure.code, failure.details)
                return
            for event in sse_events(response):
                kind = event.get("type")
                now = time.perf_counter()
                if kind == "response.output_text.delta":
                    if first_at is None:
                        first_at = now
                        self._fire("TTFT", "SendMessage", started, now - t0)
                    else:
                        self._fire("ITL", "SendMessage", started, now - last_at)
                    last_at = now
                elif kind in ("response.completed", "response.incomplete"):
                    done = event["response"]
                    extra = done.get("sinkserve") or {}
                    final = Final(extra.get("turn", 0), extra.get("cache_entries", 0), extra.get("replica", ""),
                                  (done.get("usage") or {}).get("output_tokens", 0))
                elif kind == "error":
                    code = STATUS_OF_CODE.get(event.get("code", ""), "INTERNAL")
                    self._failed(started, t0, code, event.get("message", ""))
                    return
        except requests.RequestException as err:
            self._failed(started, t0, "DEADLINE_EXCEEDED" if isinstance(err, requests.Timeout) else "UNAVAILABLE",
                         str(err))
            return
        except gevent.GreenletExit:
            if response is not None:
                response.close()  # the run is stopping: hang up (the server cancels the turn)
            with TALLY.lock:
                TALLY.interrupted += 1
            raise
        finally:
            if response is not None:
                response.close()
        if final is None:
            self._failed(started, t0, "NO_FINAL", "stream ended without response.completed")
            return
        self._finished(started, t0, final, final.completion_tokens)

    def _conversation_turns(self, timeout: float) -> int:
        response = self.http.get(f"{self.base}/v1/conversations/{self.conversation}", timeout=timeout)
        if response.status_code != 200:
            raise _http_failure(response)
        return response.json()["sinkserve"]["turns"]

    def _check_session(self, turn: int) -> None:
        started = time.time()
        t0 = time.perf_counter()
        turns = None
        try:
            turns = self._conversation_turns(self.opts.turn_timeout)
            outcome = "match" if turns == turn else "mismatch"
            TALLY.lost(self.session_id, self.last_acknowledged - turns)
        except GrpcStatus as err:
            outcome = err.code
        except requests.RequestException:
            outcome = "UNAVAILABLE"
        self._checked(started, t0, outcome, turn, turns)

    def on_stop(self) -> None:
        if self.session_id is None or not self.last_acknowledged:
            return
        try:
            turns = self._conversation_turns(10)
        except (GrpcStatus, requests.RequestException) as err:
            TALLY.failure_sample(f"final GET conversation {self.session_id}: {err}")
            return
        TALLY.lost(self.session_id, self.last_acknowledged - turns)
