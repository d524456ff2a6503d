"""Locust gRPC users for sinkserve: every user is one endless chat.

A user creates one session and then sends turn after turn, with think time between them, for the whole
run; it never resets or replaces its session. Each turn streams through the gateway and is measured as
separate Locust metrics (request_type / name):

    TTFT   / SendMessage   time from sending the message to the first text delta
    ITL    / SendMessage   gap between two consecutive text deltas of one reply (one sample per gap)
    TURN   / SendMessage   the whole turn, message sent to final event; failures are named by gRPC status
    SESSION/ CreateSession creating the chat's session
    CHECK  / GetSession    after every few turns: the registry holds exactly the turns the user saw finish
A user also counts acknowledged turns the server lost: when the registry (a check, or the user's last check
when it stops) or a later turn's number shows fewer turns than the user saw finish, the difference is lost
(kept per session as the largest such shortfall, so one loss is never counted twice).

A turn fails when the call ends with a gRPC error (named by its status code, e.g. RESOURCE_EXHAUSTED),
when the stream ends without a final event (NO_FINAL), or when the final event shows the session lost
its history (TRANSCRIPT: the turn number did not advance by one, or the cache shrank).

``locustfile_http.py`` has the same user over the OpenAI-compatible HTTP API (``--protocol http``).

Run it through ``python -m loadtest.run`` (which starts the stack and writes the report), or against any
gateway:  locust -f loadtest/locustfile.py --headless -u 100 -r 10 -t 5m --host 127.0.0.1:50051 --api-key KEY
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from pathlib import Path

import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, events, task

# grpcio must run its I/O on gevent's loop before any channel exists, or every call blocks all users.
grpc_gevent.init_gevent()

from loadtest.messages import SYSTEM_PROMPT, message  # noqa: E402
from sinkserve.v1 import sinkserve_pb2 as pb  # noqa: E402
from sinkserve.v1 import sinkserve_pb2_grpc as pb_grpc  # noqa: E402


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    parser.add_argument("--api-key", default=os.environ.get("SINKSERVE_API_KEY", ""), is_secret=True,
                        help="tenant API key (default: $SINKSERVE_API_KEY)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per turn")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    parser.add_argument("--think-min", type=float, default=5.0, help="shortest think time between turns, s")
    parser.add_argument("--think-max", type=float, default=15.0, help="longest think time between turns, s")
    parser.add_argument("--turn-timeout", type=float, default=60.0, help="gRPC deadline of one turn, s")
    parser.add_argument("--check-every", type=int, default=5,
                        help="check the session's turn count with GetSession after every N-th turn (0 = never)")
    parser.add_argument("--channels", type=int, default=8, help="gRPC channels shared by this process's users")
    parser.add_argument("--summary-json", default="", help="write the run's turn/session counts here at the end")
    parser.add_argument("--seed", type=int, default=0, help="seeds the users' message and think-time choices")


class GrpcStatus(Exception):
    """A failed turn, named by its outcome so Locust groups the failures by gRPC status."""

    def __init__(self, code: str, details: str = ""):
        super().__init__(code)
        self.code = code
        self.details = details


class RunTally:
    """What the report needs beyond Locust's stats: turns by outcome and per-session continuity."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: Counter[str] = Counter()  # "OK" or the failure code, per turn
        self.session_errors: Counter[str] = Counter()
        self.sessions_created = 0
        self.interrupted = 0  # turns cut off by the end of the run (neither passed nor failed)
        self.turns_per_session: dict[str, int] = {}
        self.completion_tokens = 0
        self.replicas: Counter[str] = Counter()  # turns served per replica
        self.session_checks: Counter[str] = Counter()  # GetSession after a turn: "match" / "mismatch" / status
        self.error_samples: list[str] = []
        self.turn_log: list[tuple[float, str]] = []  # (unix time a turn ended, "OK" or its failure code)
        self.lost_by_session: dict[str, int] = {}  # acknowledged turns the server no longer has, per session

    def lost(self, session_id: str, shortfall: int) -> None:
        if shortfall > 0:
            with self.lock:
                self.lost_by_session[session_id] = max(shortfall, self.lost_by_session.get(session_id, 0))

    def failure(self, code: str, details: str) -> None:
        with self.lock:
            self.outcomes[code] += 1
            self.turn_log.append((round(time.time(), 2), code))
        self.failure_sample(f"{code}: {details}")

    def failure_sample(self, text: str) -> None:
        with self.lock:
            if len(self.error_samples) < 20:
                self.error_samples.append(text[:300])

    def as_dict(self) -> dict:
        with self.lock:
            turns = dict(self.turns_per_session)
            return {
                "turns_ok": self.outcomes.get("OK", 0),
                "turns_failed": sum(n for code, n in self.outcomes.items() if code != "OK"),
                "failures_by_code": {code: n for code, n in self.outcomes.items() if code != "OK"},
                "session_errors_by_code": dict(self.session_errors),
                "sessions_created": self.sessions_created,
                "turns_interrupted_at_stop": self.interrupted,
                "sessions_with_turns": sum(1 for n in turns.values() if n > 0),
                "max_turns_per_session": max(turns.values(), default=0),
                "min_turns_per_session": min(turns.values(), default=0),
                "completion_tokens": self.completion_tokens,
                "turns_by_replica": dict(self.replicas),
                "session_checks": dict(self.session_checks),
                "error_samples": list(self.error_samples),
                "lost_acknowledged_turns": sum(self.lost_by_session.values()),
                "sessions_with_lost_turns": len(self.lost_by_session),
                "turn_log": [list(entry) for entry in self.turn_log],
            }


TALLY = RunTally()
_CHANNELS: list[grpc.Channel] = []


def _channel(host: str, index: int, pool_size: int) -> grpc.Channel:
    while len(_CHANNELS) < max(1, pool_size):
        _CHANNELS.append(grpc.insecure_channel(host, options=[("grpc.enable_retries", 0)]))
    return _CHANNELS[index % len(_CHANNELS)]


def _write_summary(environment) -> None:
    path = getattr(environment.parsed_options, "summary_json", "")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(TALLY.as_dict(), indent=2))


@events.test_stop.add_listener
def _on_test_stop(environment, **_) -> None:
    _write_summary(environment)


@events.quitting.add_listener
def _on_quitting(environment, **_) -> None:
    _write_summary(environment)
    for channel in _CHANNELS:
        channel.close()


class EndlessChatUser(User):
    """One endless conversation: one session, turn after turn until the run ends."""

    _next_index = 0

    def __init__(self, environment) -> None:
        super().__init__(environment)
        opts = environment.parsed_options
        if not self.host:
            raise ValueError("no gateway address: pass --host HOST:PORT")
        if not opts.api_key:
            raise ValueError("no API key: pass --api-key or set SINKSERVE_API_KEY")
        self.opts = opts
        index = EndlessChatUser._next_index
        EndlessChatUser._next_index += 1
        self.rng = random.Random(opts.seed * 1_000_003 + index)
        self.connect(index)
        self.session_id: str | None = None
        self.capacity = 0
        self.turns_done = 0  # turns this user saw finish (the server's count must match)
        self.last_acknowledged = 0  # the number of the last turn this user saw finish (never reset)
        self.expected_turn: int | None = None  # None after a failed turn: the server may have recorded it
        self.last_cache_entries = 0

    def connect(self, index: int) -> None:
        self.stub = pb_grpc.SinkServeStub(_channel(self.host, index, self.opts.channels))
        self.metadata = (("authorization", f"Bearer {self.opts.api_key}"),)

    def wait_time(self) -> float:
        return self.rng.uniform(self.opts.think_min, self.opts.think_max)

    def _fire(self, request_type: str, name: str, started: float, seconds: float, length: int = 0,
              exception: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type=request_type,
            name=name,
            start_time=started,
            response_time=seconds * 1000.0,
            response_length=length,
            exception=exception,
            context={},
        )

    def _create_session(self) -> bool:
        started = time.time()
        t0 = time.perf_counter()
        request = pb.CreateSessionRequest(
            system_prompt=SYSTEM_PROMPT,
            default_settings=pb.GenerationSettings(
                max_tokens=self.opts.max_tokens, temperature=self.opts.temperature, top_p=self.opts.top_p
            ),
            labels={"source": "loadtest"},
        )
        try:
            session = self.stub.CreateSession(request, metadata=self.metadata, timeout=self.opts.turn_timeout).session
        except grpc.RpcError as err:
            code = err.code().name
            with TALLY.lock:
                TALLY.session_errors[code] += 1
            self._fire("SESSION", "CreateSession", started, time.perf_counter() - t0, exception=GrpcStatus(code))
            return False
        self._fire("SESSION", "CreateSession", started, time.perf_counter() - t0)
        self.session_id = session.session_id
        self.capacity = session.cache_capacity
        self.expected_turn = session.turns + 1
        with TALLY.lock:
            TALLY.sessions_created += 1
            TALLY.turns_per_session[self.session_id] = 0
        return True

    def _message(self) -> str:
        return message(self.rng, self.turns_done + 1)

    @task
    def turn(self) -> None:
        if self.session_id is None and not self._create_session():
            return
        request = pb.SendMessageRequest(session_id=self.session_id, text=self._message())
        started = time.time()
        t0 = time.perf_counter()
        first_at = last_at = None
        final = None
        call = self.stub.SendMessage(request, metadata=self.metadata, timeout=self.opts.turn_timeout)
        try:
            for event in call:
                now = time.perf_counter()
                if event.HasField("delta"):
                    if first_at is None:
                        first_at = now
                        self._fire("TTFT", "SendMessage", started, now - t0)
                    else:
                        self._fire("ITL", "SendMessage", started, now - last_at)
                    last_at = now
                else:
                    final = event.finished
        except grpc.RpcError as err:
            self._failed(started, t0, err.code().name, err.details() or "")
            return
        except gevent.GreenletExit:
            call.cancel()  # the run is stopping: hang up instead of leaving the turn to run on
            with TALLY.lock:
                TALLY.interrupted += 1
            raise
        if final is None:
            self._failed(started, t0, "NO_FINAL", "stream ended without a final event")
            return
        self._finished(started, t0, final, final.usage.completion_tokens)

    def _finished(self, started: float, t0: float, final, completion_tokens: int) -> None:
        """A turn's final event (`final` has turn, cache_entries and replica): continuity checked, counted."""
        TALLY.lost(self.session_id, self.last_acknowledged - (final.turn - 1))
        problem = self._continuity_problem(final)
        if problem:
            self._failed(started, t0, "TRANSCRIPT", problem)
            return
        self.turns_done += 1
        self.last_acknowledged = final.turn
        self.expected_turn = final.turn + 1
        self.last_cache_entries = final.cache_entries
        with TALLY.lock:
            TALLY.outcomes["OK"] += 1
            TALLY.turns_per_session[self.session_id] = self.turns_done
            TALLY.completion_tokens += completion_tokens
            TALLY.replicas[final.replica] += 1
            TALLY.turn_log.append((round(time.time(), 2), "OK"))
        self._fire("TURN", "SendMessage", started, time.perf_counter() - t0, length=completion_tokens)
        if self.opts.check_every and self.turns_done % self.opts.check_every == 0:
            self._check_session(final.turn)

    def _continuity_problem(self, final) -> str:
        """A session that kept its history numbers its turns 1, 2, 3, ... and its cache never shrinks."""
        if self.expected_turn is not None and final.turn != self.expected_turn:
            return f"session {self.session_id}: turn {final.turn}, expected {self.expected_turn}"
        if self.capacity and final.cache_entries > self.capacity:
            return f"session {self.session_id}: cache {final.cache_entries} > capacity {self.capacity}"
        if self.expected_turn is not None and final.cache_entries < self.last_cache_entries:
            return f"session {self.session_id}: cache shrank {self.last_cache_entries} -> {final.cache_entries}"
        return ""

    def _failed(self, started: float, t0: float, code: str, details: str) -> None:
        self.expected_turn = None  # resynchronise on the next finished turn
        TALLY.failure(code, details)
        self._fire("TURN", "SendMessage", started, time.perf_counter() - t0, exception=GrpcStatus(code, details))

    def _check_session(self, turn: int) -> None:
        """The registry must hold exactly the turns this user saw finish: the session was never reset and
        no turn was lost or counted twice, wherever its cache lived in between."""
        started = time.time()
        t0 = time.perf_counter()
        try:
            session = self.stub.GetSession(
                pb.GetSessionRequest(session_id=self.session_id), metadata=self.metadata, timeout=self.opts.turn_timeout
            )
            outcome = "match" if session.turns == turn else "mismatch"
            TALLY.lost(self.session_id, self.last_acknowledged - session.turns)
        except grpc.RpcError as err:
            outcome, session = err.code().name, None
        self._checked(started, t0, outcome, turn, session.turns if session is not None else None)

    def _checked(self, started: float, t0: float, outcome: str, turn: int, registry_turns: int | None) -> None:
        with TALLY.lock:
            TALLY.session_checks[outcome] += 1
        error = None
        if outcome != "match":
            seen = f"registry has {registry_turns} turns, user saw {turn}" if registry_turns is not None else outcome
            TALLY.failure_sample(f"GetSession {outcome} {self.session_id}: {seen}")
            error = GrpcStatus(outcome)
        self._fire("CHECK", "GetSession", started, time.perf_counter() - t0, exception=error)

    def on_stop(self) -> None:
        """The last look: the registry still holds every turn this user saw finish."""
        if self.session_id is None or not self.last_acknowledged:
            return
        try:
            session = self.stub.GetSession(
                pb.GetSessionRequest(session_id=self.session_id), metadata=self.metadata, timeout=10
            )
        except grpc.RpcError as err:
            TALLY.failure_sample(f"final GetSession {self.session_id}: {err.code().name}")
            return
        TALLY.lost(self.session_id, self.last_acknowledged - session.turns)
