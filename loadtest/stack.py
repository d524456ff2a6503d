"""The local stack a load run talks to, and the replica-memory sampler.

``LocalStack`` starts a private redis-server (durable and supervised as ``sinkserve up`` runs its own: an
append-only file in the run's temporary directory, a generated password, restarted when it dies, so a fault
schedule can kill it) and ``sinkserve up`` (local Ray on 127.0.0.1, the Serve app,
the gRPC gateway, and its HTTP API for HTTP users) as child processes, creates a tenant, and stops exactly what it started. The stack
process gets its own process group and a private SINKSERVE_CACHE_DIR, so neither a stray Ray worker nor
``up``'s saved client defaults outlive the run.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from sinkserve.store import LoadReport

TINY_LAYERS, TINY_HIDDEN = 2, 64


@dataclass
class ModelPreset:
    key: str  # what --model takes
    description: str  # how the report names it
    checkpoint: Path


def prepare_model(key: str, work_dir: Path, dtype: str = "float32", weights: str = "dense") -> ModelPreset:
    """'tiny': a random-weight Llama checkpoint (SmolLM2's tokenizer) for load without real language;
    'smollm2': the bundled SmolLM2-135M-Instruct, converted once into SINKSERVE_CACHE_DIR. The description
    names the dtype and weight format the stack runs it with."""
    numerics = f"{dtype}, {weights} weights"
    if key == "tiny":
        from sinkserve.engine.testing import make_tiny_checkpoint

        path = make_tiny_checkpoint(work_dir / "tiny-llama", arch="llama", layers=TINY_LAYERS, hidden=TINY_HIDDEN)
        return ModelPreset(
            key,
            f"tiny random-weight Llama (sinkserve.engine.testing.make_tiny_checkpoint: {TINY_LAYERS} layers, "
            f"hidden {TINY_HIDDEN}, SmolLM2 tokenizer; {numerics}); replies are random tokens, not language",
            path,
        )
    if key == "smollm2":
        from sinkserve.engine.weights import prepare_bundled_model

        return ModelPreset(key, f"SmolLM2-135M-Instruct (bundled; {numerics})", prepare_bundled_model(progress=False))
    raise ValueError(f"unknown model preset {key!r}: use 'tiny' or 'smollm2'")


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """The CPU's model name, its logical CPUs, which vector/matrix extensions it has and torch's kernel level."""
    from sinkserve.engine.capability import CpuFeatures

    return CpuFeatures.detect(cpuinfo).as_dict()


def describe_cpu(info: dict) -> str:
    flags = ", ".join(info["flags"]) or "none of AVX2/AVX512/AMX"
    return f"{info['model']}, {info['cpus']} logical CPUs, flags: {flags}"


def process_threads(pid: int) -> int | None:
    """The torch/OpenMP thread count a (Ray worker) process was started with: OMP_NUM_THREADS from its
    environment (Ray sets it to the actor's num_cpus), or None when unset or unreadable."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"OMP_NUM_THREADS="):
            try:
                return int(item.split(b"=", 1)[1])
            except ValueError:
                return None
    return None


def free_port() -> int:
    from sinkserve.store.redis_server import free_port as _free_port

    return _free_port("127.0.0.1")


def wait_serving(address: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    """Poll the gateway's gRPC health service until SERVING; fail early if the stack process died."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
                raise RuntimeError(f"`sinkserve up` exited with {process.returncode}:\n{tail}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(1)
    raise TimeoutError(f"the gateway on {address} was not SERVING after {timeout_s:.0f}s (log: {log_path})")


def wait_http_ready(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    """Poll the HTTP API's /readyz until it answers 200 (it starts just after the gRPC server)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the stack exited with {process.returncode} (log: {log_path})")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"the HTTP API on {url} was not ready after {timeout_s:.0f}s (log: {log_path})")


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """{thread id: (name, CPU seconds so far)} of a local process, from /proc (empty when unreadable)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / tick)  # utime + stime
    return out


def busy_threads(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], wall_s: float,
                 floor: float = 0.05) -> list[dict]:
    """Threads that used more than `floor` of a CPU between two thread_cpu() snapshots, busiest first."""
    rows = []
    for tid, (name, cpu) in after.items():
        used = cpu - before.get(tid, (name, 0.0))[1]
        if wall_s > 0 and used / wall_s > floor:
            rows.append({"tid": tid, "name": name, "cpu_share": round(used / wall_s, 3)})
    return sorted(rows, key=lambda r: -r["cpu_share"])


@dataclass
class LocalStack:
    model: ModelPreset
    replicas: int
    slots: int  # KV slab slots per replica
    sinks: int
    window: int
    log_path: Path
    max_ongoing_requests: int = 1024
    dtype: str = "float32"
    weights: str = "dense"
    replica_cpus: float = 1.0
    http: bool = False  # start the gateway's HTTP API too (for the HTTP users), on a free port
    key_prefix: str = "loadtest"
    start_timeout_s: float = 900
    address: str = ""
    http_url: str = ""
    redis_url: str = ""
    redis_password: str = ""
    api_key: str = ""
    _redis: object = None
    _process: subprocess.Popen | None = None
    _tmp: tempfile.TemporaryDirectory | None = None
    _env: dict = field(default_factory=dict)

    def start(self, tenant_sessions: int) -> "LocalStack":
        import secrets

        from sinkserve.store.redis_server import RedisServer

        self._tmp = tempfile.TemporaryDirectory(prefix="sinkserve-loadtest-")
        try:
            self.redis_password = secrets.token_hex(16)
            self._redis = RedisServer(
                host="127.0.0.1", password=self.redis_password, data_dir=Path(self._tmp.name) / "redis"
            ).start()
            self.redis_url = self._redis.url
            port = free_port()
            self.address = f"127.0.0.1:{port}"
            http_port = free_port() if self.http else 0
            self.http_url = f"http://127.0.0.1:{http_port}" if self.http else ""
            inherited = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join another cluster
            self._env = {
                **inherited,
                "RAY_USAGE_STATS_ENABLED": "0",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                # `up` saves its address as the user's client default: keep that out of the real cache dir.
                "SINKSERVE_CACHE_DIR": self._tmp.name,
                "SINKSERVE_REDIS__KEY_PREFIX": self.key_prefix,
                "SINKSERVE_REDIS__PASSWORD": self.redis_password,
                "SINKSERVE_REPLICA__MAX_ONGOING_REQUESTS": str(self.max_ongoing_requests),
                "SINKSERVE_ENGINE__DEVICE": "cpu",
            }
            command = [
                sys.executable, "-m", "sinkserve.cli", "up",
                "--replicas", str(self.replicas),
                "--replica-cpus", f"{self.replica_cpus:g}",
                "--port", str(port),
                # a free port, not 8000 (a busy 8000 or a second stack must not stop it); 0 = off for gRPC users
                "--http-port", str(http_port),
                "--model", str(self.model.checkpoint),
                "--slots", str(self.slots),
                "--sinks", str(self.sinks),
                "--window", str(self.window),
                "--dtype", self.dtype,
                "--weights", self.weights,
                "--redis-url", self.redis_url,
            ]  # fmt: skip
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = self.log_path.open("wb")
            # Own process group: if `up` has to be killed, its Ray processes go with it (see stop()).
            self._process = subprocess.Popen(
                command, env=self._env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            log.close()
            wait_serving(self.address, self._process, self.log_path, self.start_timeout_s)
            if self.http:
                wait_http_ready(self.http_url, self._process, self.log_path, 60)
            self.api_key = self._create_tenant(tenant_sessions)
            return self
        except BaseException:
            self.stop()
            raise

    def _create_tenant(self, max_sessions: int) -> str:
        result = subprocess.run(
            [
                sys.executable, "-m", "sinkserve.cli", "tenant", "create", "loadtest",
                "--redis-url", self.redis_url, "--no-save",
                "--max-sessions", str(max_sessions),
                # the load test measures the engine, not the quotas
                "--tokens-per-minute", str(10**9), "--requests-per-second", str(10**6), "--request-burst", str(10**6),
            ],  # fmt: skip
            env=self._env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(f"tenant create failed: {result.stderr.strip()}")
        return result.stdout.strip().splitlines()[-1]

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def redis_pid(self) -> int | None:
        """The redis-server running now (its supervisor replaces the process after a kill)."""
        return self._redis.pid if self._redis is not None else None

    def redis_ping(self) -> bool:
        import redis

        try:
            client = self._redis.client(socket_timeout=1)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except (redis.RedisError, AttributeError):
            return False

    def stop(self) -> None:
        if self._process is not None:
            process, self._process = self._process, None
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # `up` shuts Serve and Ray down on SIGTERM
                try:
                    process.wait(90)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            # Anything still in the group we created (a Ray worker that outlived its raylet) goes too.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._redis is not None:
            self._redis.stop()
            self._redis = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "LocalStack":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class MemorySampler(threading.Thread):
    """Every ``period_s``: each replica's load report from Redis (sessions, free slots, rebuilt, ...) and
    the RSS of its process (the report carries the pid; only meaningful when the replicas run here)."""

    # The load report's own fields, plus when, the replica process's RSS and this machine's load average (to
    # tell a slow stack from a busy machine).
    FIELDS = ("unix_s", "rss_mb", "loadavg_1m") + tuple(f.name for f in dataclasses.fields(LoadReport))

    def __init__(self, redis_url: str, key_prefix: str, out_csv: Path, period_s: float = 2.0, local: bool = True,
                 password: str | None = None):
        super().__init__(name="replica-memory-sampler", daemon=True)
        self.redis_url = redis_url
        self.key_prefix = key_prefix
        self.out_csv = out_csv
        self.period_s = period_s
        self.local = local
        self.password = password or None
        self.rows: list[dict] = []
        self.threads: dict[int, list] = {}  # replica pid -> [(t, first snapshot), (t, latest snapshot)]
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil
        import redis

        from sinkserve.store.keys import Keys

        client = redis.Redis.from_url(self.redis_url, password=self.password, socket_timeout=5)
        try:
            while not self._halt.is_set():
                try:
                    self._sample(client, psutil, Keys(self.key_prefix))
                except redis.RedisError:
                    pass  # the stack is stopping, or a blip: the next sample will tell
                self._halt.wait(self.period_s)
        finally:
            client.close()

    def _sample(self, client, psutil, keys) -> None:
        now = round(time.time(), 1)
        load_1m = round(os.getloadavg()[0], 2)
        # The report pattern also matches the replicas' owned-session sets: skip those.
        for key in client.scan_iter(match=keys.replica_report("*"), count=100):
            if fnmatch.fnmatchcase(key.decode(), keys.replica_owned("*")):
                continue
            raw = client.get(key)
            if not raw:
                continue
            report = json.loads(raw)
            pid = report.get("pid")
            rss_mb = None
            if self.local and pid:
                try:
                    rss_mb = psutil.Process(int(pid)).memory_info().rss / 2**20
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
                snapshot = thread_cpu(int(pid))
                if snapshot:
                    seen = self.threads.setdefault(int(pid), [(time.monotonic(), snapshot)])
                    seen[1:] = [(time.monotonic(), snapshot)]
            self.rows.append(
                {
                    "unix_s": now,
                    "rss_mb": None if rss_mb is None else round(rss_mb, 1),
                    "loadavg_1m": load_1m,
                    **{name: report.get(name) for name in self.FIELDS if name in report},
                }
            )

    def busy_threads(self) -> dict[str, list[dict]]:
        """{replica pid: its threads busier than 5% of a CPU over the sampled span} (local replicas)."""
        out = {}
        for pid, seen in self.threads.items():
            if len(seen) == 2:
                (t0, first), (t1, last) = seen
                out[str(pid)] = busy_threads(first, last, t1 - t0)
        return out

    def stop(self) -> list[dict]:
        self._halt.set()
        self.join(10)
        self.out_csv.parent.mkdir(parents=True, exist_ok=True)
        with self.out_csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.FIELDS)
            writer.writeheader()
            writer.writerows(self.rows)
        return self.rows
