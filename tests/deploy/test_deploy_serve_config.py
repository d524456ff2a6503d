"""deploy/serve_config.yaml (running the app on an existing Ray cluster) is one Ray Serve and the app accept."""

from __future__ import annotations

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deploy_kit import REPO_ROOT
from sinkserve.config import Settings

SERVE_CONFIG = REPO_ROOT / "deploy" / "serve_config.yaml"


@pytest.fixture(scope="module")
def serve_config() -> dict:
    if not SERVE_CONFIG.is_file():
        pytest.skip("deploy/serve_config.yaml is not in this checkout yet (it comes with the serving code)")
    return yaml.safe_load(SERVE_CONFIG.read_text())


def test_serve_config_file_loads(serve_config):
    config = ServeDeploySchema.model_validate(serve_config)
    for app in config.applications:
        assert app.import_path == "sinkserve.replica.app:build_app"
        Settings.model_validate(app.args or {})


def test_serve_config_file_keeps_secrets_out(serve_config):
    for app in serve_config["applications"]:
        assert "password" not in (app.get("args") or {}).get("redis", {}), "the Redis password belongs in env"
