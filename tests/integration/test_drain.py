"""Scale-down drains a replica: it hands its sessions back and the survivor rebuilds them from the transcript."""

from __future__ import annotations

import pytest

from .conftest import SINKS, WINDOW, stack_settings

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(600)]


def test_scale_down_re_homes_sessions_with_their_transcripts(stack, tiny_checkpoint, client_factory):
    from ray import serve

    from sinkserve.gateway.backend import ServeBackend
    from sinkserve.gateway.server import Gateway
    from sinkserve.replica.local import deploy

    settings = stack_settings(tiny_checkpoint, stack.settings.redis.url)
    settings.redis.key_prefix = "drain"
    settings.ray.app_name = "drain"
    deploy(settings)
    gateway = Gateway(settings, ServeBackend.connect(settings.ray.app_name))
    port = stack.loop.run(gateway.start())
    try:
        _, key = stack.loop.run(gateway.store.tenants.create("drain"))
        client = client_factory(key, f"127.0.0.1:{port}")
        sessions = [client.create_session().session_id for _ in range(4)]
        owners = {}
        for sid in sessions:
            for i in range(3):
                _, final = client.chat(sid, f"turn {i}", max_tokens=6)
            owners[sid] = final.replica
        assert len(set(owners.values())) == 2
        transcripts = {sid: stack.loop.run(gateway.store.sessions.transcript(sid)) for sid in sessions}

        settings.replica.num_replicas = 1
        deploy(settings)  # Serve stops one replica gracefully: its __del__ releases the sessions it owned

        survivors = set()
        for sid in sessions:
            text, final = client.chat(sid, "still there?", max_tokens=6)
            assert text and final.turn == 4
            survivors.add(final.replica)
            after = stack.loop.run(gateway.store.sessions.transcript(sid))
            assert after[:3] == transcripts[sid] and len(after) == 4
            info = client.get_session(sid)
            assert info.owner_replica == final.replica
            assert info.cache_entries == min(SINKS + WINDOW, info.tokens_seen)
        assert len(survivors) == 1
    finally:
        stack.loop.run(gateway.stop(grace_s=1))
        serve.delete("drain")
