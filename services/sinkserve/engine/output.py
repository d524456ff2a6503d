"""What a step hands back per session: text deltas from sampled ids, with stop strings held back.

`Detokenizer` decodes incrementally (a short tail per token, bytes of one character may span tokens) and holds
back text that could still become a stop string; `TokenOutput` is one step's event for one session.
"""

from __future__ import annotations

from dataclasses import dataclass

from sinkserve.protocol import FinishReason


@dataclass(frozen=True)
class StepStats:
    """What one step ran and where its time went (wall seconds; the forward's time includes the device's work
    only where the sampling step waits for it, as on a GPU)."""

    decode_rows: int
    prefill_tokens: int
    forward_s: float
    sample_s: float
    output_s: float  # session bookkeeping, detokenising, stop strings


@dataclass
class TokenOutput:
    """One step's result for one session that is generating."""

    session_id: str
    token_id: int | None  # None on the final event of an aborted turn
    text: str  # decoded text delta to stream (held back while it could be the start of a stop string)
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0  # tokens ingested for this turn (message + template + previous turn's close)
    completion_tokens: int = 0
    # On the final event only: every token id this turn added to the session's stream, in order
    # (message, reply, closing template tokens). Appending these to the transcript lets any engine
    # rebuild the session with import_session().
    turn_tokens: list[int] | None = None


class Detokenizer:
    """Turns sampled ids into text deltas; holds back text that may still become a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...] | list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all decoded text of the reply
        self.emitted = 0  # characters of self.text already streamed

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Returns (text to stream now, whether a stop string was hit)."""
        self.ids.append(token_id)
        # Decode a short tail only (O(1) per token): bytes of a multi-byte character may span tokens.
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if full.endswith("\ufffd"):
            return self._release(final=False)
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        return self._release(final=True)[0]

    def _release(self, final: bool) -> tuple[str, bool]:
        for stop in self.stop:
            hit = self.text.find(stop, max(0, self.emitted - len(stop) + 1))
            if hit != -1:
                self.text = self.text[:hit]
                out = self.text[self.emitted :]
                self.emitted = len(self.text)
                return out, True
        end = len(self.text)
        if not final:
            for stop in self.stop:  # hold back a tail that is a prefix of a stop string
                for size in range(min(len(stop) - 1, end - self.emitted), 0, -1):
                    if stop.startswith(self.text[end - size :]):
                        end = min(end, len(self.text) - size)
                        break
        out = self.text[self.emitted : end]
        self.emitted = end
        return out, False
