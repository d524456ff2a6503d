"""Shared fixtures: a real redis-server, a real local Ray with the Serve app (tiny model), and a gateway.

Everything is started once per test session, on 127.0.0.1, and stopped at the end (only what we started).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from sinkserve.config import Settings
from sinkserve.store import Store
from sinkserve.store.redis_server import RedisServer, free_port

SINKS, WINDOW = 4, 28
REPLICAS = 2


class LoopThread:
    """An asyncio loop in a daemon thread, for the in-process gateway and Redis helpers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-gateway-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class Stack:
    settings: Settings
    redis: RedisServer
    ray_env: dict[str, str]
    loop: LoopThread
    gateway: Any
    address: str
    http_url: str = ""  # the gateway's OpenAI-compatible HTTP API

    def tenant(self, name: str, **quotas: Any) -> str:
        """Create a tenant; returns its API key."""
        _, key = self.loop.run(self.store.tenants.create(name, **quotas))
        return key

    @property
    def store(self) -> Store:
        """The gateway's store (run its coroutines with ``loop.run``)."""
        return self.gateway.store


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from sinkserve.engine.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), arch="llama")


@pytest.fixture(scope="session")
def redis_server():
    with RedisServer() as server:
        yield server


def stack_settings(checkpoint: Path, redis_url: str, **overrides: Any) -> Settings:
    return Settings(
        engine={
            "model": str(checkpoint),
            "sinks": SINKS,
            "window": WINDOW,
            "slots": 16,
            "device": "cpu",
            "dtype": "float32",
            "num_threads": 1,
            "prefill_chunk": 64,
        },
        replica={
            "num_replicas": REPLICAS,
            "num_cpus": 0.5,
            "load_report_interval_s": 0.5,
            "health_check_period_s": 2,
            "graceful_shutdown_timeout_s": 2,
        },
        router={"lease_ttl_s": 10},
        redis={"url": redis_url, "key_prefix": "it"},
        gateway={"host": "127.0.0.1", "port": 0, "http_port": 0, "max_message_bytes": 2048, "max_new_tokens": 100_000},
        **overrides,
    )


@pytest.fixture(scope="session")
def stack(tiny_checkpoint, redis_server):
    import ray
    from ray import serve

    from sinkserve.gateway.backend import ServeBackend
    from sinkserve.gateway.server import Gateway
    from sinkserve.http.server import HttpFrontEnd
    from sinkserve.replica.local import deploy, start_local_ray

    import socket

    with socket.socket() as probe:  # a free loopback port for Ray's Prometheus endpoint
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    settings = stack_settings(tiny_checkpoint, redis_server.url, ray={"metrics_export_port": metrics_port})
    ray_env = start_local_ray(settings, num_cpus=4)
    loop = LoopThread()
    try:
        deploy(settings)
        http = HttpFrontEnd(settings, port=0)  # a free port (http_port 0 in the settings: off elsewhere)
        gateway = Gateway(settings, ServeBackend.connect(settings.ray.app_name), frontends=[http])
        port = loop.run(gateway.start())
        yield Stack(settings, redis_server, ray_env, loop, gateway, f"127.0.0.1:{port}", http.url)
        loop.run(gateway.stop(grace_s=1))
    finally:
        loop.stop()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture
def client_factory(stack):
    from sinkserve.client import SinkServeClient

    clients = []

    def make(api_key: str | None, address: str | None = None) -> SinkServeClient:
        client = SinkServeClient(address or stack.address, api_key)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def start_gateway_process(stack: Stack, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A second gateway, in its own process (`sinkserve gateway`), joined to the same Ray and Redis."""
    port = port or free_port()
    env = {
        **os.environ,
        **stack.ray_env,
        "SINKSERVE_REDIS__URL": stack.settings.redis.url,
        "SINKSERVE_REDIS__KEY_PREFIX": stack.settings.redis.key_prefix,
        "SINKSERVE_GATEWAY__HOST": "127.0.0.1",
        "SINKSERVE_GATEWAY__PORT": str(port),
        "SINKSERVE_GATEWAY__HTTP_PORT": "0",
        "SINKSERVE_GATEWAY__MAX_MESSAGE_BYTES": str(stack.settings.gateway.max_message_bytes),
        "SINKSERVE_GATEWAY__MAX_NEW_TOKENS": str(stack.settings.gateway.max_new_tokens),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "sinkserve.cli", "gateway"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    address = f"127.0.0.1:{port}"
    wait_serving(address, process)
    return process, address


def wait_serving(address: str, process: subprocess.Popen | None = None, timeout_s: float = 120) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                err = process.stderr.read().decode(errors="replace") if process.stderr else ""
                raise RuntimeError(f"gateway process exited with {process.returncode}:\n{err[-3000:]}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise TimeoutError(f"no SERVING gateway on {address} after {timeout_s}s")


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
