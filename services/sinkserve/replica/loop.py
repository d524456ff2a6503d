"""The continuous-batching loop: one thread owns the engine and runs every forward step.

The engine is not thread-safe, so nothing else touches it: callers hand the loop small functions
(``call``) that run on the engine thread between two steps, and receive their session's TokenOutputs on
an asyncio queue they subscribed with. Between steps the loop first runs the queued calls (so a new
turn joins the very next batched step), then one ``engine.step()`` if any session has work, and blocks
on the call queue when idle.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any, Callable

logger = logging.getLogger("sinkserve.replica")

_STOP = object()


class LoopDead(RuntimeError):
    pass


class EngineLoop:
    def __init__(self, engine: Any, idle_wait_s: float = 0.5):
        self.engine = engine
        self._calls: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._subscribers: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._idle_wait_s = idle_wait_s
        self._thread = threading.Thread(target=self._run, name="sinkserve-engine-loop", daemon=True)
        self.error: BaseException | None = None
        self.steps = 0
        self.last_beat = time.monotonic()

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10) -> None:
        self._calls.put(_STOP)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def active_turns(self) -> int:
        return len(self._subscribers)

    @property
    def pending_calls(self) -> int:
        return self._calls.qsize()

    # ---- API used from asyncio code (any thread)
    def call(self, fn: Callable[[Any], Any]) -> "asyncio.Future[Any]":
        """Run ``fn(engine)`` on the engine thread between steps; await the returned future for its result."""
        if not self.alive:
            raise LoopDead(f"engine loop is not running: {self.error!r}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._calls.put((fn, loop, future))
        return future

    def subscribe(self, session_id: str, loop: asyncio.AbstractEventLoop, out_queue: asyncio.Queue) -> None:
        """Only from inside a ``call``: route the session's TokenOutputs to ``out_queue`` until its final one."""
        self._subscribers[session_id] = (loop, out_queue)

    def unsubscribe(self, session_id: str, reason: BaseException | None = None) -> None:
        """Stop routing the session's outputs; with a ``reason``, its waiting stream gets that error."""
        entry = self._subscribers.pop(session_id, None)
        if entry is not None and reason is not None:
            loop, out_queue = entry
            loop.call_soon_threadsafe(out_queue.put_nowait, reason)

    # ---- engine thread
    def _run(self) -> None:
        try:
            while True:
                if not self._drain_calls(block=not self.engine.has_work()):
                    return
                if self.engine.has_work():
                    outputs = self.engine.step()
                    self.steps += 1
                    for out in outputs:
                        self._deliver(out)
                self.last_beat = time.monotonic()
        except BaseException as err:  # noqa: BLE001 - a dead loop must fail every waiter, whatever killed it
            logger.exception("engine loop died")
            self.error = err
            for session_id in list(self._subscribers):
                loop, out_queue = self._subscribers.pop(session_id)
                loop.call_soon_threadsafe(out_queue.put_nowait, LoopDead(f"engine loop died: {err!r}"))
            self._fail_pending(err)

    def _drain_calls(self, block: bool) -> bool:
        """Run queued calls; False when asked to stop."""
        try:
            item = self._calls.get(timeout=self._idle_wait_s) if block else self._calls.get_nowait()
        except queue.Empty:
            return True
        while True:
            if item is _STOP:
                self._fail_pending(LoopDead("engine loop stopped"))
                return False
            fn, loop, future = item
            try:
                result = fn(self.engine)
            except Exception as err:  # noqa: BLE001 - the caller gets the error
                loop.call_soon_threadsafe(_set_exception, future, err)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return True

    def _deliver(self, out: Any) -> None:
        entry = self._subscribers.get(out.session_id)
        if entry is None:
            return
        if out.finished:
            del self._subscribers[out.session_id]
        loop, out_queue = entry
        loop.call_soon_threadsafe(out_queue.put_nowait, out)

    def _fail_pending(self, err: BaseException) -> None:
        while True:
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                _, loop, future = item
                loop.call_soon_threadsafe(_set_exception, future, LoopDead(str(err)))


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, err: BaseException) -> None:
    if not future.done():
        future.set_exception(err)
