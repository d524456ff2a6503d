"""The Redis connection and the wire format of what the store writes into it."""

from __future__ import annotations

import array
import sys
import time

import redis.asyncio as aioredis

from sinkserve.config import RedisConfig


def connect(cfg: RedisConfig) -> aioredis.Redis:
    """An asyncio Redis client bound to the running event loop (create one per loop).

    The pool blocks (up to the socket timeout) when every connection is busy instead of failing at once:
    a burst of a thousand turns must queue for a connection, not turn into UNAVAILABLE."""
    pool = aioredis.BlockingConnectionPool.from_url(
        cfg.url,
        password=cfg.password.get_secret_value() if cfg.password else None,
        socket_timeout=cfg.socket_timeout_s,
        socket_connect_timeout=cfg.socket_timeout_s,
        decode_responses=False,
        max_connections=cfg.max_connections,
        timeout=cfg.socket_timeout_s,
    )
    return aioredis.Redis(connection_pool=pool, auto_close_connection_pool=True)


def pack_tokens(token_ids: list[int]) -> bytes:
    data = array.array("i", token_ids)
    if sys.byteorder != "little":  # the log is little-endian whatever host wrote it
        data.byteswap()
    return data.tobytes()


def unpack_tokens(blob: bytes) -> list[int]:
    data = array.array("i")
    data.frombytes(blob)
    if sys.byteorder != "little":
        data.byteswap()
    return data.tolist()


def now_ms() -> int:
    """Wall-clock milliseconds: the timestamps stored in records and reports."""
    return int(time.time() * 1000)
