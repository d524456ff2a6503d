"""Errors a replica sends back through Ray (torch-free: the gateway unpickles them).

A replica never lets an engine exception cross the wire: it maps each to a ``ReplicaError`` carrying the
gRPC status name the gateway should answer with.
"""

from __future__ import annotations

# gRPC status names (grpc.StatusCode member names), kept as strings so this module imports nothing.
NOT_FOUND = "NOT_FOUND"
ABORTED = "ABORTED"
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
INVALID_ARGUMENT = "INVALID_ARGUMENT"
UNAVAILABLE = "UNAVAILABLE"
INTERNAL = "INTERNAL"
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
# Not a gRPC answer: the request reached a replica that does not own the session; the gateway re-routes.
NOT_OWNER = "NOT_OWNER"


class ReplicaError(Exception):
    def __init__(self, status: str, message: str, retry_after_s: float | None = None):
        super().__init__(status, message, retry_after_s)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s  # sent to clients as `retry-after-ms` trailing metadata

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"


def unwrap(exc: BaseException) -> ReplicaError | None:
    """The ReplicaError inside whatever Ray wrapped it in, or None."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, ReplicaError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
        seen += 1
    return None
