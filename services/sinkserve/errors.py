"""One error hierarchy for every layer: engine, store, replica, front ends.

Imports nothing of the project or its heavy dependencies (no torch, Ray, Redis or gRPC), so an error raised in a
replica unpickles in a gateway that has none of the engine's dependencies. Each error carries a `Status` (a
transport-neutral code that a front end maps to its wire status in exactly one place) and, for refusals that a
client should retry, `retry_after_s`.

`message` is what a client may see: short and free of internals (no tracebacks, actor ids, pids, addresses).
Whatever helps an operator goes to the server log, not into the message.
"""

from __future__ import annotations

import enum


class Status(enum.Enum):
    """Outcome codes. Names match grpc.StatusCode members so the gRPC front end maps them by name."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    ABORTED = "ABORTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


class SinkServeError(Exception):
    """Base of every error the project raises on purpose. Subclasses fix the status."""

    status: Status = Status.INTERNAL

    def __init__(self, message: str = "", *, retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message or self.__class__.__name__
        self.retry_after_s = retry_after_s

    def __reduce__(self):  # keyword state survives pickling (errors cross Ray between processes)
        return (_rebuild, (self.__class__, self.message, self.retry_after_s))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[SinkServeError], message: str, retry_after_s: float | None) -> SinkServeError:
    return cls(message, retry_after_s=retry_after_s)


# ---------------------------------------------------------------------------------------------- by status
class InvalidArgument(SinkServeError, ValueError):
    status = Status.INVALID_ARGUMENT


class Unauthenticated(SinkServeError):
    status = Status.UNAUTHENTICATED


class PermissionDenied(SinkServeError):
    status = Status.PERMISSION_DENIED


class NotFound(SinkServeError, LookupError):
    status = Status.NOT_FOUND


class AlreadyExists(SinkServeError):
    status = Status.ALREADY_EXISTS


class ResourceExhausted(SinkServeError):
    status = Status.RESOURCE_EXHAUSTED


class Aborted(SinkServeError):
    status = Status.ABORTED


class DeadlineExceeded(SinkServeError):
    status = Status.DEADLINE_EXCEEDED


class Unavailable(SinkServeError):
    status = Status.UNAVAILABLE


class Internal(SinkServeError):
    status = Status.INTERNAL


# ---------------------------------------------------------------------------------------------- engine
class UnsupportedModel(InvalidArgument):
    """The checkpoint's architecture has no model module."""


class SessionNotFound(NotFound):
    """No such session (in the engine, or in the store)."""


class SessionExists(AlreadyExists):
    """A session with that id is already open."""


class NoFreeSlot(ResourceExhausted):
    """Every KV slot holds a session that is generating."""


class ContextOverflow(ResourceExhausted):
    """The dense policy ran past its capacity (the model's context length)."""


class SessionBusy(Aborted):
    """The session is still ingesting or replying to a previous message."""


# ---------------------------------------------------------------------------------------------- store
class ShardLost(Unavailable):
    """A tensor-parallel shard of the engine went away: the engine cannot run until it is rebuilt."""


class StoreUnavailable(Unavailable):
    """The session store (Redis) did not answer."""


class TenantSessionLimit(ResourceExhausted):
    """The tenant already has its maximum number of live sessions."""


class TenantError(InvalidArgument):
    """A tenant operation was refused (bad name, duplicate, unknown tenant)."""


class Fenced(Unavailable):
    """This replica no longer owns the session (another replica claimed it since): its write was refused."""


# ---------------------------------------------------------------------------------------------- serving
class NotOwner(SinkServeError):
    """Internal, never a client answer: the call reached a replica that does not own the session. The gateway's
    backend re-sends it (the router then picks the owner); if that never settles, the client gets UNAVAILABLE."""

    status = Status.UNAVAILABLE


class ReplicaUnavailable(Unavailable):
    """No model replica could serve the call (dead, not deployed yet, engine loop stopped)."""


def find_error(exc: BaseException | None, depth: int = 6) -> SinkServeError | None:
    """The SinkServeError inside whatever wrapped it (Ray wraps remote exceptions), or None.

    Ray's wrapper class derives from the error it wraps (so it is a SinkServeError too) but its str() is the remote
    traceback: the error itself, its `cause`, is returned."""
    while exc is not None and depth > 0:
        if isinstance(exc, SinkServeError):
            cause = getattr(exc, "cause", None)
            return cause if isinstance(cause, SinkServeError) else exc
        exc = getattr(exc, "cause", None) or exc.__cause__
        depth -= 1
    return None
