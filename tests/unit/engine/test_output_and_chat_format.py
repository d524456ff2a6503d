"""Text deltas with stop strings held back, and chat-template deltas, with the bundled tokenizer."""

import pytest
from transformers import AutoTokenizer

from sinkserve.engine.chat_format import ChatFormat
from sinkserve.engine.output import Detokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def stream(tokenizer, text, stop):
    detok = Detokenizer(tokenizer, stop)
    deltas, stopped = [], False
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        delta, stopped = detok.add(token)
        deltas.append(delta)
        if stopped:
            break
    if not stopped:
        deltas.append(detok.flush())
    return deltas, stopped


def test_deltas_add_up_to_the_decoded_text(tokenizer):
    text = "Attention sinks keep the first tokens. Ünïcödé and 東京 split over tokens."
    deltas, stopped = stream(tokenizer, text, ())
    assert not stopped and "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)  # a character split over tokens waits for its last byte


def test_a_stop_string_is_cut_and_never_streamed(tokenizer):
    deltas, stopped = stream(tokenizer, "one two STOP three", ("STOP",))
    assert stopped and "".join(deltas) == "one two "


def test_a_prefix_of_a_stop_string_is_held_back_then_released(tokenizer):
    detok = Detokenizer(tokenizer, ("END!",))
    seen = ""
    for token in tokenizer("we are at the EN", add_special_tokens=False)["input_ids"]:
        seen += detok.add(token)[0]
    assert seen == "we are at the "  # "EN" could still become "END!"
    rest, stopped = detok.add(tokenizer(" now", add_special_tokens=False)["input_ids"][0])
    assert not stopped and seen + rest + detok.flush() == "we are at the EN now"


def test_chat_format_deltas_render_the_same_conversation_as_the_template(tokenizer):
    chat = ChatFormat(tokenizer)
    ids = chat.system_ids("Be brief.") + chat.user_ids("Hi there")
    whole = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert tokenizer.decode(ids) == whole
    # A reply closes with the template's own close, then the next message continues the same conversation.
    reply = chat.encode("Hello!")
    ids += reply + chat.close_ids + chat.user_ids("More?")
    whole = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "More?"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert tokenizer.decode(ids) == whole
    # No system prompt: the template's own default preamble (if any) opens the conversation.
    default = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(chat.system_ids(None) + chat.user_ids("x")) == default
