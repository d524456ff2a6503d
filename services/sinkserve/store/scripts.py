"""The store's Lua scripts, read from the package's ``lua/`` files and registered on a client.

Each script runs atomically in Redis: that is what makes a claim, a fenced append or a quota-checked create
safe against every other gateway, router and replica at once.
"""

from __future__ import annotations

from importlib import resources

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

NAMES = (
    "create", "claim", "renew", "append", "transcript_ends", "release", "delete", "unlock", "lock_renew",
    "reserve_tokens", "renew_tokens", "take_request",
)


def source(name: str) -> str:
    """The text of ``lua/{name}.lua``."""
    if name not in NAMES:
        raise KeyError(f"no Lua script {name!r}")
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def register(client: aioredis.Redis, name: str) -> AsyncScript:
    """A callable script (EVALSHA, loading it on first use)."""
    return client.register_script(source(name))
