"""Chat-template rendering by message deltas, and incremental detokenization with stop strings."""

from __future__ import annotations

# Used when a checkpoint's tokenizer carries no chat template (e.g. Pythia).
DEFAULT_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatFormat:
    """Renders one message at a time as the token ids it adds to a running conversation.

    Templates only render whole conversations, so each delta is the difference between rendering a
    conversation with and without the new message (a probe system message anchors the prefix)."""

    _PROBE = "\x00probe\x00"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.template = tokenizer.chat_template or DEFAULT_CHATML
        system = {"role": "system", "content": self._PROBE}
        base = self._render([system])
        with_user = self._render([system, {"role": "user", "content": self._PROBE}], add_generation_prompt=True)
        reply = self._render(
            [system, {"role": "user", "content": self._PROBE}, {"role": "assistant", "content": self._PROBE}]
        )
        user_turn = with_user[len(base) :]
        self._user_before, self._user_after = user_turn.split(self._PROBE)
        after_reply = reply[len(with_user) :]
        # What the template puts after an assistant message (ChatML: "<|im_end|>\n").
        self.assistant_close = after_reply.split(self._PROBE, 1)[1] if self._PROBE in after_reply else ""
        self.close_ids = self.encode(self.assistant_close)
        only_user = self._render([{"role": "user", "content": self._PROBE}], add_generation_prompt=True)
        # Conversation start when no system prompt is given (templates may inject a default one).
        self.default_preamble = only_user[: len(only_user) - len(user_turn)] if only_user.endswith(user_turn) else ""

    def _render(self, messages, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def system_ids(self, system_prompt: str | None) -> list[int]:
        if system_prompt is None:
            return self.encode(self.default_preamble)
        return self.encode(self._render([{"role": "system", "content": system_prompt}]))

    def user_ids(self, text: str) -> list[int]:
        """A user message followed by the assistant header (the generation prompt)."""
        return self.encode(self._user_before + text + self._user_after)


class Detokenizer:
    """Turns sampled ids into text deltas; holds back text that may still become a stop string."""

    def __init__(self, tokenizer, stop: list[str]):
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
