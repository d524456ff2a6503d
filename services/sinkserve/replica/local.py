"""A local Ray cluster on 127.0.0.1 with the replica app deployed (for `sinkserve up` and the tests)."""

from __future__ import annotations

import logging
import os
import secrets
import time

from sinkserve.config import Settings


def start_local_ray(settings: Settings, num_cpus: int | None = None, token_auth: bool = True) -> dict[str, str]:
    """Start a private Ray head bound to 127.0.0.1: no dashboard, no usage stats, token auth on.

    Returns the environment variables another process needs to join it (RAY_ADDRESS, auth token).
    """
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    if token_auth:
        # A fresh token per local cluster, handed to the processes we start through their environment.
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.environ["RAY_AUTH_TOKEN"])
        # Ray caches its config when first imported; re-read it so this process sees token mode too
        # (what Ray's own `_enable_token_auth` does).
        from ray._raylet import Config

        Config.initialize("")
    # Ray turns a 127.0.0.1 node address into the machine's routable IP (and its servers then listen on
    # every interface) unless it runs in its single-machine mode, the one it uses on macOS and Windows.
    # That mode keeps the node IP, and every listening socket, on loopback.
    import ray._private.ray_constants as ray_constants

    if settings.ray.host in ("127.0.0.1", "localhost"):
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
    context = ray.init(
        address="local",  # always a new cluster, even with RAY_ADDRESS set in the environment
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address=settings.ray.host,
        _metrics_export_port=settings.ray.metrics_export_port,
        namespace=settings.ray.namespace,
        logging_level=logging.WARNING,
        log_to_driver=False,
        configure_logging=True,
    )
    env["RAY_ADDRESS"] = context.address_info["gcs_address"]
    node_ips = {node["NodeManagerAddress"] for node in ray.nodes()}
    if settings.ray.host in ("127.0.0.1", "localhost") and node_ips != {"127.0.0.1"}:
        ray.shutdown()
        raise RuntimeError(f"local Ray came up on {sorted(node_ips)}, not on 127.0.0.1 only")
    return env


def deploy(settings: Settings, timeout_s: float = 600) -> None:
    """Deploy (or update) the replica app on the connected cluster and wait until every replica is up."""
    from ray import serve

    from sinkserve.replica.app import build_app, settings_args

    # No HTTP proxy: clients come in through the gRPC gateway, which holds a DeploymentHandle.
    serve.start(http_options={"host": settings.ray.host, "location": "NoServer"})
    serve.run(
        build_app(settings_args(settings)),
        name=settings.ray.app_name,
        route_prefix=None,
        blocking=False,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(settings.ray.app_name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"Serve app {settings.ray.app_name} is {status.status}: {status.message}")
        time.sleep(0.5)
    raise TimeoutError(f"Serve app {settings.ray.app_name} not running after {timeout_s}s")
