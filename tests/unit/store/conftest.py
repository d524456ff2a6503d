"""A store per test on the shared redis-server (tests/unit/conftest.py), under a key prefix of its own."""

from __future__ import annotations

import pytest

from sinkserve.config import RedisConfig
from sinkserve.store import Store


@pytest.fixture
async def store(redis_server, request):
    """A store under a prefix of its own, so tests never see each other's keys."""
    store = Store.from_config(RedisConfig(url=redis_server.url, key_prefix=f"unit-{request.node.name}"))
    yield store
    await store.close()
