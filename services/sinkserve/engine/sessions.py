"""Sessions and their turns: the state machine and the transcript accounting. No torch here.

A session is `idle`, ingesting a message (`prefill`) or replying (`decode`). Every id that enters the session's
token stream is reported exactly once, in the final event of the turn that fed or queued it (`turn_tokens`):
appending those to a transcript lets any engine rebuild the session. Ids queued but not fed yet (a message cut
short by an abort, the last sampled token, the template's close) are fed with the next message.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Literal

from sinkserve.engine.output import Detokenizer, TokenOutput
from sinkserve.errors import InvalidArgument, SessionBusy, SessionExists, SessionNotFound
from sinkserve.protocol import FinishReason, GenerationParams

SessionState = Literal["idle", "prefill", "decode"]


@dataclass
class Turn:
    params: GenerationParams
    seed: int
    detok: Detokenizer
    tokens: list[int]  # what this turn added to the stream so far (reported in its final event)
    prompt_tokens: int
    completion_tokens: int = 0
    next_input: int | None = None  # sampled and streamed, not fed yet


@dataclass
class Session:
    id: str
    tag: int = 0  # the caller's version of this session (the replica: its ownership epoch)
    state: SessionState = "idle"
    feed: list[int] = field(default_factory=list)  # ids still to ingest, in order
    unlogged: list[int] = field(default_factory=list)  # queued before any turn, not yet reported
    fed: int = 0  # ids fed into the cache since it was (re)built
    seen_offset: int = 0  # transcript ids a rebuild skipped
    turns: int = 0
    turn: Turn | None = None

    @property
    def tokens_seen(self) -> int:
        return self.seen_offset + self.fed

    @property
    def busy(self) -> bool:
        return self.state != "idle"

    def start_turn(self, message_ids: list[int], params: GenerationParams, seed: int, detok: Detokenizer) -> None:
        if self.busy:
            raise SessionBusy(f"session {self.id!r} is still replying")
        self.feed.extend(message_ids)
        self.turn = Turn(params, seed, detok, tokens=self.unlogged + message_ids, prompt_tokens=len(self.feed))
        self.unlogged = []
        self.state = "prefill"

    def ingested(self, count: int) -> bool:
        """`count` ids of the feed went into the cache; True when the message is all in (sample next)."""
        del self.feed[:count]
        self.fed += count
        if not self.feed and self.state == "prefill":
            self.state = "decode"
            return True
        return False

    def decoded(self) -> None:
        """The last sampled token went into the cache."""
        self.fed += 1
        self.turn.next_input = None

    def emit(self, token: int, eos_ids: frozenset[int], close_ids: list[int], at_capacity: bool) -> TokenOutput:
        """A sampled token: streamed (maybe held back by the stop strings), or the end of the turn."""
        turn = self.turn
        turn.completion_tokens += 1
        turn.next_input = token  # fed next step, or by the next message if the reply ends here
        turn.tokens.append(token)
        if token in eos_ids and not turn.params.ignore_eos:
            return self.finish("eos", token, turn.detok.flush(), close_ids)
        text, stopped = turn.detok.add(token)
        if stopped:
            return self.finish("stop", token, text, close_ids)
        if turn.completion_tokens >= turn.params.max_tokens or at_capacity:
            return self.finish("length", token, text + turn.detok.flush(), close_ids)
        return TokenOutput(session_id=self.id, token_id=token, text=text)

    def finish(self, reason: FinishReason, token_id: int | None, text: str, close_ids: list[int]) -> TokenOutput:
        turn = self.turn
        close = list(close_ids)
        unfed = []
        if turn.next_input is not None:  # sampled and logged, not fed yet
            unfed.append(turn.next_input)
            if close and close[0] == turn.next_input:  # the reply ended with the template's own end token
                close = close[1:]
        self.feed.extend(unfed + close)  # ingested with the next message
        turn.tokens.extend(close)
        self.turns += 1
        self.state, self.turn = "idle", None
        return TokenOutput(
            session_id=self.id,
            token_id=token_id,
            text=text,
            finished=True,
            finish_reason=reason,
            prompt_tokens=turn.prompt_tokens,
            completion_tokens=turn.completion_tokens,
            turn_tokens=turn.tokens,
        )

    def abort(self, close_ids: list[int]) -> TokenOutput | None:
        if not self.busy:
            return None
        return self.finish("aborted", None, self.turn.detok.flush(), close_ids)


class SessionTable:
    """The engine's sessions by id."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def ids(self) -> list[str]:
        return list(self._sessions)

    def all(self) -> list[Session]:
        return list(self._sessions.values())

    def get(self, session_id: str) -> Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise SessionNotFound(f"session {session_id!r} does not exist") from None

    def find(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def new_id(self, session_id: str | None) -> str:
        """A usable id for a new session (the one asked for, checked, or a fresh one)."""
        session_id = uuid.uuid4().hex if session_id is None else session_id
        if not isinstance(session_id, str) or not session_id:
            raise InvalidArgument("session_id must be a non-empty string")
        if session_id in self._sessions:
            raise SessionExists(f"session {session_id!r} already exists")
        return session_id

    def add(self, session: Session) -> Session:
        self._sessions[session.id] = session
        return session

    def remove(self, session_id: str) -> Session:
        return self._sessions.pop(session_id)

    def busy(self, session_id: str) -> bool:
        session = self._sessions.get(session_id)
        return session is not None and session.busy

    def any_busy(self) -> bool:
        return any(s.busy for s in self._sessions.values())
