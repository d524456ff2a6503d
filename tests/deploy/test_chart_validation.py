"""Every value set renders, lints clean, and yields objects the API server and KubeRay would accept."""

from __future__ import annotations

import copy
import functools
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from deploy_kit import (
    CHART_DIR,
    CI_VALUES_DIR,
    KUBE_VERSIONS,
    NAMESPACE,
    RAYSERVICE_CRD,
    VALUE_SETS,
    load_value_set,
    pod_templates,
)

# Kinds that come from CRDs, not from Kubernetes itself; each is checked on its own below.
CRD_KINDS = {"RayService", "GRPCRoute"}


def test_value_sets_cover_the_deployments_we_support():
    assert {"gpu-default", "cpu-only", "external-redis", "tls", "autoscaling", "tensor-parallel-2"} <= set(VALUE_SETS)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_lint_is_clean(value_set, kube_version):
    report = helm.lint(
        CHART_DIR, load_value_set(value_set), strict=True, namespace=NAMESPACE, kube_version=f"v{kube_version}"
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert not report["errors"], report["errors"]
    assert not problems, problems


def test_objects_are_well_formed(rendered):
    seen = set()
    for obj in rendered.objects:
        meta = obj["metadata"]
        key = (obj["apiVersion"], obj["kind"], meta["name"])
        assert key not in seen, f"{key} rendered twice"
        seen.add(key)
        # DNS-1123 label length: Services and KubeRay-derived names must fit.
        assert len(meta["name"]) <= 63, meta["name"]
        # The release namespace comes from helm/kubectl, never from the chart.
        assert "namespace" not in meta, f"{obj['kind']}/{meta['name']} hard-codes a namespace"
        assert meta["labels"]["app.kubernetes.io/instance"] == "chat"


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_core_objects_pass_strict_kubernetes_validation(rendered, kube_version):
    core = [o for o in rendered.objects if o["kind"] not in CRD_KINDS]
    assert core
    for obj in core:
        # strict: unknown fields are errors, as with `kubectl apply --validate=strict`.
        kubernetes_validate.validate(obj, kube_version, strict=True)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_ray_pod_templates_pass_strict_kubernetes_validation(rendered, kube_version):
    # The CRD embeds the pod spec; validating it as a core PodTemplate checks it against the real
    # Kubernetes schema too.
    for label, template in pod_templates(rendered.one("RayService")):
        wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
        try:
            kubernetes_validate.validate(wrapper, kube_version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{label}: {'.'.join(map(str, err.path))}: {err.message}")


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused, as the API server's strict field validation does
    (structural schemas otherwise prune them silently, which hides typos)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def rayservice_validator() -> jsonschema.protocols.Validator:
    assert RAYSERVICE_CRD.is_file(), f"KubeRay CRD schema missing: {RAYSERVICE_CRD} (vendored in tests/deploy/schemas/kuberay/)"
    crd = yaml.safe_load(RAYSERVICE_CRD.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(v1["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def test_rayservice_matches_kuberay_crd(rendered):
    service = rendered.one("RayService")
    assert service["apiVersion"] == "ray.io/v1"
    errors = sorted(rayservice_validator().iter_errors(service), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_crd_check_catches_mistakes(renders):
    # The strict CRD check is only worth something if it refuses what KubeRay would refuse or drop.
    service = copy.deepcopy(renders["gpu-default"].one("RayService"))
    service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParms"] = {}  # typo: silently pruned by the API
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    errors = list(rayservice_validator().iter_errors(service))
    messages = " ".join(e.message for e in errors)
    assert "rayStartParms" in messages and "'two' is not of type 'integer'" in messages


def test_grpcroute_shape(renders):
    # No Gateway API CRD schema is available offline; check the fields a GRPCRoute must have.
    route = renders["tls"].one("GRPCRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"] == [{"name": "public", "namespace": "gateway-system", "sectionName": "https"}]
    (rule,) = route["spec"]["rules"]
    service = renders["tls"].named("Service", f"{renders['tls'].fullname}-gateway")
    assert rule["backendRefs"] == [{"name": service["metadata"]["name"], "port": service["spec"]["ports"][0]["port"]}]


def test_ci_values_follow_chart_testing_naming():
    # `ct lint` (chart-testing) picks up exactly these files.
    assert all(p.name.endswith("-values.yaml") for p in CI_VALUES_DIR.iterdir())
