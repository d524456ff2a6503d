"""The replica's loop, slots, fencing, drain and health (real Redis, tiny model, no Ray), and its serve config."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from sinkserve.config import Settings
from sinkserve.replica.errors import NOT_OWNER, ReplicaError

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_serve_config_is_valid_and_builds():
    from ray.serve.schema import ServeDeploySchema

    from sinkserve.replica.app import build_app, deployment_options

    config = yaml.safe_load((REPO / "deploy/serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (app_config,) = config["applications"]
    assert app_config["import_path"] == "sinkserve.replica.app:build_app"
    settings = Settings.model_validate(app_config["args"])
    assert build_app(app_config["args"]) is not None
    gpu = Settings.model_validate({"replica": {"num_gpus": 1, "tensor_parallel": 2}})
    options = deployment_options(gpu)
    assert options["placement_group_bundles"] == [{"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}]
    assert options["request_router_config"].request_router_kwargs["redis_url"] == gpu.redis.url
    assert deployment_options(settings)["num_replicas"] == 2
    with pytest.raises(Exception):
        build_app({"engine": {"window": 0}})


@pytest.fixture(scope="module")
def tiny_engine(tiny_checkpoint):
    from sinkserve.config import EngineConfig
    from sinkserve.engine import load_engine

    return load_engine(
        EngineConfig(model=str(tiny_checkpoint), sinks=4, window=28, slots=2, device="cpu", num_threads=1)
    )


async def _replica(redis_server, engine, prefix: str, **replica_settings):
    from sinkserve.replica.server import SinkServeReplica

    class UnitReplica(SinkServeReplica):
        # Serve awaits the async __del__ at graceful shutdown (the test does too); outside Serve the garbage
        # collector would call it without awaiting.
        def __del__(self) -> None:
            pass

    settings = Settings(
        redis={"url": redis_server.url, "key_prefix": prefix},
        replica={"load_report_interval_s": 0.2, **replica_settings},
    )
    replica = UnitReplica.__new__(UnitReplica)
    await replica.__init__(settings, engine=engine)  # Serve awaits the async __init__ the same way
    return replica


async def _drain(replica, sid: str, text: str, max_tokens: int = 4) -> list[dict]:
    return [event async for event in replica.chat(session_id=sid, text=text, params={"max_tokens": max_tokens})]


async def test_replica_slots_rebuild_fencing_drain_and_health(redis_server, tiny_engine):
    # No host memory for parking: an idle session that loses its slot is dropped and rebuilt from its log.
    replica = await _replica(redis_server, tiny_engine, "replica-unit", park_host_bytes=0)
    store = replica.store
    try:
        sids = [(await store.sessions.create_session("t", max_sessions=10)).session_id for _ in range(3)]
        for sid in sids:  # three sessions through two slots: the idle LRU one is dropped, then rebuilt
            await replica.create(session_id=sid)
            events = await _drain(replica, sid, "hello")
            assert events[-1]["final"]["turn"] == 1
        assert replica.evicted >= 1
        events = await _drain(replica, sids[0], "again")
        assert events[-1]["final"]["turn"] == 2 and replica.rebuilt >= 1
        # Two turns at once on sessions that are not resident: each takes an idle session's slot, none fails.
        fourth = (await store.sessions.create_session("t", max_sessions=10)).session_id
        await replica.create(session_id=fourth)
        await _drain(replica, fourth, "hi")
        assert set(replica.resident) == {sids[0], fourth}
        finals = await asyncio.gather(_drain(replica, sids[1], "together"), _drain(replica, sids[2], "together"))
        assert [f[-1]["final"]["turn"] for f in finals] == [2, 2]
        assert set(replica.resident) == {sids[1], sids[2]}

        # Another replica claims sids[1]: this one may no longer record turns for it.
        record = await store.sessions.get_session(sids[1])
        await store.ownership.claim(sids[1], record.epoch, "someone-else", 10_000)
        with pytest.raises(ReplicaError) as err:
            await _drain(replica, sids[1], "mine?")
        assert err.value.status == NOT_OWNER
        assert await store.sessions.transcript_len(sids[1]) == 2

        await replica.check_health()
        report = (await store.replicas.loads([replica.replica_id]))[replica.replica_id][1]
        assert report is not None and report.max_sessions == 2

        def explode():
            raise RuntimeError("injected engine failure")

        tiny_engine.step, original = (lambda: explode()), tiny_engine.step
        try:
            with pytest.raises(ReplicaError):
                await _drain(replica, sids[2], "this step fails")
            with pytest.raises(RuntimeError, match="engine loop is dead"):
                await replica.check_health()
        finally:
            tiny_engine.step = original
        # Graceful shutdown hands the sessions back so routers re-home them at once.
        owned = dict(replica.owned)
        assert owned
        from sinkserve.replica.server import SinkServeReplica

        await SinkServeReplica.__del__(replica)
        for sid in owned:
            assert (await store.sessions.get_session(sid)).owner == ""
        assert (await store.replicas.loads([replica.replica_id]))[replica.replica_id] == (0, None)
    finally:
        replica._beat_task.cancel()
        replica.loop.stop()
        await store.close()


async def _stop_sharing(replica, engine) -> None:
    """Stop a test replica and free the module-shared engine's slots for the next test."""
    replica._beat_task.cancel()
    replica.loop.stop()
    for sid in engine.sessions():
        engine.close_session(sid)
    await replica.store.close()


async def _greedy_turn(replica, sid: str, text: str) -> list[dict]:
    params = {"max_tokens": 12, "ignore_eos": True}
    return [event async for event in replica.chat(session_id=sid, text=text, params=params)]


async def test_parked_sessions_resume_exactly_and_are_reported(redis_server, tiny_engine, tiny_checkpoint):
    """More sessions than slots: idle ones park in host memory and resume with the same cache as if they
    had never left their slot."""
    from sinkserve.config import EngineConfig
    from sinkserve.engine import SamplingParams, load_engine

    for leftover in tiny_engine.sessions():  # the module's engine is shared with the tests before
        tiny_engine.close_session(leftover)
    replica = await _replica(redis_server, tiny_engine, "replica-park")
    store = replica.store
    try:
        sids = [(await store.sessions.create_session("t", max_sessions=10)).session_id for _ in range(5)]
        for sid in sids:
            await replica.create(session_id=sid)
        first = {sid: await _greedy_turn(replica, sid, f"hello from {sid}") for sid in sids}
        assert replica.parks >= 3 and len(replica.parked) == 3 and len(replica.resident) == 2
        assert all(info["parked"] for info in [await replica.info(session_id=s) for s in sids[:3]])
        second = {sid: await _greedy_turn(replica, sid, "and again") for sid in sids}
        assert replica.resumes >= 3 and replica.rebuilt == 0  # resumed from host memory, not rebuilt

        # The same conversation in an engine with a slot per session (never parked) says the same.
        reference = load_engine(
            EngineConfig(model=str(tiny_checkpoint), sinks=4, window=28, slots=5, device="cpu", num_threads=1)
        )
        params = SamplingParams(max_tokens=12, ignore_eos=True)
        for sid in sids:
            reference.open_session(sid)
            for text, events in ((f"hello from {sid}", first[sid]), ("and again", second[sid])):
                expected = "".join(out.text for out in reference.chat(sid, text, params))
                got = "".join(e.get("delta", "") for e in events) + events[-1]["final"]["text"]
                assert got == expected

        report = (await store.replicas.loads([replica.replica_id]))[replica.replica_id][1]
        for _ in range(20):
            report = (await store.replicas.loads([replica.replica_id]))[replica.replica_id][1]
            if report.extra["parks"] == replica.parks:
                break
            await asyncio.sleep(0.2)
        assert report.extra["parked"] == 3 and report.extra["resident"] == 2
        assert report.extra["parks"] >= 6 and report.extra["resumes"] >= 3 and report.extra["rebuilt"] == 0
    finally:
        await _stop_sharing(replica, tiny_engine)


async def test_full_slots_queue_then_refuse_with_retry_hint(redis_server, tiny_engine):
    """Every slot generating: a new turn waits for one; past the admission timeout it is refused with
    RESOURCE_EXHAUSTED and a retry hint, and nothing is recorded for it."""
    from sinkserve.replica.errors import RESOURCE_EXHAUSTED

    for leftover in tiny_engine.sessions():  # the module's engine is shared with the tests before
        tiny_engine.close_session(leftover)
    replica = await _replica(redis_server, tiny_engine, "replica-admit", admission_timeout_s=0.5)
    store = replica.store
    try:
        sids = [(await store.sessions.create_session("t", max_sessions=10)).session_id for _ in range(3)]
        for sid in sids[:2]:
            await replica.create(session_id=sid)

        async def long_turn(sid):
            # Long enough never to end by itself while the test runs (decode speed must not matter): the
            # test cancels these turns, as a client would, to free the slots.
            params = {"max_tokens": 1_000_000, "ignore_eos": True}
            return [e async for e in replica.chat(session_id=sid, text="go on", params=params)]

        busy = [asyncio.create_task(long_turn(sid)) for sid in sids[:2]]
        while not all(sid in replica.active and sid in replica.resident for sid in sids[:2]):
            await asyncio.sleep(0.01)
        with pytest.raises(ReplicaError) as refused:
            await _drain(replica, sids[2], "me too")
        assert refused.value.status == RESOURCE_EXHAUSTED and refused.value.retry_after_s
        assert await store.sessions.transcript_len(sids[2]) == 0
        # With a longer wait the third turn is admitted as soon as a slot frees up.
        replica.settings.replica.admission_timeout_s = 120
        waiting = asyncio.create_task(_drain(replica, sids[2], "me too"))
        await asyncio.sleep(0.2)
        assert not waiting.done() and replica._waiting == 1
        for task in busy:  # the clients go away: their sessions go idle and a slot can be handed over
            task.cancel()
        await asyncio.gather(*busy, return_exceptions=True)
        events = await waiting
        assert events[-1]["final"]["turn"] == 1
    finally:
        await _stop_sharing(replica, tiny_engine)


async def test_a_turn_on_the_session_being_parked_waits_and_resumes(redis_server, tiny_engine):
    """The least recently used idle session is chosen to give up its slot; a turn on that very session
    arriving while the engine is parking it must wait and resume it, not start on a cache that just left
    its slot (which once surfaced as a spurious RESOURCE_EXHAUSTED under load)."""
    import threading

    for leftover in tiny_engine.sessions():  # the module's engine is shared with the tests before
        tiny_engine.close_session(leftover)
    replica = await _replica(redis_server, tiny_engine, "replica-race")
    store = replica.store
    gate = threading.Event()
    try:
        sids = [(await store.sessions.create_session("t", max_sessions=10)).session_id for _ in range(3)]
        for sid in sids:
            await replica.create(session_id=sid)
            await _greedy_turn(replica, sid, f"hello from {sid}")
        parked, victim = sids[0], sids[1]  # two slots: the first session is parked, the second is next
        assert parked in replica.parked and list(replica.resident)[0] == victim

        # Hold the engine thread so the park-and-load call queues behind it, then send the victim a turn.
        holding = threading.Event()
        blocker = asyncio.ensure_future(replica.loop.call(lambda engine: holding.set() or gate.wait(30)))
        while not holding.is_set():
            await asyncio.sleep(0.01)
        resume_turn = asyncio.create_task(_greedy_turn(replica, parked, "back again"))
        for _ in range(500):
            if replica.loop.pending_calls >= 1:
                break
            await asyncio.sleep(0.01)
        assert replica.loop.pending_calls >= 1  # the park-and-load call is queued
        victim_turn = asyncio.create_task(_greedy_turn(replica, victim, "me as well"))
        await asyncio.sleep(0.5)  # the victim's turn gets as far as it can before the engine moves
        gate.set()
        await blocker
        resumed, answered = await asyncio.gather(resume_turn, victim_turn)
        assert resumed[-1]["final"]["turn"] == 2 and answered[-1]["final"]["turn"] == 2
        assert replica.rebuilt == 0 and replica.resumes >= 2  # the victim came back from host memory
        assert set(tiny_engine.sessions()) == set(sids)
        assert len(replica.resident) == 2 and len(replica.parked) == 1
    finally:
        gate.set()
        await _stop_sharing(replica, tiny_engine)
