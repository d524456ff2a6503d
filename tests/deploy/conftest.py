"""Fixtures for the chart tests. Every value set under helm/sinkserve/ci/ is rendered once per session."""

from __future__ import annotations

import helm_python as helm
import pytest

from deploy_kit import CHART_DIR, VALUE_SETS, Rendered, load_value_set, render


@pytest.fixture(scope="session")
def chart():
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def renders(chart) -> dict[str, Rendered]:
    return {name: render(chart, load_value_set(name)) for name in VALUE_SETS}


@pytest.fixture(params=VALUE_SETS)
def value_set(request) -> str:
    return request.param


@pytest.fixture
def rendered(renders, value_set) -> Rendered:
    return renders[value_set]
