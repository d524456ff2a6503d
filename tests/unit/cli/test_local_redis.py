"""The local stack's Redis password and data dir on the CLI side: the password is made once, kept private with the
client defaults and reused; `sinkserve tenant` sends it only to the redis-server `sinkserve up` started."""

from __future__ import annotations

import os
import stat

import pytest
from typer.testing import CliRunner

from sinkserve import cli_serving
from sinkserve.cli import app
from sinkserve.client import defaults_file, load_defaults, save_defaults

runner = CliRunner()


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path):
    for name in [n for n in os.environ if n.startswith("SINKSERVE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SINKSERVE_CACHE_DIR", str(tmp_path / "cache"))


def test_the_password_is_made_once_kept_private_and_reused():
    first = cli_serving._local_redis_password()
    assert len(first) >= 32
    assert stat.S_IMODE(defaults_file().stat().st_mode) == 0o600
    assert cli_serving._local_redis_password() == first  # the next `sinkserve up` uses the same one
    save_defaults(api_key="sk-ss-x")  # later saves keep it and the file private
    assert load_defaults()["local_redis_password"] == first
    assert stat.S_IMODE(defaults_file().stat().st_mode) == 0o600


def test_the_saved_password_goes_only_to_the_local_redis_server():
    save_defaults(local_redis_password="local-pw", local_redis_url="redis://127.0.0.1:4000/0")
    assert cli_serving._redis_password("redis://127.0.0.1:4000/0", None) == "local-pw"
    assert cli_serving._redis_password("redis://127.0.0.1:4000/0", "configured") == "local-pw"
    # Another Redis (`up --redis-url`, `tenant --redis-url`) gets the configured password, if any.
    assert cli_serving._redis_password("redis://10.0.0.5:6379/0", "configured") == "configured"
    assert cli_serving._redis_password("redis://127.0.0.1:4001/0", None) is None


def test_data_dir_is_refused_with_an_outside_redis(tmp_path):
    result = runner.invoke(app, ["up", "--redis-url", "redis://127.0.0.1:1/0", "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 2, result.output
    assert "--data-dir" in result.output
