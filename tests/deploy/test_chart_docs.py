"""The chart's README documents every value, and its cluster example is the file the tests render."""

from __future__ import annotations

import re
from typing import Any

import yaml

from deploy_kit import CHART_DIR, CI_VALUES_DIR

README = (CHART_DIR / "README.md").read_text()
# Values that hold free-form Kubernetes fields: documented as a whole, not key by key.
FREE_FORM_KEYS = {"resources", "podSecurityContext", "securityContext"}
FREE_FORM_PATHS = {"gateway.image", "engine.modelVolume.source"}


def documented_paths(values: dict[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        free_form = key in FREE_FORM_KEYS or path in FREE_FORM_PATHS
        if isinstance(value, dict) and value and not free_form:
            paths += documented_paths(value, path + ".")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            paths.append(path)
            paths += documented_paths(value[0], path + "[].")
        else:
            paths.append(path)
    return paths


def test_every_value_is_documented():
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    paths = documented_paths(values)
    missing = [p for p in paths if f"`{p}`" not in README]
    assert not missing, f"values missing from helm/sinkserve/README.md: {missing}"


def test_readme_example_is_the_rendered_ci_file():
    match = re.search(r"<!-- example: ci/(\S+) -->\n```yaml\n(.*?)```", README, re.S)
    assert match, "README lost its 2-node 8-GPU example block"
    name, block = match.groups()
    assert block == (CI_VALUES_DIR / name).read_text()


def test_example_is_a_two_node_eight_gpu_cluster():
    example = yaml.safe_load((CI_VALUES_DIR / "two-nodes-eight-gpus-values.yaml").read_text())
    (group,) = example["ray"]["workerGroups"]
    assert group["replicas"] * group["gpus"] == 8 and group["replicas"] == 2
