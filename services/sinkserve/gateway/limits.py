"""The gateway's own limits (message bytes, max_new_tokens, top_k, labels, page size, session and request ids).

Generation settings themselves are validated by `GenerationParams` (sinkserve.protocol); this module only adds the
deployment's bounds and the shape of a request that the settings do not cover. A refusal is InvalidArgument,
except a session id that does not have the server's form: that is the same NOT_FOUND as an unknown one, given
before any store access.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from sinkserve.config import GatewayConfig
from sinkserve.errors import InvalidArgument
from sinkserve.protocol import GenerationParams
from sinkserve.store.keys import check_session_id

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# A client's idempotency key: 1-128 printable ASCII characters, no spaces.
REQUEST_ID = re.compile(r"[!-~]{1,128}")
# Tokens a turn may add besides its message's (chat template, the previous turn's close): the reservation's
# allowance. The message's own tokens are counted as its UTF-8 bytes, which no byte-level tokenizer exceeds.
TEMPLATE_ALLOWANCE = 32
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
        """Empty: INVALID_ARGUMENT (a required field). Not of the server-generated form: NOT_FOUND, the same answer
        as an unknown id, and no key is built from it."""
        if not session_id:
            raise InvalidArgument("session_id is required")
        check_session_id(session_id)

    @staticmethod
    def check_request_id(request_id: str) -> str:
        if request_id and not REQUEST_ID.fullmatch(request_id):
            raise InvalidArgument("request_id is 1-128 printable ASCII characters without spaces")
        return request_id

    @staticmethod
    def worst_case_tokens(text: str, params: GenerationParams, system_prompt: str = "") -> int:
        """An upper bound of the tokens a turn is charged: its message (and, on a session's first turn, its system
        prompt) as bytes, the template allowance, and max_tokens."""
        return len(text.encode()) + len(system_prompt.encode()) + TEMPLATE_ALLOWANCE + params.max_tokens

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

    def _check_top_k(self, fields: Mapping[str, Any]) -> None:
        # The replica bounds top_k by its vocabulary; this cap refuses absurd values (2^32 - 1) at the door.
        top_k = fields.get("top_k")
        if isinstance(top_k, int) and top_k > self.cfg.max_top_k:
            raise InvalidArgument(f"top_k must be between 0 and {self.cfg.max_top_k}")

    def session_defaults(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """A session's stored default settings: valid on their own, still partial."""
        self._check_top_k(fields)
        return GenerationParams.check_fields(fields, max_tokens_limit=self.cfg.max_new_tokens)

    def turn_params(self, defaults: Mapping[str, Any], fields: Mapping[str, Any]) -> GenerationParams:
        """One turn's settings: the session's defaults overridden by the turn's, then the server's default."""
        merged = {**defaults, **fields}
        self._check_top_k(merged)
        return GenerationParams.from_fields(
            merged,
            max_tokens_limit=self.cfg.max_new_tokens,
            default_max_tokens=self.default_max_tokens,
        )
