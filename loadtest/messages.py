"""The chat messages the load test's users send (shared by the Locust users and the engine-alone baseline)."""

from __future__ import annotations

import random

SYSTEM_PROMPT = "You are a friendly assistant in a long conversation."

SENTENCES = (
    "Tell me more about that.",
    "What happened next in the story?",
    "Can you summarise what we said so far in one line?",
    "I was thinking about the weather on the coast this weekend.",
    "Give me three ideas for a quick dinner.",
    "Why do cats sit in boxes?",
    "Let's switch topics: how do tides work?",
    "Explain it again, but simpler.",
    "Write a two-line poem about trains.",
    "What is a good name for a small grey dog?",
    "How long would it take to walk across the city?",
    "Remind me what my first question was.",
)


def message(rng: random.Random, turn: int) -> str:
    """The user's message for its `turn`-th turn (1-based): one to three of the sentences."""
    picked = rng.sample(SENTENCES, rng.randint(1, 3))
    return f"(message {turn}) " + " ".join(picked)
