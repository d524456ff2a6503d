"""The one table from ``sinkserve.errors`` statuses to HTTP answers in OpenAI's error shape.

``{"error": {"message", "type", "param", "code"}}`` with the HTTP status of the table; a refusal with a retry hint
carries ``retry-after`` (whole seconds, rounded up). Redis errors are 503 "session store unavailable"; anything
else is 500 "internal error" (details go to the log, never to the client).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from sinkserve.errors import NotOwner, Status, find_error


class HttpError(NamedTuple):
    http_status: int
    type: str
    code: str


TABLE: dict[Status, HttpError] = {
    Status.INVALID_ARGUMENT: HttpError(400, "invalid_request_error", "invalid_argument"),
    Status.UNAUTHENTICATED: HttpError(401, "authentication_error", "invalid_api_key"),
    Status.PERMISSION_DENIED: HttpError(403, "permission_error", "permission_denied"),
    Status.NOT_FOUND: HttpError(404, "not_found_error", "not_found"),
    Status.ALREADY_EXISTS: HttpError(409, "invalid_request_error", "already_exists"),
    Status.RESOURCE_EXHAUSTED: HttpError(429, "rate_limit_error", "rate_limit_exceeded"),
    Status.ABORTED: HttpError(409, "conflict_error", "session_busy"),
    Status.DEADLINE_EXCEEDED: HttpError(504, "timeout_error", "deadline_exceeded"),
    Status.UNAVAILABLE: HttpError(503, "service_unavailable_error", "unavailable"),
    Status.INTERNAL: HttpError(500, "server_error", "internal_error"),
}


class Answer(NamedTuple):
    http_status: int
    body: dict[str, Any]
    headers: dict[str, str]


def error_body(message: str, kind: HttpError, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind.type, "param": param, "code": kind.code}}


def answer_for(exc: BaseException) -> Answer:
    """The HTTP status, OpenAI-shaped body and headers for an exception."""
    from redis import exceptions as redis_exc

    found = find_error(exc)
    headers: dict[str, str] = {}
    if found is not None:
        message = str(found.message)
        if isinstance(found, NotOwner):
            message = "the session is moving to another replica; retry shortly"
        kind = TABLE[found.status]
        if found.retry_after_s is not None:
            headers["retry-after"] = str(max(1, math.ceil(found.retry_after_s)))
        return Answer(kind.http_status, error_body(message, kind, getattr(found, "param", None)), headers)
    if isinstance(exc, redis_exc.RedisError):
        kind = TABLE[Status.UNAVAILABLE]
        return Answer(kind.http_status, error_body("session store unavailable", kind), headers)
    kind = TABLE[Status.INTERNAL]
    return Answer(kind.http_status, error_body("internal error", kind), headers)
