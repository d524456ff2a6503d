"""`sinkserve chat` and `sinkserve session` against a real gateway (grpc.aio on 127.0.0.1, real redis-server; only
the replicas are faked by an echo backend), with prompt_toolkit driven through its pipe input; and the start-up
checks of `up`, `gateway` and `generate`."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prompt_toolkit.application import create_app_session
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from typer.testing import CliRunner

from sinkserve.cli import app
from sinkserve.config import Settings
from sinkserve.protocol import SessionView, TurnDelta, TurnFinished

runner = CliRunner()
ENTER, CTRL_C, CTRL_D = "\r", "\x03", "\x04"


def paste(text: str) -> str:
    """`text` as a terminal sends a paste (bracketed paste mode)."""
    return "\x1b[200~" + text + "\x1b[201~"


class EchoBackend:
    """The replicas' side: replies with the length and the start of each message, and records each turn in the
    store the way a replica does (so the session's turns and last reply are there to show)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str]] = []
        self.store = None

    async def create(self, session_id):
        await self.store.ownership.claim(session_id, 0, "r-1", 60_000)
        return SessionView(session_id, "r-1", resident=True, cache_capacity=32)

    async def info(self, session_id):
        return SessionView(session_id, "r-1", resident=True, cache_entries=7, cache_capacity=32)

    async def delete(self, session_id):
        return True

    async def chat(self, session_id, text, params, deadline_unix, turn_id=None, request_id=None):
        from sinkserve.store import TurnRecord

        self.messages.append((session_id, text))
        reply = [f"got {len(text)} chars: ", text[:10]]
        for delta in reply:
            yield TurnDelta(delta)
        record = await self.store.sessions.get_session(session_id)
        turn = await self.store.sessions.append_transcript(
            session_id, "r-1", record.epoch, [1] * 5, count_turn=True, tenant=record.tenant, charge_tokens=5,
            turn=TurnRecord(request_id or "", "".join(reply), "eos", 2, 3, "r-1", "", turn_id or ""))
        yield TurnFinished("eos", 2, 3, turn, "r-1", 9)


class Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def gateway(redis_server, request, tmp_path, monkeypatch):
    from sinkserve.gateway.server import Gateway

    for name in [n for n in os.environ if n.startswith("SINKSERVE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SINKSERVE_CACHE_DIR", str(tmp_path / "cache"))  # the client defaults file lives there
    settings = Settings(redis={"url": redis_server.url, "key_prefix": f"cli-{request.node.name}"},
                        gateway={"host": "127.0.0.1", "port": 0, "http_port": 0})
    loop = Loop()
    backend = EchoBackend()
    gw = Gateway(settings, backend)
    backend.store = gw.store
    port = loop.run(gw.start())
    _, key = loop.run(gw.store.tenants.create("cli"))
    yield {"address": f"127.0.0.1:{port}", "key": key, "backend": backend, "store": gw.store, "loop": loop}
    loop.run(gw.stop(grace_s=0))
    loop.stop()


def chat(gw, keys: str, *args: str):
    """Run `sinkserve chat` with `keys` typed at its prompts."""
    with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
        pipe.send_text(keys)
        return runner.invoke(app, ["chat", "--address", gw["address"], "--api-key", gw["key"], *args])


def sessions_of(gw) -> list[str]:
    ids, _ = gw["loop"].run(gw["store"].sessions.list_sessions("cli", 100))
    return ids


def test_a_long_paste_arrives_whole(gateway):
    long_text = "\n".join(f"line {i}: " + "x" * 90 for i in range(60))  # 6 KB over 60 lines
    assert len(long_text.encode()) > 4096
    result = chat(gateway, paste(long_text) + ENTER + CTRL_D)
    assert result.exit_code == 0, result.output
    assert [text for _, text in gateway["backend"].messages] == [long_text]
    assert f"got {len(long_text)} chars" in result.output


def test_alt_enter_adds_a_line_and_ctrl_c_at_the_prompt_does_not_quit(gateway):
    result = chat(gateway, CTRL_C + "first line" + "\x1b" + ENTER + "second line" + ENTER + CTRL_C + "again" + ENTER
                  + CTRL_D)
    assert result.exit_code == 0, result.output
    assert [text for _, text in gateway["backend"].messages] == ["first line\nsecond line", "again"]
    assert result.output.count("(Ctrl-D quits)") == 2


def test_file_sends_a_file_and_sessions_lists_them(gateway, tmp_path):
    doc = tmp_path / "notes.txt"
    doc.write_text("from a file\nwith two lines", encoding="utf-8")
    result = chat(gateway, f"/file {doc}" + ENTER + "/file /no/such/file" + ENTER + "/new" + ENTER + "/sessions"
                  + ENTER + CTRL_D)
    assert result.exit_code == 0, result.output
    assert [text for _, text in gateway["backend"].messages] == ["from a file\nwith two lines"]
    assert "cannot read /no/such/file" in result.output
    ids = sessions_of(gateway)
    assert len(ids) == 2
    listing = result.output[result.output.index("tokens seen"):]
    assert all(sid in listing for sid in ids)
    assert sum(line.startswith("* ") for line in listing.splitlines()) == 1  # the current one is marked


def test_chat_resumes_the_last_session_unless_new(gateway):
    first = chat(gateway, "hello" + ENTER + CTRL_D)
    assert first.exit_code == 0, first.output
    (sid,) = sessions_of(gateway)
    again = chat(gateway, "more" + ENTER + CTRL_D)
    assert again.exit_code == 0, again.output
    assert f"session {sid}: resumed your last session (--new starts another)" in again.output
    assert sessions_of(gateway) == [sid]  # no new session left behind
    assert [s for s, _ in gateway["backend"].messages] == [sid, sid]
    fresh = chat(gateway, CTRL_D, "--new")
    assert fresh.exit_code == 0 and ": new;" in fresh.output
    assert len(sessions_of(gateway)) == 2
    gateway["loop"].run(gateway["store"].sessions.delete_session(sid, "cli"))
    gone = chat(gateway, CTRL_D)  # the last one (the --new one) resumes; a deleted one is replaced, said so
    assert gone.exit_code == 0 and "resumed" in gone.output


def test_session_list_show_delete(gateway):
    chat(gateway, "hello there" + ENTER + CTRL_D)
    (sid,) = sessions_of(gateway)
    common = ["--address", gateway["address"], "--api-key", gateway["key"]]
    listed = runner.invoke(app, ["session", "list", *common])
    assert listed.exit_code == 0 and sid in listed.output and "tokens seen" in listed.output
    shown = runner.invoke(app, ["session", "show", sid, *common])
    assert shown.exit_code == 0, shown.output
    assert "turns: 1" in shown.output and "cache: 7/32 entries" in shown.output
    assert "got 11 chars: hello ther" in shown.output  # the last reply
    deleted = runner.invoke(app, ["session", "delete", sid, *common])
    assert deleted.exit_code == 0 and f"deleted {sid}" in deleted.output
    assert sessions_of(gateway) == []
    missing = runner.invoke(app, ["session", "show", sid, *common])
    assert missing.exit_code == 1 and "not found" in missing.output and "Traceback" not in missing.output
    assert "no sessions" in runner.invoke(app, ["session", "list", *common]).output


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_gateway_down_asks_whether_up_is_running(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKSERVE_CACHE_DIR", str(tmp_path))
    address = f"127.0.0.1:{_free_port()}"
    for args in (["chat"], ["session", "list"]):
        result = runner.invoke(app, [*args, "--address", address, "--api-key", "sk-x"])
        assert result.exit_code == 1
        assert f"cannot reach the gateway at {address}: is `sinkserve up` running?" in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)


def test_up_checks_its_ports_before_starting_anything(monkeypatch):
    from sinkserve import cli_serving

    started = []
    monkeypatch.setattr(cli_serving, "_local_redis_password", lambda: started.append("redis") or "pw")
    with socket.socket() as grpc_port, socket.socket() as http_port:
        for sock in (grpc_port, http_port):
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        g, h = grpc_port.getsockname()[1], http_port.getsockname()[1]
        result = runner.invoke(app, ["up", "--port", str(g), "--http-port", str(h)])
        assert result.exit_code == 1, result.output
        assert f"port {g} (the gRPC gateway) on 127.0.0.1 is in use: --port PORT" in result.output
        assert f"port {h} (the HTTP API) on 127.0.0.1 is in use: --http-port PORT" in result.output
        assert started == []  # found before redis-server, Ray or a replica started
        only_grpc = runner.invoke(app, ["up", "--port", str(g), "--http-port", "0"])
        assert "--port PORT" in only_grpc.output and "--http-port" not in only_grpc.output
    assert not cli_serving.port_in_use("127.0.0.1", g)


def test_up_checks_a_given_redis_before_starting_anything():
    url = f"redis://127.0.0.1:{_free_port()}/0"  # nothing listens there
    result = runner.invoke(app, ["up", "--redis-url", url, "--port", "0", "--http-port", "0"])
    assert result.exit_code == 1, result.output
    assert f"--redis-url {url}: cannot reach Redis" in result.output
    assert "Traceback" not in result.output and "starting Ray" not in result.output


def test_generate_with_a_missing_model_is_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    for model, words in (("/no/such", "not a checkpoint directory with config.json"),
                         (str(broken), "did not load")):
        result = subprocess.run([sys.executable, "-m", "sinkserve.cli", "generate", "--model", model, "-p", "hi"],
                                capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and words in result.stderr
        assert f"error: model {model!r}" in result.stderr
        assert "loading " in result.stderr and "finding the checkpoint" in result.stderr  # progress, stage by stage


def test_model_loading_reports_its_stages_in_order(tmp_path):
    from sinkserve.config import EngineConfig
    from sinkserve.engine.loader import LOAD_STAGES, load_engine
    from sinkserve.engine.testing import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path / "tiny", arch="llama")
    seen: list[str] = []
    load_engine(EngineConfig(model=str(checkpoint), sinks=4, window=28, slots=1, device="cpu", dtype="float32"),
                on_stage=seen.append)
    assert seen == [s for s in LOAD_STAGES if s != "packing low-bit weights"]


def test_gateway_without_a_cluster_names_the_ray_address_flag(monkeypatch):
    from sinkserve.gateway import main

    def no_cluster(settings):  # what ray.init says when it finds no cluster
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to by "
                              "setting `--address` flag or `RAY_ADDRESS` environment variable.")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(main, "connect_ray", no_cluster)
    result = runner.invoke(app, ["gateway", "--port", "0", "--http-port", "0"])
    assert result.exit_code == 1
    assert "--ray-address" in result.output and "`--address`" not in result.output


def test_up_prints_the_web_chat_page_url(tmp_path, monkeypatch, capfd):
    from sinkserve import cli_serving

    monkeypatch.setenv("SINKSERVE_CACHE_DIR", str(tmp_path))
    settings = Settings(gateway={"host": "127.0.0.1", "port": 0, "http_port": 8123})

    async def main() -> None:
        announced = asyncio.Event()  # `up` saves the client defaults, then prints where everything is

        async def serve_forever(settings, ready, frontends):  # the gateway, as far as `up` sees it: listening
            for frontend in frontends:
                frontend.port = frontend.requested_port
            ready.set_result(50123)
            await announced.wait()

        monkeypatch.setattr(cli_serving, "save_defaults", lambda **_: announced.set() or tmp_path / "client.json")
        await cli_serving._serve(settings, serve_forever)

    asyncio.run(main())
    out = capfd.readouterr().out
    assert "gRPC gateway on 127.0.0.1:50123" in out
    assert "OpenAI-compatible HTTP API on http://127.0.0.1:8123/v1" in out
    assert "web chat page on http://127.0.0.1:8123/" in out
