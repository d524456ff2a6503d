"""The CLI's config flags: derived from the typed config, every given value honoured (0 included) or refused
naming the flag, and `sinkserve bench` running the checkout's benchmarks. No model is loaded and no stack is
started: the commands are stopped right after their settings are built."""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest
import typer
from pydantic import ValidationError
from typer.testing import CliRunner

from sinkserve import cli_bench, cli_serving
from sinkserve.cli import MODEL_FLAGS, app
from sinkserve.cli_flags import ConfigFlags, GivenFlags
from sinkserve.config import EngineConfig, Settings

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_config_env(monkeypatch):
    # The config reads SINKSERVE_* variables; the developer's shell must not change what these tests see.
    for name in [n for n in os.environ if n.startswith("SINKSERVE_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def up_stops_at_settings(monkeypatch) -> list[Settings]:
    """`sinkserve up` builds its settings with the real helper, then stops before it starts anything."""
    built: list[Settings] = []
    real = cli_serving.up_settings

    def capture(flags: GivenFlags, redis_url=None) -> Settings:
        built.append(real(flags, redis_url))
        raise typer.Exit(0)

    monkeypatch.setattr(cli_serving, "up_settings", capture)
    return built


def invoke(*args: str, **kwargs: Any):
    return runner.invoke(app, list(args), **kwargs)


def click_command(name: str) -> Any:
    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------- refused, named
@pytest.mark.parametrize("command", ["up", "generate", "ppl"])
def test_window_0_is_refused_naming_the_flag(command, tmp_path):
    extra = {"generate": ["--prompt", "hi"], "ppl": ["--text", str(tmp_path / "t.txt")]}.get(command, [])
    (tmp_path / "t.txt").write_text("some text")
    result = invoke(command, *extra, "--window", "0")
    assert result.exit_code == 2, result.output
    assert "--window: Input should be greater than or equal to 1" in result.output
    assert "engine.window" not in result.output


def test_an_environment_value_is_named_by_its_config_path(monkeypatch, up_stops_at_settings):
    monkeypatch.setenv("SINKSERVE_ENGINE__WINDOW", "0")
    result = invoke("up")
    assert result.exit_code == 2, result.output
    assert "engine.window: Input should be greater than or equal to 1" in result.output
    # ... and a flag overrides the variable
    result = invoke("up", "--window", "64")
    assert result.exit_code == 0, result.output
    assert up_stops_at_settings[-1].engine.window == 64


def test_cross_field_errors_are_refused():
    result = invoke("generate", "--prompt", "hi", "--weights", "int4", "--dtype", "float32")  # int4: 16-bit dtypes
    assert result.exit_code == 2, result.output
    assert "weights=int4 needs dtype bfloat16 or float16" in result.output
    result = invoke("generate", "--prompt", "hi", "--weights", "int8", "--dtype", "bfloat16")
    assert result.exit_code == 2, result.output
    assert "weights=int8 computes in float32" in result.output


def test_max_sessions_is_gone_slots_replaces_it(up_stops_at_settings):
    assert invoke("up", "--max-sessions", "4").exit_code == 2  # no such option any more
    assert invoke("up", "--slots", "3").exit_code == 0
    assert up_stops_at_settings[-1].engine.slots == 3


# ------------------------------------------------------------------------------------------- honoured
def test_sinks_0_reaches_the_engine_config(up_stops_at_settings):
    result = invoke("up", "--sinks", "0", "--window", "100")
    assert result.exit_code == 0, result.output
    (settings,) = up_stops_at_settings
    assert (settings.engine.sinks, settings.engine.window) == (0, 100)
    assert (settings.gateway.host, settings.ray.host, settings.ray.address) == ("127.0.0.1", "127.0.0.1", None)


def test_up_settings_helper_takes_what_was_given():
    given = GivenFlags(cli_serving.UP_FLAGS, {"engine": {"sinks": 0, "window": 100, "slots": 2},
                                               "replica": {"num_replicas": 2}, "gateway": {"port": 0}})
    settings = cli_serving.up_settings(given)
    assert (settings.engine.sinks, settings.engine.window, settings.engine.slots) == (0, 100, 2)
    assert settings.replica.num_replicas == 2 and settings.gateway.port == 0
    assert settings.engine.num_threads >= 1  # split between the replicas when not given


def _up_flags():
    return [pytest.param(model, flag, id=flag.name) for model, flag in cli_serving.UP_FLAGS.entries]


@pytest.mark.parametrize(("model", "flag"), _up_flags())
def test_every_up_flag_given_as_0_is_honoured_or_refused(model, flag, up_stops_at_settings):
    # The old `if v` filter dropped 0 and "" without a word; now the config decides, and the CLI says which flag.
    annotation = model.model_fields[flag.field].annotation
    value = "" if annotation is str else "0"
    if "Literal" in repr(annotation):  # a choice: a value outside it is a usage error naming the flag
        result = invoke("up", flag.name, "0")
        assert result.exit_code == 2 and flag.name in result.output, result.output
        return
    try:
        Settings(**{flag.section: {flag.field: value}})
        accepted = True
    except ValidationError:
        accepted = False
    result = invoke("up", flag.name, value)
    if accepted:
        assert result.exit_code == 0, result.output
        got = getattr(getattr(up_stops_at_settings[-1], flag.section), flag.field)
        assert str(got) in (value, "0.0"), (flag.name, got)
    else:
        assert result.exit_code == 2, result.output
        assert f"error: {flag.name}: " in result.output


def test_gateway_flags_are_not_dropped(monkeypatch):
    seen = []

    def stop(flags=None, **sections):
        seen.append(sections)
        raise typer.Exit(0)

    monkeypatch.setattr(cli_serving, "_settings", stop)
    assert invoke("gateway", "--port", "0", "--host", "").exit_code == 0
    assert seen[-1]["gateway"] == {"port": 0, "host": ""}


# ------------------------------------------------------------------------------------------- derived
@pytest.mark.parametrize(("command", "flags"), [("generate", MODEL_FLAGS), ("ppl", MODEL_FLAGS), ("up", cli_serving.UP_FLAGS)])
def test_flags_show_the_config_defaults_and_descriptions(command, flags):
    params = click_command(command).params
    options = {name: opt for opt in params if opt.param_type_name == "option" for name in opt.opts}
    for model, flag in flags.entries:
        info = model.model_fields[flag.field]
        option = options[flag.name]
        assert option.default is None  # None = not given: the config's own default applies
        assert option.help == info.description
        assert option.show_default == (False if info.default is None else str(info.default))


def test_up_takes_every_engine_field():
    names = {flag.field for model, flag in cli_serving.UP_FLAGS.entries if model is EngineConfig}
    assert names == set(EngineConfig.model_fields)


def test_help_text_shows_defaults():
    result = invoke("up", "--help")
    assert result.exit_code == 0
    for text in ("--slots", "--window", "--sinks", "--replicas", "(1020)", "(16)", "(4)"):
        assert text in result.output, text


def test_a_field_type_without_a_flag_is_refused():
    with pytest.raises(TypeError):
        ConfigFlags.of("redis", ("password",))  # SecretStr | None: not a command-line value
    with pytest.raises(KeyError):
        ConfigFlags.of("engine", ("max_sessions",))


# ------------------------------------------------------------------------------------------- bench
def test_bench_runs_the_checkouts_benchmarks(monkeypatch, tmp_path):
    root = tmp_path / "checkout"
    (root / "benchmarks").mkdir(parents=True)
    (root / "benchmarks" / "run.py").write_text("")
    monkeypatch.setattr(cli_bench, "checkout_root", lambda: root)
    calls = []

    class Done:
        returncode = 3

    monkeypatch.setattr(cli_bench.subprocess, "run", lambda cmd, **kw: calls.append((cmd, kw)) or Done())
    text = tmp_path / "t.txt"
    text.write_text("x")
    monkeypatch.chdir(tmp_path)
    result = invoke("bench", "--quick", "--text", "t.txt", "--only", "quality", "--out", "out")
    assert result.exit_code == 3, result.output
    (cmd, kw), = calls
    assert cmd == [sys.executable, "-m", "benchmarks.run", "--quick", "--text", str(text.resolve()),
                   "--only", "quality", "--out", str((tmp_path / "out").resolve())]
    assert kw["cwd"] == root


def test_bench_without_a_checkout_says_so(monkeypatch):
    monkeypatch.setattr(cli_bench, "checkout_root", lambda: None)
    result = invoke("bench", "--quick")
    assert result.exit_code == 2
    assert "source checkout" in result.output


def test_bench_finds_this_checkout_when_installed_editable():
    root = cli_bench.checkout_root()
    if root is None:
        pytest.skip("sinkserve is not installed editable here")
    assert (root / "benchmarks" / "run.py").is_file() and (root / "pyproject.toml").is_file()


# ------------------------------------------------------------------------------------------- tenant quotas
def test_tenant_create_flags_are_the_limits_config_fields():
    from sinkserve.config import LimitsConfig

    tenant = typer.main.get_command(app).commands["tenant"].commands["create"]  # type: ignore[attr-defined]
    options = {name: opt for opt in tenant.params if opt.param_type_name == "option" for name in opt.opts}
    assert {flag.field for _, flag in cli_serving.TENANT_FLAGS.entries} == set(LimitsConfig.model_fields)
    for model, flag in cli_serving.TENANT_FLAGS.entries:
        info = model.model_fields[flag.field]
        assert options[flag.name].default is None and options[flag.name].help == info.description
    assert {"--requests-per-second", "--request-burst", "--tokens-per-minute", "--max-sessions"} <= set(options)


@pytest.mark.parametrize("flag", ["--request-burst", "--requests-per-second", "--tokens-per-minute", "--max-sessions"])
def test_tenant_create_refuses_a_bad_quota_naming_the_flag_before_redis(flag):
    result = invoke("tenant", "create", "acme", "--no-save", "--redis-url", "redis://127.0.0.1:1/0", flag, "0")
    assert result.exit_code == 2, result.output
    assert f"error: {flag}: " in result.output


def test_tenant_create_stores_the_quotas_given(redis_server, monkeypatch):
    import redis

    from sinkserve.store import Keys

    monkeypatch.setenv("SINKSERVE_REDIS__KEY_PREFIX", "cli-quotas")
    result = invoke("tenant", "create", "acme", "--no-save", "--redis-url", redis_server.url,
                    "--requests-per-second", "2.5", "--request-burst", "7", "--tokens-per-minute", "300")
    assert result.exit_code == 0, result.output
    assert "2.5 requests/s (burst 7)" in result.output
    with redis.Redis.from_url(redis_server.url) as client:
        record = client.hgetall(Keys("cli-quotas").tenant("acme"))
    assert (record[b"requests_per_second"], record[b"request_burst"], record[b"tokens_per_minute"]) == (
        b"2.5", b"7", b"300")
    assert record[b"max_sessions"] == b"1000"  # not given: the config's default
