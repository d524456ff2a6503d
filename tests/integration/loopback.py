"""Every listening socket of a local stack's processes, and the check that they are on loopback only.

Ray cannot bind one kind of socket to loopback: each Ray Serve replica starts its inter-deployment gRPC server
on ``[::]:0`` (every interface, IPv4 and IPv6), hard-coded in ``ray/serve/_private/replica.py``
(``add_port_to_grpc_server(self._server, "[::]:0")``) with no setting to change it (ray-project/ray#64544).
It is the one documented exception (README, "What listens where"): one per replica process, named
``ray::ServeReplica:<app>:<deployment>``, and it refuses callers without the cluster's Ray auth token.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import psutil

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
WILDCARD = {"0.0.0.0", "::"}
REPLICA_PROCESS = "ray::ServeReplica:"


@dataclass(frozen=True)
class Listener:
    pid: int
    process: str  # the process title (Ray workers name themselves "ray::<Actor>...")
    ip: str
    port: int


def process_tree(root_pid: int | None = None) -> list[psutil.Process]:
    """The process and all its descendants (Ray's gcs, raylet and workers are descendants of the driver)."""
    root = psutil.Process(root_pid or os.getpid())
    return [root, *root.children(recursive=True)]


def listeners(root_pid: int | None = None) -> list[Listener]:
    found = []
    for proc in process_tree(root_pid):
        try:
            title = " ".join(proc.cmdline()) or proc.name()
            connections = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # exited while we looked
        for conn in connections:
            if conn.status == psutil.CONN_LISTEN:
                found.append(Listener(proc.pid, title, conn.laddr.ip, conn.laddr.port))
    return found


def off_loopback(found: list[Listener]) -> tuple[list[Listener], list[Listener]]:
    """(the replica gRPC servers Ray binds to every interface, anything else not on loopback)."""
    replica_wildcards = [s for s in found if s.process.startswith(REPLICA_PROCESS) and s.ip in WILDCARD]
    others = [s for s in found if s.ip not in LOOPBACK and s not in replica_wildcards]
    return replica_wildcards, others


def assert_loopback_only(root_pid: int | None, replicas: int, app_name: str, wait_s: float = 60) -> list[Listener]:
    """Every listening socket of the tree is on loopback, except exactly one all-interfaces gRPC server per Serve
    replica (`replicas` of them; a replica another test killed may take a while to come back), each of which
    answers an unauthenticated call with UNAUTHENTICATED. Returns those exceptions."""
    import grpc

    for _ in range(max(1, int(wait_s))):  # polled once a second: a replacement replica may still be starting
        found = listeners(root_pid)
        assert found, "no listening sockets found: wrong process tree?"
        exceptions, others = off_loopback(found)
        assert others == [], f"listening beyond loopback: {others}"
        for socket in exceptions:
            assert socket.process.startswith(f"{REPLICA_PROCESS}{app_name}:"), socket
        assert len({s.pid for s in exceptions}) == len(exceptions), f"one such socket per replica: {exceptions}"
        if len(exceptions) == replicas:
            break
        time.sleep(1)
    assert len(exceptions) == replicas, f"expected {replicas} replica gRPC servers, found {exceptions}"
    for socket in exceptions:
        with grpc.insecure_channel(f"127.0.0.1:{socket.port}") as channel:
            call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
            try:
                call(b"", timeout=10)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (socket, err.code(), err.details())
            else:  # pragma: no cover - a real failure
                raise AssertionError(f"{socket} answered without the Ray auth token")
    return exceptions
