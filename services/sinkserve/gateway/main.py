"""Run a gateway as a Ray driver against an existing Ray cluster and Redis (`sinkserve gateway`)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Sequence

from sinkserve.config import Settings
from sinkserve.gateway.backend import ServeBackend
from sinkserve.gateway.server import FrontEnd, Gateway

logger = logging.getLogger("sinkserve.gateway")


def connect_ray(settings: Settings) -> None:
    """Join the Ray cluster as a driver (address from RayConfig, else RAY_ADDRESS)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = settings.ray.address or os.environ.get("RAY_ADDRESS") or "auto"
    ray.init(
        address=address,
        namespace=settings.ray.namespace,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )


async def serve_forever(settings: Settings, ready: "asyncio.Future[int] | None" = None,
                        frontends: Sequence[FrontEnd] = ()) -> None:
    """Serve until SIGINT/SIGTERM. `frontends`: other protocols on the same gateway logic (the CLI passes the
    HTTP API, which this layer does not import)."""
    backend = ServeBackend.connect(settings.ray.app_name)
    gateway = Gateway(settings, backend, frontends)
    port = await gateway.start()
    if ready is not None and not ready.done():
        ready.set_result(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            pass
    try:
        await stop.wait()
    finally:
        await gateway.stop()


def run(settings: Settings, frontends: Sequence[FrontEnd] = ()) -> None:
    connect_ray(settings)
    asyncio.run(serve_forever(settings, frontends=frontends))
