"""The Ray Serve application: ``sinkserve.replica.app:build_app`` (the import path in serve configs).

``args`` is a ``sinkserve.config.Settings`` dict (the same document `deploy/serve_config.yaml` and the Helm
chart render). It is validated here, so a bad config fails at deploy time with pydantic's message.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from sinkserve.config import Settings
from sinkserve.replica import DEPLOYMENT_NAME
from sinkserve.replica.server import SinkServeReplica
from sinkserve.routing.request_router import ROUTER_CLASS, router_kwargs



def settings_args(settings: Settings) -> dict:
    """Settings as plain JSON-able args, secrets included (Serve passes them to every replica)."""
    args = settings.model_dump(mode="json")
    if settings.redis.password is not None:
        args["redis"]["password"] = settings.redis.password.get_secret_value()
    return args


def deployment_options(settings: Settings) -> dict[str, Any]:
    rc = settings.replica
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": rc.max_ongoing_requests,
        "health_check_period_s": rc.health_check_period_s,
        "health_check_timeout_s": rc.health_check_timeout_s,
        "graceful_shutdown_timeout_s": rc.graceful_shutdown_timeout_s,
        "request_router_config": RequestRouterConfig(
            request_router_class=ROUTER_CLASS, request_router_kwargs=router_kwargs(settings)
        ),
    }
    if rc.autoscaling is not None:
        a = rc.autoscaling
        options["autoscaling_config"] = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
        }
    else:
        options["num_replicas"] = rc.num_replicas
    if rc.tensor_parallel > 1:
        # One bundle per shard, packed on one node; the replica actor itself lives in the first bundle.
        shard = {"CPU": rc.num_cpus, "GPU": rc.num_gpus} if rc.num_gpus else {"CPU": rc.num_cpus}
        options["placement_group_bundles"] = [dict(shard) for _ in range(rc.tensor_parallel)]
        options["placement_group_strategy"] = "STRICT_PACK"
        options["ray_actor_options"] = {"num_cpus": rc.num_cpus, "num_gpus": rc.num_gpus}
    else:
        options["ray_actor_options"] = {"num_cpus": rc.num_cpus, "num_gpus": rc.num_gpus}
    return options


def build_app(args: dict | None = None) -> Application:
    settings = Settings.model_validate(args or {})
    deployment = serve.deployment(SinkServeReplica).options(**deployment_options(settings))
    return deployment.bind(settings_args(settings))
