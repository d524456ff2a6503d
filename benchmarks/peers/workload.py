"""The workloads every system runs, and the worker side of the protocol: a spec file in, one JSON line out.

Standard library only: it is imported inside the peers' virtualenvs too.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULT_MARK = "PEER-RESULT "  # the worker's one line of result on stdout; anything else there is the peer's noise


@dataclass
class Spec:
    """What one worker run does. Every prompt is a transcript's ids followed by one chat message's ids (the
    message's text for sinkserve's turn API, its ids as sinkserve's chat format renders them for the peers): every
    system ingests the same ids."""

    threads: int
    decode_tokens: int  # timed decode tokens per measurement (after the first token)
    message: str = ""  # the user message that ends every prompt
    message_ids: list[int] = field(default_factory=list)  # its ids (user header, text, assistant header)
    # one session: transcript ids per cache size ("256" -> ids); with the message they fill the cache up to
    # decode_tokens + 8
    single: dict[str, list[int]] = field(default_factory=dict)
    # concurrent sessions: one short prompt per session, the first N used for N sessions
    concurrent_prompts: list[list[int]] = field(default_factory=list)
    concurrency: list[int] = field(default_factory=lambda: [8, 64])
    ttft_prompt: list[int] = field(default_factory=list)  # one message of ~1,000 ids into an empty session
    # a prompt longer than the peers' context (`context` tokens): what each system does with it
    overflow_prompt: list[int] = field(default_factory=list)
    context: int = 0  # the context length the peers are started with (the largest single prompt + room)
    # sinkserve's own settings for its run (dtype/weights "auto" by default: what a user gets)
    sinkserve: dict = field(default_factory=dict)
    checkpoint: str = ""  # safetensors checkpoint directory (sinkserve, vLLM)
    gguf: str = ""  # the bundled GGUF (llama.cpp)

    @classmethod
    def load(cls, path: str | Path) -> "Spec":
        return cls(**json.loads(Path(path).read_text()))

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self)))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Clock:
    def __enter__(self) -> "Clock":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def log(system: str, message: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')} {system}] {message}", file=sys.stderr, flush=True)


def emit(result: dict) -> None:
    """The worker's answer: one marked line, so a peer's own prints on stdout cannot corrupt it."""
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


def parse(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise ValueError("the worker printed no result line")
