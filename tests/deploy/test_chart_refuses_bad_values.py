"""Bad values fail at install time (values.schema.json, or the chart's own checks for relations between
values) with a message that names the value, and a good value set still installs."""

from __future__ import annotations

import helm_python as helm
import pytest
from helm_python.errors import HelmError

from deploy_kit import CHART_DIR, NAMESPACE, RELEASE

ONE_GPU_GROUP = {"name": "gpu", "replicas": 1, "minReplicas": 1, "maxReplicas": 1, "gpus": 1}

BAD_VALUES = {
    "negative replicas": ({"replica": {"numReplicas": -1}}, "/replica/numReplicas': minimum: got -1, want 1"),
    "zero replicas": ({"replica": {"numReplicas": 0}}, "/replica/numReplicas"),
    "window below 1": ({"engine": {"window": 0}}, "/engine/window': minimum: got 0, want 1"),
    "negative sinks": ({"engine": {"sinks": -4}}, "/engine/sinks"),
    "unknown model": ({"engine": {"model": "gpt-5"}}, "value must be 'smollm2-135m-instruct'"),
    "relative model path": ({"engine": {"model": "models/llama"}}, "does not match pattern '^/.+'"),
    "unknown dtype": ({"engine": {"dtype": "int4"}}, "/engine/dtype"),
    "misspelt key": ({"engine": {"windw": 512}}, "additional properties 'windw' not allowed"),
    "string where a number goes": ({"engine": {"slotsPerReplica": "lots"}}, "/engine/slotsPerReplica"),
    "tensor parallel 0": ({"replica": {"tensorParallel": 0}}, "/replica/tensorParallel"),
    "negative gpus": ({"replica": {"numGpus": -1}}, "/replica/numGpus"),
    "replica without cpus": ({"replica": {"numCpus": 0}}, "/replica/numCpus"),
    "load factor below 1": ({"router": {"loadFactor": 0.5}}, "/router/loadFactor"),
    "privileged gateway port": ({"gateway": {"port": 80}}, "/gateway/port"),
    "no worker groups": ({"ray": {"workerGroups": []}}, "/ray/workerGroups"),
    "negative worker replicas": (
        {"ray": {"workerGroups": [{**ONE_GPU_GROUP, "replicas": -2}]}},
        "/ray/workerGroups/0/replicas",
    ),
    "worker group without gpus field": (
        {"ray": {"workerGroups": [{"name": "gpu", "replicas": 1, "minReplicas": 1, "maxReplicas": 1}]}},
        "missing property 'gpus'",
    ),
    "external redis without host or secret": (
        {"redis": {"mode": "external"}},
        "/redis/external/host",
    ),
    "unknown redis mode": ({"redis": {"mode": "sentinel"}}, "/redis/mode"),
    # Relations between values: checked by the templates (sinkserve.validate).
    "autoscaling min above max": (
        {"replica": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
        "replica.autoscaling.maxReplicas (2) must be >= replica.autoscaling.minReplicas (5)",
    ),
    "worker replicas outside min/max": (
        {"ray": {"workerGroups": [{**ONE_GPU_GROUP, "replicas": 3}]}},
        "ray.workerGroups[gpu]: replicas (3) must lie between minReplicas (1) and maxReplicas (1)",
    ),
    "shards that fit no node": (
        {"replica": {"tensorParallel": 4}},
        "needs replica.numGpus x replica.tensorParallel = 4 GPUs on one node",
    ),
    "gpu replicas on cpu workers": (
        {"ray": {"workerGroups": [{**ONE_GPU_GROUP, "gpus": 0}]}},
        "replica.numGpus > 0 but no worker group has GPUs",
    ),
    "cuda device without gpus": (
        {"engine": {"device": "cuda"}, "replica": {"numGpus": 0}},
        "engine.device is \"cuda\" but replica.numGpus is 0",
    ),
    "int4 weights in float32": (
        {"engine": {"weights": "int4", "dtype": "float32", "device": "cpu"}, "replica": {"numGpus": 0},
         "ray": {"workerGroups": [{**ONE_GPU_GROUP, "gpus": 0}]}},
        "engine.weights int4 needs engine.dtype bfloat16 or float16",
    ),
    "int4 weights on gpus": ({"engine": {"weights": "int4"}}, "engine.weights int4 runs torch's packed CPU kernel"),
    "unknown weights": ({"engine": {"weights": "int2"}}, "/engine/weights"),
    "int8 weights in bfloat16": ({"engine": {"weights": "int8", "dtype": "bfloat16"}}, "engine.weights int8 computes in float32"),
    "int8 weights on gpus": ({"engine": {"weights": "int8", "dtype": "float32"}, "replica": {"numGpus": 1}},
                             "engine.weights int8 runs fbgemm"),
    "tls without a secret": ({"gateway": {"tls": {"enabled": True}}}, "gateway.tls.enabled needs gateway.tls.secretName"),
    "duplicate worker groups": (
        {"ray": {"workerGroups": [ONE_GPU_GROUP, ONE_GPU_GROUP]}},
        'group name "gpu" is used twice',
    ),
}


@pytest.mark.parametrize("case", list(BAD_VALUES), ids=list(BAD_VALUES))
def test_bad_values_are_refused_with_a_clear_message(chart, case):
    values, expected = BAD_VALUES[case]
    with pytest.raises(HelmError) as caught:
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    assert expected in str(caught.value)


@pytest.mark.parametrize("case", ["negative replicas", "window below 1", "unknown model"])
def test_lint_reports_bad_values_as_errors(case):
    values, _ = BAD_VALUES[case]
    report = helm.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE)
    assert report["errors"] or any(m["severity"] == 3 for m in report["messages"])


def test_schema_accepts_a_checkpoint_path_and_cpu_only(chart):
    chart.validate_schema(
        {
            "engine": {"model": "/models/qwen2-7b", "device": "cpu", "dtype": "float32"},
            "replica": {"numGpus": 0},
            "ray": {"workerGroups": [{**ONE_GPU_GROUP, "gpus": 0}]},
        }
    )
