"""A real redis-server shared by the unit tests that need one: started once on a free loopback port."""

from __future__ import annotations

import pytest

from sinkserve.store.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server():
    with RedisServer() as server:
        yield server
