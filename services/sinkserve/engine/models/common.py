"""Pieces of HF config parsing shared by the model families."""

from __future__ import annotations


def rope_settings(cfg: dict, theta_key: str = "rope_theta", default_theta: float = 10000.0) -> tuple[float, dict | None]:
    """(theta, scaling) from either transformers>=5 `rope_parameters` or the older flat keys."""
    params = cfg.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", cfg.get(theta_key, default_theta)))
    scaling = cfg.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    return theta, scaling


def partial_rotary_factor(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", cfg.get("rotary_pct", 1.0))))
