"""The HTTP front end as the gateway runs it: uvicorn serving ``HttpApi`` on the gateway's event loop.

``Gateway(settings, backend, frontends=[HttpFrontEnd(settings)])`` starts it after the gRPC server, on
``gateway.host:gateway.http_port``, and stops it first. Uvicorn's signal handling is off: the gateway process
owns SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

from sinkserve.config import Settings
from sinkserve.gateway.core import GatewayCore
from sinkserve.http.app import HttpApi

logger = logging.getLogger("sinkserve.http")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the gateway process handles signals
        yield


class HttpFrontEnd:
    def __init__(self, settings: Settings, port: int | None = None):
        self.host = settings.gateway.host
        self.requested_port = settings.gateway.http_port if port is None else port
        self.port: int | None = None
        self.api: HttpApi | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self, core: GatewayCore) -> None:
        self.api = HttpApi(core)
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError as err:
            sock.close()
            raise OSError(f"cannot bind the HTTP API to {self.host}:{self.requested_port}: {err.strerror} "
                          "(--http-port changes it; 0 turns it off)") from None
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.api.app(), log_level="warning", lifespan="off", access_log=False,
                                timeout_graceful_shutdown=2)
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the HTTP API stopped while starting")
            await asyncio.sleep(0.02)
        logger.info("HTTP API listening on %s", self.url)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.wait({self._task}, timeout=5)
            if not self._task.done():
                self._server.force_exit = True
                self._task.cancel()
