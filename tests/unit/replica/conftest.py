"""A replica built directly (no Ray): a real redis-server, a real tiny-model engine, the replica's own loop."""

from __future__ import annotations

import pytest

from sinkserve.config import EngineConfig, Settings
from sinkserve.engine import load_engine
from sinkserve.engine.testing import make_tiny_checkpoint
from sinkserve.replica.server import SinkServeReplica

SINKS, WINDOW = 4, 28


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), arch="llama")


@pytest.fixture
def make_engine(tiny_checkpoint):
    def build(slots: int = 2, **engine):
        fields = dict(model=str(tiny_checkpoint), sinks=SINKS, window=WINDOW, slots=slots, device="cpu", num_threads=1,
                      dtype="float32", weights="dense")
        return load_engine(EngineConfig(**{**fields, **engine}))

    return build


class UnitReplica(SinkServeReplica):
    # Serve awaits the async __del__ at graceful shutdown (tests call shutdown()); outside Serve the garbage
    # collector would call it without awaiting.
    def __del__(self) -> None:
        pass


@pytest.fixture
async def make_replica(redis_server, request):
    made = []

    async def build(engine, **replica_settings):
        settings = Settings(
            redis={"url": redis_server.url, "key_prefix": f"replica-{request.node.name}-{len(made)}"},
            replica={"load_report_interval_s": 0.2, **replica_settings},
        )
        replica = UnitReplica.__new__(UnitReplica)
        await replica.__init__(settings, engine=engine)  # Serve awaits the async __init__ the same way
        made.append(replica)
        return replica

    yield build
    for replica in made:
        replica.heartbeat.stop()
        replica.loop.stop()
        await replica.store.close()
