"""The request router's wiring: the class path Serve imports and the kwargs it gets."""

from __future__ import annotations

import importlib

from sinkserve.config import Settings
from sinkserve.routing.request_router import ROUTER_CLASS, SessionAffinityRouter, router_kwargs


def test_router_class_path_names_the_router():
    module, _, name = ROUTER_CLASS.partition(":")
    assert getattr(importlib.import_module(module), name) is SessionAffinityRouter


def test_router_kwargs_come_from_settings():
    settings = Settings(
        redis={"url": "redis://127.0.0.1:1/0", "password": "pw", "key_prefix": "px", "socket_timeout_s": 2},
        router={"load_factor": 1.5, "lease_ttl_s": 12},
    )
    assert router_kwargs(settings) == {
        "redis_url": "redis://127.0.0.1:1/0",
        "redis_password": "pw",
        "key_prefix": "px",
        "socket_timeout_s": 2,
        "load_factor": 1.5,
        "lease_ttl_s": 12,
    }
