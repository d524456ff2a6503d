"""Chat-template rendering by message deltas: the token ids each message adds to a running conversation."""

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
