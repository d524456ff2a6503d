"""The Serve application the replica deploys as: the shipped serve config validates and builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sinkserve.config import Settings

REPO = Path(__file__).resolve().parents[3]


def test_serve_config_is_valid_and_builds():
    from ray.serve.schema import ServeDeploySchema

    from sinkserve.replica.app import build_app, deployment_options

    config = yaml.safe_load((REPO / "deploy/serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (app_config,) = config["applications"]
    assert app_config["import_path"] == "sinkserve.replica.app:build_app"
    settings = Settings.model_validate(app_config["args"])
    assert build_app(app_config["args"]) is not None
    gpu = Settings.model_validate({"replica": {"num_gpus": 1, "tensor_parallel": 2}})
    options = deployment_options(gpu)
    assert options["placement_group_bundles"] == [{"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}]
    assert options["request_router_config"].request_router_kwargs["redis_url"] == gpu.redis.url
    assert deployment_options(settings)["num_replicas"] == 2
    with pytest.raises(Exception):
        build_app({"engine": {"window": 0}})
