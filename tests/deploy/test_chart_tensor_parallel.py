"""Tensor-parallel replicas in the chart: replica.tensorParallel reaches the replica's own config (the Serve app's
args) and Ray's resources (one placement-group bundle of numCpus CPUs, and numGpus GPUs, per shard, all in one worker
pod), and sizes that cannot run are refused at render with the values to change."""

from __future__ import annotations

import pytest
from helm_python.errors import HelmError

from deploy_kit import render
from sinkserve.config import BUNDLED_MODEL, Settings

CPU_GROUP = {"name": "cpu", "replicas": 1, "minReplicas": 1, "maxReplicas": 1, "gpus": 0,
             "resources": {"requests": {"cpu": "4"}, "limits": {"cpu": "4"}}}
CPU_REPLICAS = {"engine": {"device": "cpu", "dtype": "float32"}, "replica": {"numGpus": 0, "numCpus": 2},
                "ray": {"workerGroups": [CPU_GROUP]}}


def merged(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        for key, value in part.items():
            out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def deployment_and_settings(rendered):
    (app,) = rendered.serve_config["applications"]
    (deployment,) = app["deployments"]
    return deployment, Settings.model_validate(app["args"])


def worker_cpus(rendered) -> float:
    (group,) = rendered.one("RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return float(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])


@pytest.mark.parametrize("value_set", ["cpu-tensor-parallel-3", "tensor-parallel-2"])
def test_shards_reach_the_replica_config_and_rays_resources(renders, value_set):
    rendered = renders[value_set]
    values = rendered.values["replica"]  # the value set merged over the chart's defaults
    deployment, settings = deployment_and_settings(rendered)
    shards = values["tensorParallel"]
    # The replica reads replica.tensor_parallel from its args: it starts that many shards.
    assert settings.replica.tensor_parallel == shards
    assert (settings.replica.num_cpus, settings.replica.num_gpus) == (values["numCpus"], values["numGpus"])
    # Ray reserves one bundle per shard: CPUs and GPUs per replica = shards x per-shard.
    bundles = deployment["placement_group_bundles"]
    assert len(bundles) == shards
    assert all(b["CPU"] == values["numCpus"] for b in bundles)
    assert all(b.get("GPU", 0) == values["numGpus"] for b in bundles)
    assert deployment["placement_group_strategy"] == "STRICT_PACK"
    # ... the same bundles the app's own code derives from the rendered args (what Serve would do without them).
    from sinkserve.replica.app import deployment_options

    assert deployment_options(settings)["placement_group_bundles"] == bundles
    # STRICT_PACK: one worker pod holds a replica's shards.
    assert worker_cpus(rendered) >= sum(b["CPU"] for b in bundles)


def test_cpu_shards_run_dense_on_cpu_workers(renders):
    rendered = renders["cpu-tensor-parallel-3"]
    _, settings = deployment_and_settings(rendered)
    assert settings.engine.model == BUNDLED_MODEL and settings.engine.device == "cpu"
    assert settings.engine.weights == "dense" and settings.replica.num_gpus == 0
    (group,) = rendered.one("RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in group["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_the_bundled_models_sizes_are_the_engines():
    # The chart refuses sizes other than 1 and 3 for the bundled model: those are the ones its heads split into.
    import json

    from sinkserve.engine import shards
    from sinkserve.engine.weights import ModelNotFoundError, resolve_checkpoint

    try:
        checkpoint = resolve_checkpoint(BUNDLED_MODEL)
    except ModelNotFoundError as err:
        pytest.skip(str(err))
    hf_config = json.loads((checkpoint / "config.json").read_text())
    assert shards.valid_sizes(shards.shardable_family(hf_config).ModelArgs.from_hf(hf_config)) == [1, 3]


REFUSED = {
    "bundled model in 2": (
        merged(CPU_REPLICAS, {"replica": {"tensorParallel": 2, "numCpus": 1}}),
        "replica.tensorParallel 2 does not split the bundled model (9 attention heads, 3 KV heads, FFN width 1536); "
        "sizes that do: 1, 3",
    ),
    "cpu shards that fit no pod": (
        merged(CPU_REPLICAS, {"replica": {"tensorParallel": 3}}),
        "a replica needs replica.numCpus x replica.tensorParallel = 6 CPUs on one node (STRICT_PACK), but the "
        "largest worker group has 4 CPUs per pod",
    ),
    "cpu shards against num-cpus in millicores": (
        merged(CPU_REPLICAS, {"replica": {"tensorParallel": 3, "numCpus": 1},
                              "ray": {"workerGroups": [{**CPU_GROUP, "rayStartParams": {"num-cpus": "2500m"}}]}}),
        "= 3 CPUs on one node (STRICT_PACK), but the largest worker group has 2.5 CPUs per pod",
    ),
    "int4 weights in shards": (
        merged(CPU_REPLICAS, {"engine": {"weights": "int4", "dtype": "bfloat16"},
                              "replica": {"tensorParallel": 3, "numCpus": 1}}),
        "engine.weights int4 is not split into shards",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_sizes_that_cannot_run_are_refused(chart, case):
    values, message = REFUSED[case]
    with pytest.raises(HelmError) as err:
        render(chart, values)
    assert message in str(err.value)


def test_cpu_shards_that_fit_render(chart):
    rendered = render(chart, merged(CPU_REPLICAS, {"replica": {"tensorParallel": 3, "numCpus": 1}}))
    deployment, settings = deployment_and_settings(rendered)
    assert settings.replica.tensor_parallel == 3 and len(deployment["placement_group_bundles"]) == 3
