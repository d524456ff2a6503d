"""The bundled SmolLM2 model served through the whole path: a real answer streamed over gRPC."""

from __future__ import annotations

import pytest

from sinkserve.config import Settings

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def bundled_address(stack):
    from ray import serve

    from sinkserve.gateway.backend import ServeBackend
    from sinkserve.gateway.server import Gateway
    from sinkserve.replica.local import deploy

    settings = Settings(
        engine={"sinks": 4, "window": 252, "slots": 2, "device": "cpu", "num_threads": 1},
        replica={"num_replicas": 1, "num_cpus": 0.5, "load_report_interval_s": 0.5},
        redis={"url": stack.settings.redis.url, "key_prefix": "bundled"},
        gateway={"host": "127.0.0.1", "port": 0},
        ray={"app_name": "bundled"},
    )
    deploy(settings)
    gateway = Gateway(settings, ServeBackend.connect(settings.ray.app_name))
    port = stack.loop.run(gateway.start())
    _, key = stack.loop.run(gateway.store.tenants.create("bundled"))
    try:
        yield f"127.0.0.1:{port}", key
    finally:
        stack.loop.run(gateway.stop(grace_s=1))
        serve.delete("bundled")


def test_bundled_model_answers_through_the_gateway(bundled_address, client_factory):
    address, key = bundled_address
    client = client_factory(key, address)
    session = client.create_session(system_prompt="You are a helpful assistant. Answer in one short sentence.")
    text, final = client.chat(session.session_id, "What is the capital of France?", max_tokens=24, temperature=0.0)
    assert "Paris" in text
    assert final.finish_reason in (1, 2)  # eos or length
    text2, final2 = client.chat(session.session_id, "And of Italy?", max_tokens=24, temperature=0.0)
    assert text2.strip() and final2.turn == 2
    info = client.get_session(session.session_id)
    assert info.turns == 2 and 0 < info.cache_entries <= info.cache_capacity == 256
