"""Serving commands of the `sinkserve` CLI: up, gateway, tenant (`chat` and `session` are in cli_chat).

`tenant` loads neither torch nor Ray; `up` and `gateway` import Ray when they run.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import signal
from pathlib import Path
from typing import Optional

import typer

from sinkserve.cli_flags import ConfigError, ConfigFlags, GivenFlags
from sinkserve.client import defaults_file, load_defaults, save_defaults

tenant_app = typer.Typer(help="Tenants and their API keys (in the stack's Redis).", no_args_is_help=True)


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _settings(flags: Optional[GivenFlags] = None, **sections):
    """Settings: defaults, then SINKSERVE_* env, then `sections` (the flags given, what the command fixes).
    A refused value exits 2, named by its flag when a flag set it, else by its config path."""
    from sinkserve.config import Settings

    try:
        return (flags or GivenFlags(ConfigFlags(), {})).build(lambda: Settings(**sections))
    except ConfigError as err:
        _fail(str(err))


def _redis_url(flag: Optional[str]) -> str:
    # Flag, then the environment (SINKSERVE_REDIS__URL), then what `sinkserve up` saved, then the default.
    return flag or os.environ.get("SINKSERVE_REDIS__URL") or load_defaults().get("redis_url") or "redis://127.0.0.1:6379/0"


def _local_redis_password() -> str:
    """The password of the redis-server `up` starts: generated on the first `up`, saved with the client defaults
    (mode 0600), the same on every later `up` (so what `sinkserve tenant` saved keeps working)."""
    saved = load_defaults().get("local_redis_password")
    if saved:
        return saved
    password = secrets.token_urlsafe(32)
    save_defaults(local_redis_password=password)
    return password


def _redis_password(url: str, configured: Optional[str]) -> Optional[str]:
    """The password for `url`: the local stack's saved one when `url` is the redis-server `up` last started,
    else the configured one (SINKSERVE_REDIS__PASSWORD)."""
    saved = load_defaults()
    if saved.get("local_redis_password") and url == saved.get("local_redis_url"):
        return saved["local_redis_password"]
    return configured


# ---------------------------------------------------------------------------------------------- up
# `up` takes every engine field as a flag, the replica count and size, and the gateway port (all from the config).
UP_FLAGS = (
    ConfigFlags.of("replica", (("num_replicas", "--replicas", "-n"), ("num_cpus", "--replica-cpus"),
                               ("tensor_parallel", "--tensor-parallel")))
    + ConfigFlags.of("gateway", ("port", "http_port"))
    + ConfigFlags.of("engine")
)


def up_settings(flags: GivenFlags, redis_url: Optional[str] = None):
    """The config `up` runs with: defaults, then SINKSERVE_* env, then every flag given (0 included); Ray and
    the gateway on 127.0.0.1 only. Exits 2 naming the flag when a value is refused."""
    if redis_url is not None and not redis_url.strip():
        _fail("--redis-url: must not be empty (leave it out to start a redis-server)")
    settings = _settings(
        flags,
        engine=flags.section("engine"),
        replica=flags.section("replica"),
        gateway={**flags.section("gateway"), "host": "127.0.0.1"},
        ray={"address": None, "host": "127.0.0.1"},
        redis={"url": redis_url} if redis_url is not None else {},
    )
    if settings.engine.num_threads is None:
        # Replicas (and their shards) share this machine's cores: split them instead of each using all of them.
        processes = settings.replica.num_replicas * settings.replica.tensor_parallel
        settings.engine.num_threads = max(1, (os.cpu_count() or 1) // processes)
    return settings


def ray_cpus_needed(settings) -> float:
    """CPUs Ray must have for every replica: one bundle of replica.num_cpus per shard."""
    return settings.replica.num_replicas * settings.replica.tensor_parallel * settings.replica.num_cpus


def tensor_parallel_problem(settings, ray_cpus: float | None) -> str:
    """Why the replicas cannot run as replica.tensor_parallel shards here ("" when they can), found before
    anything starts: the weights (shards run dense), the model (its family and the sizes its heads and FFN width
    split into), this machine's CPUs or GPUs (one each per shard), and the CPUs given to Ray (`ray_cpus`, None
    when `up` picks enough itself). Each message names the sizes that work."""
    rc, cfg = settings.replica, settings.engine
    world = rc.tensor_parallel
    if world == 1:
        return ""
    if cfg.weights not in ("auto", "dense"):
        return f"--tensor-parallel {world}: shards run dense weights; --weights {cfg.weights} needs --tensor-parallel 1"
    import json

    from sinkserve.engine import shards
    from sinkserve.engine.loader import resolve_device
    from sinkserve.engine.weights import ModelNotFoundError, resolve_checkpoint
    from sinkserve.errors import SinkServeError

    try:
        device = resolve_device(cfg.device)
        hf_config = json.loads((resolve_checkpoint(cfg.model) / "config.json").read_text())
    except ModelNotFoundError as err:
        return str(err)
    except SinkServeError as err:
        return err.message
    try:
        shards.check_start(hf_config, world, device, rc.tensor_parallel_oversubscribe)
    except SinkServeError as err:
        return f"--tensor-parallel: {err.message}"
    if device.type == "cuda" and not rc.num_gpus:
        # Ray hands a shard actor a GPU only if its bundle asks for one.
        return (f"--tensor-parallel {world} on {device}: every shard needs a GPU of its own in Ray; set "
                "SINKSERVE_REPLICA__NUM_GPUS=1 (GPUs per shard)")
    if ray_cpus is not None and ray_cpus_needed(settings) > ray_cpus:
        per_size = rc.num_replicas * rc.num_cpus
        sizes = shards.valid_sizes(shards.shardable_family(hf_config).ModelArgs.from_hf(hf_config))
        fit = [n for n in sizes if n * per_size <= ray_cpus] or ["none"]
        return (f"--tensor-parallel {world}: {rc.num_replicas} replica(s) x {world} shards x {rc.num_cpus:g} CPUs "
                f"(--replica-cpus) = {ray_cpus_needed(settings):g} CPUs, but Ray has {ray_cpus:g} (--num-cpus); "
                f"sizes that fit: {', '.join(map(str, fit))}")
    return ""


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on host:port (binding it fails). SO_REUSEADDR, so that a port left in TIME_WAIT
    by a stopped stack counts as free, as it does for the servers themselves."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def busy_ports(settings) -> list[str]:
    """The fixed ports `up` would listen on that something else holds, each with the setting that moves it.
    (redis-server and Ray's own ports are picked free at start; Ray's dashboard is off.)"""
    host = settings.gateway.host
    wanted = [(settings.gateway.port, "the gRPC gateway", "--port PORT (0 = any free port)"),
              (settings.gateway.http_port, "the HTTP API", "--http-port PORT (0 turns the HTTP API off)")]
    if settings.ray.metrics_export_port:
        wanted.append((settings.ray.metrics_export_port, "Ray's metrics endpoint",
                       "SINKSERVE_RAY__METRICS_EXPORT_PORT"))
    return [f"port {port} ({what}) on {host} is in use: {flag} changes it"
            for port, what, flag in wanted if port and port_in_use(host, port)]


def redis_unreachable(settings) -> str:
    """Why the configured Redis does not answer a PING ("" when it does)."""
    import redis

    password = settings.redis.password.get_secret_value() if settings.redis.password is not None else None
    client = redis.Redis.from_url(settings.redis.url, password=password, socket_timeout=3, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.AuthenticationError as err:
        return f"Redis refused us ({err}); SINKSERVE_REDIS__PASSWORD sets the password"
    except (redis.ConnectionError, redis.TimeoutError) as err:
        return f"cannot reach Redis ({err}); leave --redis-url out and `up` starts a redis-server of its own"
    finally:
        client.close()
    return ""


@UP_FLAGS
def up(
    num_cpus: Optional[int] = typer.Option(None, min=1, help="CPUs the local Ray may use (default: all)"),
    redis_url: Optional[str] = typer.Option(
        None, help="use this Redis instead of starting one (default: start redis-server on a free port)"
    ),
    data_dir: Optional[Path] = typer.Option(
        None,
        file_okay=False,
        help="where the redis-server `up` starts keeps tenants, API keys, sessions and transcripts (append-only "
        "file, fsynced every second; kept across restarts)",
        show_default="<cache dir>/redis: $SINKSERVE_CACHE_DIR/redis or ~/.cache/sinkserve/redis",
    ),
    *,
    flags: GivenFlags,
) -> None:
    """Start the whole stack on 127.0.0.1: redis-server, local Ray, the Serve app, the gRPC gateway.

    redis-server keeps its data in --data-dir, behind a generated password, and is restarted when it dies."""
    settings = up_settings(flags, redis_url)
    if redis_url is not None and data_dir is not None:
        _fail("--data-dir: only for the redis-server `up` starts; leave it out with --redis-url")
    problem = tensor_parallel_problem(settings, num_cpus)
    if problem:  # before anything starts, like the ports
        _fail(problem)
    busy = busy_ports(settings)
    if busy:  # before anything starts: found now, not after Ray and the replicas came up
        _fail("; ".join(busy) + " (is another `sinkserve up` running?)", 1)
    if redis_url is not None:
        problem = redis_unreachable(settings)
        if problem:
            _fail(f"--redis-url {redis_url}: {problem}", 1)
    replicas = settings.replica.num_replicas
    # SIGTERM (and SIGHUP: the terminal closed) shut down like Ctrl-C: everything this command started is stopped,
    # nothing else (redis-server runs in a session of its own and is stopped here, not by the terminal).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    from sinkserve.gateway.main import serve_forever
    from sinkserve.replica.local import deploy, start_local_ray
    from sinkserve.store.redis_server import RedisServer

    if num_cpus is None:
        # Logical CPUs for Ray's scheduler: enough that every replica (each shard's bundle) fits.
        num_cpus = max(os.cpu_count() or 1, math.ceil(ray_cpus_needed(settings)))
    redis_server = None
    ray_started = False
    try:
        if redis_url is None:
            # Durable and supervised: data in the data dir (append-only file), a password, restarted if it dies.
            password = _local_redis_password()
            redis_server = RedisServer(
                host="127.0.0.1",
                data_dir=data_dir or settings.cache_dir / "redis",
                password=password,
                on_restart=lambda pid: typer.echo(f"redis-server restarted (pid {pid})"),
            ).start()
            settings.redis.url = redis_server.url
            settings.redis.password = password
            save_defaults(local_redis_url=redis_server.url, redis_url=redis_server.url)
            typer.echo(f"redis-server  {redis_server.url} (pid {redis_server.pid}, data in {redis_server.data_dir})")
        typer.echo("starting Ray (127.0.0.1, token auth) ...")
        start_local_ray(settings, num_cpus=num_cpus)
        ray_started = True
        shards = settings.replica.tensor_parallel
        typer.echo(f"deploying {replicas} replica(s) of {settings.engine.model}"
                   + (f", {shards} tensor-parallel shards each" if shards > 1 else "") + " ...")
        deploy(settings)
        typer.echo("starting the gateway ...")
        asyncio.run(_serve(settings, serve_forever))
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError, OSError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    finally:
        typer.echo("shutting down ...")
        if ray_started:
            import ray
            from ray import serve

            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        if redis_server is not None:
            redis_server.stop()
        typer.echo("stopped.")


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def http_frontends(settings) -> list:
    """The OpenAI-compatible HTTP API beside gRPC, unless gateway.http_port is 0."""
    if not settings.gateway.http_port:
        return []
    from sinkserve.http.server import HttpFrontEnd

    return [HttpFrontEnd(settings)]


async def _serve(settings, serve_forever) -> None:
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    frontends = http_frontends(settings)
    task = asyncio.create_task(serve_forever(settings, ready, frontends))
    done, _ = await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # failed before it listened
        return
    gateway_port = ready.result()
    address = f"127.0.0.1:{gateway_port}"
    saved = save_defaults(address=address, redis_url=settings.redis.url)
    typer.secho(f"\nsinkserve is up: gRPC gateway on {address}", fg=typer.colors.GREEN)
    for frontend in frontends:
        typer.secho(f"OpenAI-compatible HTTP API on {frontend.url}/v1", fg=typer.colors.GREEN)
        typer.secho(f"web chat page on {frontend.url}/ (paste a tenant key there)", fg=typer.colors.GREEN)
    typer.echo(
        "In another terminal:\n"
        "  sinkserve tenant create demo      # prints an API key and saves it as the default\n"
        "  sinkserve chat                    # streams a conversation through the gateway\n"
        f"(address and Redis saved to {saved}; override with --address/--api-key or SINKSERVE_ADDRESS/"
        "SINKSERVE_API_KEY)\nCtrl-C stops everything."
    )
    await task


# ---------------------------------------------------------------------------------------------- gateway
@ConfigFlags.of("gateway", ("host", "port", "http_port"))
def gateway(
    ray_address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster (default: RayConfig/auto)"),
    *,
    flags: GivenFlags,
) -> None:
    """Run only the gateway (gRPC, and the HTTP API unless --http-port 0), joining an existing Ray cluster and Redis (config from SINKSERVE_* env)."""
    # An empty RAY_ADDRESS is an unset one, as for Ray itself.
    settings = _settings(flags, gateway=flags.section("gateway"), ray={"address": ray_address} if ray_address else {})
    from sinkserve.gateway.main import run

    try:
        run(settings, http_frontends(settings))
    except KeyboardInterrupt:
        pass
    except ConnectionError as err:
        # Ray's own message names its CLI's `--address`; ours is --ray-address.
        where = f"at {ray_address!r}" if ray_address else "(none given and none running here)"
        detail = str(err).splitlines()[0] if str(err) else ""
        detail = "" if "--address" in detail else f" ({detail})"
        _fail(f"cannot reach a Ray cluster {where}{detail}: pass --ray-address ADDRESS or set RAY_ADDRESS; "
              "`sinkserve up` starts a whole local stack instead", 1)


# ---------------------------------------------------------------------------------------------- tenant
def _store(redis_url: Optional[str]):
    from sinkserve.config import RedisConfig
    from sinkserve.store import Store

    base = _settings()
    url = _redis_url(redis_url)
    configured = base.redis.password.get_secret_value() if base.redis.password is not None else None
    cfg = RedisConfig(**{**base.redis.model_dump(), "url": url, "password": _redis_password(url, configured)})
    return Store.from_config(cfg, base.limits)


def _run_redis(coro_factory, redis_url: Optional[str]):
    from redis import exceptions as redis_exc

    async def main():
        store = _store(redis_url)
        try:
            return await coro_factory(store)
        finally:
            await store.close()

    try:
        return asyncio.run(main())
    except redis_exc.AuthenticationError as err:
        _fail(
            f"Redis at {_redis_url(redis_url)} did not let us in: {err} (the password of the stack `sinkserve up` "
            f"started is saved in {defaults_file()}; for another Redis set SINKSERVE_REDIS__PASSWORD)",
            1,
        )
    except (redis_exc.ConnectionError, redis_exc.TimeoutError) as err:
        _fail(f"cannot reach Redis at {_redis_url(redis_url)}: {err} (is `sinkserve up` running?)", 1)


# A tenant's quotas: each flag a LimitsConfig field (a flag not given takes the config's default, then env).
TENANT_FLAGS = ConfigFlags.of("limits")


@tenant_app.command("create")
@TENANT_FLAGS
def tenant_create(
    name: str = typer.Argument(..., help="tenant name (a-z, 0-9, '_', '.', '-')"),
    save: bool = typer.Option(True, help="save the key as `sinkserve chat`'s default"),
    redis_url: Optional[str] = typer.Option(None, help="Redis URL (default: env, then what `up` saved)"),
    *,
    flags: GivenFlags,
) -> None:
    """Create a tenant and print its API key (shown once; only its hash is stored)."""
    from sinkserve.errors import TenantError

    quotas = flags.section("limits")
    _settings(flags, limits=quotas)  # a refused value exits 2 naming its flag, before Redis is asked

    async def create(store):
        try:
            return await store.tenants.create(name, **quotas)
        except TenantError as err:
            _fail(str(err))

    tenant, api_key = _run_redis(create, redis_url)
    typer.echo(api_key)
    typer.secho(
        f"tenant {tenant.name}: max {tenant.max_sessions} sessions, {tenant.tokens_per_minute} tokens/min, "
        f"{tenant.requests_per_second:g} requests/s (burst {tenant.request_burst})",
        fg=typer.colors.BRIGHT_BLACK,
        err=True,
    )
    if save:
        path = save_defaults(api_key=api_key)
        typer.secho(f"saved as the default key in {path}", fg=typer.colors.BRIGHT_BLACK, err=True)


@tenant_app.command("add-key")
def tenant_add_key(
    name: str = typer.Argument(...),
    redis_url: Optional[str] = typer.Option(None, help="Redis URL (default: env, then what `up` saved)"),
) -> None:
    """Issue another API key for an existing tenant."""
    from sinkserve.errors import TenantError

    async def add(store):
        try:
            return await store.tenants.add_key(name)
        except TenantError as err:
            _fail(str(err))

    typer.echo(_run_redis(add, redis_url))


@tenant_app.command("list")
def tenant_list(redis_url: Optional[str] = typer.Option(None, help="Redis URL")) -> None:
    """List tenants with their quotas and live sessions."""

    async def rows(store):
        return [(t, await store.sessions.count_sessions(t.name)) for t in await store.tenants.list()]

    result = _run_redis(rows, redis_url)
    if not result:
        typer.echo("no tenants")
        return
    typer.echo(f"{'tenant':<24} {'sessions':>8} {'max':>8} {'tokens/min':>11} {'requests/s':>10} {'burst':>6}")
    for tenant, live in result:
        typer.echo(f"{tenant.name:<24} {live:>8} {tenant.max_sessions:>8} {tenant.tokens_per_minute:>11} "
                   f"{tenant.requests_per_second:>10g} {tenant.request_burst:>6}")


@tenant_app.command("delete")
def tenant_delete(
    name: str = typer.Argument(...),
    yes: bool = typer.Option(False, "--yes", help="also delete the tenant's sessions without asking"),
    redis_url: Optional[str] = typer.Option(None, help="Redis URL"),
) -> None:
    """Delete a tenant, its keys and its sessions' records (replicas drop their caches at the next lease check)."""

    async def delete(store):
        if await store.tenants.get(name) is None:
            _fail(f"no tenant {name!r}")
        live = await store.sessions.count_sessions(name)
        if live and not yes:
            _fail(f"tenant {name!r} has {live} live sessions; pass --yes to delete them too")
        while True:
            ids, _ = await store.sessions.list_sessions(name, 500)
            if not ids:
                break
            for sid in ids:
                await store.sessions.delete_session(sid, name)
        await store.tenants.delete(name)
        return live

    live = _run_redis(delete, redis_url)
    typer.echo(f"deleted tenant {name} ({live} sessions)")


def pb_reason(value: int) -> str:
    from sinkserve.v1 import sinkserve_pb2 as pb

    return pb.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def register(app: typer.Typer) -> None:
    app.command(help=up.__doc__)(up)
    app.command(help=gateway.__doc__)(gateway)
    app.add_typer(tenant_app, name="tenant")

