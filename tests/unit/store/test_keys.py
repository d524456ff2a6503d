"""The keyspace: one place builds every key, and nothing else in the repository builds one by hand."""

from __future__ import annotations

import re
import time
from pathlib import Path

from sinkserve.store import Keys, TurnRecord
from sinkserve.store.tenants import digest

REPO = Path(__file__).resolve().parents[3]
KEYS_MODULE = REPO / "services/sinkserve/store/keys.py"
SCANNED = ("services", "loadtest", "benchmarks", "deploy", "tests")
# Hand-built key strings: a prefix interpolated before a ':', a quoted key segment (":s:", ':r:', ":key:",
# ":tenants") or a quoted key suffix (":tx", ":sessions", ...); in Lua, a concatenation with a ':' literal.
HAND_BUILT = re.compile(
    r"\{[\w.()]*prefix\}:"
    r"""|["']:(?:s|t|r|key|tenants)(?::|["'])"""
    r"""|:(?:tx|lease|busy|turns|sessions|keys|tpm|tpr|rps)(?::|["'])"""
)
HAND_BUILT_LUA = re.compile(r"""\.\.\s*["'][^"'\n]*:""")


def test_layout():
    keys = Keys("p")
    sid = "0123456789abcdef" * 2
    assert keys.session(sid) == f"p:s:{sid}"
    assert keys.transcript(sid) == f"p:s:{sid}:tx"
    assert keys.lease(sid) == f"p:s:{sid}:lease"
    assert keys.busy(sid) == f"p:s:{sid}:busy"
    assert keys.recent_turns(sid) == f"p:s:{sid}:turns"
    assert keys.tenant_sessions("acme") == "p:t:acme:sessions"
    assert keys.replica_report("r1") == "p:r:r1"
    assert keys.replica_owned("r1") == "p:r:r1:sessions"
    assert keys.tenants() == "p:tenants"
    assert keys.tenant("acme") == "p:t:acme"
    assert keys.tenant_keys("acme") == "p:t:acme:keys"
    assert keys.api_key("d1") == "p:key:d1"
    assert keys.tokens_per_minute("acme", 125.0) == "p:t:acme:tpm:2"  # minute 2 of the epoch
    assert keys.tokens_reserved("acme") == "p:t:acme:tpr"
    assert keys.request_bucket("acme") == "p:t:acme:rps"
    head, tail = keys.replica_owned_affixes()
    assert head + "r1" + tail == keys.replica_owned("r1")


async def test_every_key_a_lifecycle_writes_is_built_by_keys_and_delete_leaves_none(store):
    from sinkserve.store import LoadReport

    keys = store.keys
    started = time.time()
    tenant, _ = await store.tenants.create("acme")
    sid = (await store.sessions.create_session("acme", max_sessions=10)).session_id
    await store.ownership.claim(sid, 0, "replica-a", 10_000)
    record = TurnRecord("req-1", "hi", "eos", 1, 1, "replica-a")
    await store.sessions.append_transcript(sid, "replica-a", 1, [1, 2], count_turn=True, tenant="acme", charge_tokens=2,
                                           turn=record)
    await store.sessions.try_lock_turn(sid, "turn", 10_000)
    assert (await store.tenants.reserve_tokens("acme", "turn", 10, 1000, 10_000)).granted
    assert await store.tenants.take_request(tenant) is None
    await store.replicas.report_load(LoadReport("replica-a"), ttl_ms=10_000)
    counters = {keys.tokens_per_minute("acme", t) for t in (started, time.time())}
    digests = {d.decode() for d in await store.redis.smembers(keys.tenant_keys("acme"))}

    written = {name.decode() async for name in store.redis.scan_iter(match=f"{keys.prefix}*")}
    built = {
        keys.tenants(), keys.tenant("acme"), keys.tenant_keys("acme"), *map(keys.api_key, digests),
        keys.session(sid), keys.transcript(sid), keys.lease(sid), keys.busy(sid), keys.tenant_sessions("acme"),
        keys.recent_turns(sid), keys.tokens_reserved("acme"), keys.request_bucket("acme"),
        keys.replica_owned("replica-a"), keys.replica_report("replica-a"),
    }  # fmt: skip
    assert len(digests) == 1
    assert written - counters == built and written & counters

    await store.sessions.delete_session(sid, "acme")
    await store.tenants.delete("acme")
    left = {name.decode() async for name in store.redis.scan_iter(match=f"{keys.prefix}*")}
    assert left - counters == {keys.replica_report("replica-a")}  # the report lapses; the counter expires


def test_the_pattern_catches_hand_built_keys():
    for line in (
        'f"{self.prefix}:s:{sid}"',
        "f'{prefix}:r:*'",
        'f"{self._tenant(name)}:keys"',
        'key.endswith(b":sessions")',
        'redis.sadd(f"{self.prefix}:tenants", name)',
    ):
        assert HAND_BUILT.search(line), line
    assert HAND_BUILT_LUA.search("ARGV[4] .. ':r:' .. owner")
    assert not HAND_BUILT_LUA.search("epoch .. '|' .. ARGV[2]")


def test_no_key_is_built_outside_keys_module():
    offenders = []
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*")):
            if path.suffix not in {".py", ".lua", ".sh"} or path in (KEYS_MODULE, Path(__file__).resolve()):
                continue
            if ".venv" in path.parts or "__pycache__" in path.parts:
                continue
            lua = path.suffix == ".lua"
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if HAND_BUILT.search(line) or (lua and HAND_BUILT_LUA.search(line)):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "build Redis keys with sinkserve.store.keys.Keys:\n" + "\n".join(offenders)
