"""The gateway's own limits (message bytes, max_new_tokens, labels, page size, session ids), as InvalidArgument.

Generation settings themselves are validated by `GenerationParams` (sinkserve.protocol); this module only adds the
deployment's bounds and the shape of a request that the settings do not cover.
"""

from __future__ import annotations

from typing import Any, Mapping

from sinkserve.config import GatewayConfig
from sinkserve.errors import InvalidArgument
from sinkserve.protocol import GenerationParams

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_SESSION_ID = 128
MAX_LABELS = 32
MAX_LABEL_BYTES = 256  # key + value
DEFAULT_MAX_TOKENS = 256  # a turn that names no max_tokens gets min(this, max_new_tokens)


class Limits:
    def __init__(self, cfg: GatewayConfig):
        self.cfg = cfg

    @property
    def default_max_tokens(self) -> int:
        return min(DEFAULT_MAX_TOKENS, self.cfg.max_new_tokens)

    def check_text(self, text: str, what: str) -> None:
        size = len(text.encode())
        if size > self.cfg.max_message_bytes:
            raise InvalidArgument(f"{what} is {size} bytes; the limit is {self.cfg.max_message_bytes}")

    def check_message(self, text: str) -> None:
        if not text.strip():
            raise InvalidArgument("text is empty")
        self.check_text(text, "text")

    @staticmethod
    def check_session_id(session_id: str) -> None:
        if not session_id:
            raise InvalidArgument("session_id is required")
        if len(session_id) > MAX_SESSION_ID:
            raise InvalidArgument(f"session_id is longer than {MAX_SESSION_ID} characters")

    @staticmethod
    def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
        if len(labels) > MAX_LABELS or any(len(k.encode()) + len(v.encode()) > MAX_LABEL_BYTES
                                           for k, v in labels.items()):
            raise InvalidArgument(f"at most {MAX_LABELS} labels of {MAX_LABEL_BYTES} bytes each (key and value)")
        return dict(labels)

    @staticmethod
    def page_size(requested: int) -> int:
        if requested > MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size is at most {MAX_PAGE_SIZE}")
        return requested or DEFAULT_PAGE_SIZE

    def session_defaults(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """A session's stored default settings: valid on their own, still partial."""
        return GenerationParams.check_fields(fields, max_tokens_limit=self.cfg.max_new_tokens)

    def turn_params(self, defaults: Mapping[str, Any], fields: Mapping[str, Any]) -> GenerationParams:
        """One turn's settings: the session's defaults overridden by the turn's, then the server's default."""
        return GenerationParams.from_fields(
            {**defaults, **fields},
            max_tokens_limit=self.cfg.max_new_tokens,
            default_max_tokens=self.default_max_tokens,
        )
