"""Helpers for the chart tests: render with the real Helm v4 engine (helm-python-sdk), no cluster."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "helm" / "sinkserve"
CI_VALUES_DIR = CHART_DIR / "ci"
# The KubeRay RayService CRD, vendored beside these tests (source, version and licence in its NOTICE).
RAYSERVICE_CRD = Path(__file__).resolve().parent / "schemas" / "kuberay" / "ray.io_rayservices.yaml"

RELEASE = "chat"
NAMESPACE = "llm"
# The oldest Kubernetes the chart supports (native gRPC probes are GA in 1.27) and the newest
# kubernetes-validate ships schemas for.
KUBE_VERSIONS = ("1.27.0", "1.37.0")

VALUE_SETS = sorted(p.name.removesuffix("-values.yaml") for p in CI_VALUES_DIR.glob("*-values.yaml"))


def load_value_set(name: str) -> dict[str, Any]:
    return yaml.safe_load((CI_VALUES_DIR / f"{name}-values.yaml").read_text()) or {}


@dataclass
class Rendered:
    """One render: the merged values, every object, and NOTES.txt."""

    values: dict[str, Any]
    objects: list[dict[str, Any]]
    notes: str
    sources: dict[int, str] = field(default_factory=dict)  # id(object) -> template file

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
        return found[0]

    def named(self, kind: str, name: str) -> dict[str, Any]:
        for obj in self.of_kind(kind):
            if obj["metadata"]["name"] == name:
                return obj
        raise AssertionError(f"no {kind} named {name}; have {[o['metadata']['name'] for o in self.of_kind(kind)]}")

    @property
    def serve_config(self) -> dict[str, Any]:
        return yaml.safe_load(self.one("RayService")["spec"]["serveConfigV2"])

    @property
    def fullname(self) -> str:
        return self.one("RayService")["metadata"]["name"]


def render(chart, values: dict[str, Any] | None = None) -> Rendered:
    manifests = chart.render(copy.deepcopy(values or {}), name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: list[dict[str, Any]] = []
    sources: dict[int, str] = {}
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append(doc)
                sources[id(doc)] = path
    return Rendered(values=chart.merge_values(copy.deepcopy(values or {})), objects=objects, notes=notes,
                    sources=sources)


def pod_templates(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, pod template) for every pod an object would create."""
    kind = obj["kind"]
    if kind in ("Deployment", "StatefulSet"):
        return [(f"{kind}/{obj['metadata']['name']}", obj["spec"]["template"])]
    if kind == "RayService":
        cluster = obj["spec"]["rayClusterConfig"]
        found = [("ray-head", cluster["headGroupSpec"]["template"])]
        found += [(f"ray-worker/{g['groupName']}", g["template"]) for g in cluster.get("workerGroupSpecs", [])]
        return found
    return []


def all_pod_templates(rendered: Rendered) -> list[tuple[str, dict[str, Any]]]:
    return [pt for obj in rendered.objects for pt in pod_templates(obj)]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())
