"""Replica load reports and owned-session counts (real redis-server)."""

from __future__ import annotations

import asyncio

from sinkserve.store import LoadReport


async def test_loads_pair_owned_counts_with_live_reports(store):
    for _ in range(2):
        sid = (await store.sessions.create_session("acme", max_sessions=10)).session_id
        await store.ownership.claim(sid, 0, "replica-a", 10_000)
    await store.replicas.report_load(LoadReport("replica-a", sessions=1, free_slots=3, queue=2), ttl_ms=10_000)
    loads = await store.replicas.loads(["replica-a", "replica-b"])
    owned, report = loads["replica-a"]
    assert owned == 2 and report.free_slots == 3 and report.queue == 2 and report.reported_ms > 0
    assert loads["replica-b"] == (0, None)  # never reported, owns nothing
    await store.replicas.drop_report("replica-a")
    assert (await store.replicas.loads(["replica-a"]))["replica-a"] == (2, None)


async def test_a_report_lapses_after_its_ttl(store):
    await store.replicas.report_load(LoadReport("replica-a", draining=True), ttl_ms=1)
    for _ in range(100):
        if (await store.replicas.loads(["replica-a"]))["replica-a"][1] is None:
            break
        await asyncio.sleep(0.01)
    assert (await store.replicas.loads(["replica-a"]))["replica-a"] == (0, None)
