"""The serveConfigV2 inside the RayService is one Ray Serve and the app itself accept, and says what the
values say."""

from __future__ import annotations

import pytest
from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

from deploy_kit import all_pod_templates, env_of, pod_templates, render
from sinkserve.config import BUNDLED_MODEL, Settings


def test_serve_config_passes_ray_serve_schema(rendered):
    config = ServeDeploySchema.model_validate(rendered.serve_config)
    (app,) = config.applications
    assert app.import_path == "sinkserve.replica.app:build_app"
    assert app.name == rendered.values["serve"]["appName"]
    assert app.route_prefix is None  # no HTTP route: clients come through the gateway
    # Ray's models ignore unknown keys; a misspelt option would silently do nothing.
    raw = rendered.serve_config
    assert set(raw) <= set(ServeDeploySchema.model_fields)
    (raw_app,) = raw["applications"]
    assert set(raw_app) <= set(ServeApplicationSchema.model_fields)
    for deployment in raw_app["deployments"]:
        assert set(deployment) <= set(DeploymentSchema.model_fields)
        assert set(deployment["ray_actor_options"]) <= {"num_cpus", "num_gpus", "memory", "resources"}


def test_app_args_load_with_the_apps_own_settings(rendered):
    (app,) = rendered.serve_config["applications"]
    settings = Settings.model_validate(app["args"])
    v = rendered.values
    assert settings.engine.model == v["engine"]["model"]
    assert settings.engine.sinks == v["engine"]["sinks"]
    assert settings.engine.window == v["engine"]["window"]
    assert settings.engine.slots == v["engine"]["slotsPerReplica"]
    assert settings.engine.dtype == v["engine"]["dtype"]
    assert settings.engine.weights == v["engine"]["weights"]
    assert settings.engine.packed_max_rows == v["engine"]["packedMaxRows"]
    assert settings.replica.num_gpus == v["replica"]["numGpus"]
    assert settings.replica.tensor_parallel == v["replica"]["tensorParallel"]
    assert settings.router.lease_ttl_s == v["router"]["leaseTtlS"]
    assert settings.router.load_factor == v["router"]["loadFactor"]
    assert settings.ray.app_name == v["serve"]["appName"]
    # The password never travels in the serve config (it is readable in the RayService object).
    assert settings.redis.password is None
    assert "password" not in str(app["args"]).lower()


def test_replica_deployment_options_follow_values(rendered):
    (app,) = rendered.serve_config["applications"]
    (deployment,) = app["deployments"]
    replica = rendered.values["replica"]
    assert deployment["name"] == rendered.values["serve"]["deploymentName"]
    assert deployment["ray_actor_options"] == {"num_cpus": replica["numCpus"], "num_gpus": replica["numGpus"]}
    assert deployment["max_ongoing_requests"] == replica["maxOngoingRequests"]
    if replica["autoscaling"]["enabled"]:
        assert "num_replicas" not in deployment
        assert deployment["autoscaling_config"]["max_replicas"] == replica["autoscaling"]["maxReplicas"]
        assert Settings.model_validate(app["args"]).replica.autoscaling is not None
    else:
        assert deployment["num_replicas"] == replica["numReplicas"]
        assert "autoscaling_config" not in deployment
        assert Settings.model_validate(app["args"]).replica.autoscaling is None


def test_autoscaling_reaches_serve_and_the_ray_autoscaler(renders):
    rendered = renders["autoscaling"]
    (app,) = rendered.serve_config["applications"]
    (deployment,) = app["deployments"]
    assert deployment["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 6,
        "target_ongoing_requests": 48,
        "upscale_delay_s": 30,
        "downscale_delay_s": 600,
    }
    cluster = rendered.one("RayService")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (group,) = cluster["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 6)


def test_tensor_parallel_replicas_get_one_bundle_per_shard(renders):
    rendered = renders["tensor-parallel-2"]
    (app,) = rendered.serve_config["applications"]
    (deployment,) = app["deployments"]
    bundles = deployment["placement_group_bundles"]
    assert len(bundles) == 2 and all(b["GPU"] == 1 for b in bundles)
    # The replica actor lives in bundle 0, so its resources must fit there.
    assert bundles[0]["CPU"] >= deployment["ray_actor_options"]["num_cpus"]
    assert bundles[0]["GPU"] >= deployment["ray_actor_options"]["num_gpus"]
    assert deployment["placement_group_strategy"] == "STRICT_PACK"
    # STRICT_PACK puts both shards on one node: one worker pod must hold them.
    (group,) = rendered.one("RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] >= sum(b["GPU"] for b in bundles)
    assert Settings.model_validate(app["args"]).replica.tensor_parallel == 2


def test_single_shard_replicas_have_no_placement_group(renders):
    (app,) = renders["gpu-default"].serve_config["applications"]
    (deployment,) = app["deployments"]
    assert "placement_group_bundles" not in deployment


def test_checkpoint_path_model_is_mounted_on_every_ray_pod(renders):
    rendered = renders["tensor-parallel-2"]
    (app,) = rendered.serve_config["applications"]
    model = app["args"]["engine"]["model"]
    assert model.startswith("/") and model != BUNDLED_MODEL
    for label, template in pod_templates(rendered.one("RayService")):
        mounts = {m["name"]: m for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert model.startswith(mounts["models"]["mountPath"] + "/"), label
        assert mounts["models"]["readOnly"] is True
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "llama-weights"


@pytest.mark.parametrize("value_set_name", ["gpu-default", "external-redis"])
def test_serve_redis_url_matches_the_pods_env(renders, value_set_name):
    rendered = renders[value_set_name]
    (app,) = rendered.serve_config["applications"]
    for label, template in all_pod_templates(rendered):
        env = env_of(template["spec"]["containers"][0])
        if "SINKSERVE_REDIS__URL" in env:
            assert env["SINKSERVE_REDIS__URL"]["value"] == app["args"]["redis"]["url"], label


def test_deployment_override_is_what_the_app_itself_would_set(rendered):
    # The config repeats the app's own scheduling options so that Serve and KubeRay show them; they must
    # agree with what build_app derives from the same args, or the config silently wins with other numbers.
    from sinkserve.replica import DEPLOYMENT_NAME
    from sinkserve.replica.app import deployment_options

    (app,) = rendered.serve_config["applications"]
    (override,) = app["deployments"]
    from_code = deployment_options(Settings.model_validate(app["args"]))
    from_code.pop("request_router_config")  # configured in code only (it names a Python class)
    assert override["name"] == DEPLOYMENT_NAME
    assert override == from_code


def test_build_app_accepts_the_rendered_args(rendered):
    # What the Serve controller does with the config: call the builder with args (no Ray needed to bind).
    from ray.serve import Application

    from sinkserve.replica.app import build_app

    (app,) = rendered.serve_config["applications"]
    assert isinstance(build_app(app["args"]), Application)


def test_optional_engine_values_reach_the_app_only_when_set(chart, renders):
    (default_app,) = renders["gpu-default"].serve_config["applications"]
    assert not {"seed", "num_threads", "max_context"} & set(default_app["args"]["engine"])
    rendered = render(chart, {"engine": {"policy": "dense", "maxContext": 4096, "seed": 7, "numThreads": 3}})
    (app,) = rendered.serve_config["applications"]
    engine = Settings.model_validate(app["args"]).engine
    assert (engine.policy, engine.max_context, engine.seed, engine.num_threads) == ("dense", 4096, 7, 3)
