"""All configuration in one place: environment variables prefixed INFERQ_, overridden by CLI flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from inferq.shared.errors import ConfigError
from inferq.shared.keys import LANES, MAX_SHARDS, MODEL_NAME, MODEL_NAME_MAX, TENANT_NAME


def _default_data_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "inferq"


class Settings(BaseSettings):
    """Every knob inferq has. `Settings()` reads INFERQ_* variables; `settings.merged(flag=value)` applies flags."""

    model_config = SettingsConfigDict(env_prefix="INFERQ_", extra="ignore", validate_assignment=True)

    # Where Redis is. None: use the embedded valkey-server, started once in data_dir and shared.
    redis_url: str | None = None
    embedded_port: int = Field(6390, ge=1, le=65535, description="port of the embedded server (loopback)")
    embedded_fsync: Literal["everysec", "always"] = Field(
        "everysec",
        description="the embedded server's appendfsync: everysec can lose up to a second of acknowledged writes "
        "in a crash of the machine; always loses none, at a cost in write speed",
    )
    embedded_malloc: Literal["mimalloc", "libc"] = Field(
        "mimalloc",
        description="the embedded server's allocator: mimalloc (preloaded, on Linux), or libc, the binary's own "
        "glibc malloc, which takes a third more of the server's CPU a request",
    )
    key_prefix: str = Field(
        "inferq", min_length=1, pattern=r"^[^{}\s]+$", description="the start of every key name (no braces: a "
        "brace would make a hash tag of it)"
    )  # fmt: skip
    shards: int = Field(
        1, ge=1, le=MAX_SHARDS, description="shard streams per lane, spread over a Redis Cluster's masters: the "
        "same on every producer and worker (a request's shard comes from its id and this number)"
    )  # fmt: skip
    data_dir: Path = Field(default_factory=_default_data_dir)

    # What to run.
    model: str = Field(
        "smollm2",
        min_length=1,
        max_length=MODEL_NAME_MAX,
        pattern=MODEL_NAME,
        description="tiny, smollm2, a local path or a hub id (letters, digits and . _ / - @ +)",
    )
    max_model_len: int = Field(2048, ge=16)
    dtype: str = "auto"
    kv_cache_gib: float = Field(2.0, gt=0, description="KV cache size on CPU, in GiB (fractions allowed)")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="vLLM engine arguments (AsyncEngineArgs fields), a JSON object; over "
        "the worker's own defaults (max_num_seqs from max_inflight, the CPU KV cache, dtype, ...)"
    )  # fmt: skip
    stream_interval: int = Field(
        8,
        ge=1,
        description="tokens per streamed token event (vLLM's stream_interval); the first token and the end are "
        "always sent at once. Each event wakes the worker, Redis and the client: 1 streams every token and "
        "costs a third of the throughput on a 2-core box (BENCHMARKS.md)",
    )

    # Worker.
    max_inflight: int = Field(256, ge=1, description="requests one worker runs at once")
    read_batch: int = Field(
        32,
        ge=1,
        description="most entries one read takes; a worker with more free slots reads again at once, so its "
        "reads, starts and final writes overlap in Redis instead of going in lockstep (BENCHMARKS.md)",
    )
    heartbeat_s: float = Field(2.0, gt=0)
    claim_idle_ms: int = Field(60_000, ge=100)
    max_deliveries: int = Field(3, ge=1)
    drain_timeout_s: float = Field(30.0, ge=0)
    max_run_s: float = Field(
        3600.0, gt=0, allow_inf_nan=False, description="a request running longer is aborted and ends failed (watchdog)"
    )
    engine_stall_s: float = Field(
        300.0,
        gt=0,
        allow_inf_nan=False,
        description="a worker whose engine produced nothing this long while requests ran stops renewing their "
        "claims (other workers take them over) and exits 1",
    )
    engine_profile: Literal["auto", "vllm", "cpu-shared"] = Field(
        "auto",
        description="how the worker sets vLLM up: `vllm` as it ships (CUDA graphs, its stats and metrics), "
        "`cpu-shared` the tuning for a CPU box shared with Redis and clients (the three settings below, eager "
        "mode), `auto` cpu-shared on a CPU and vllm elsewhere (worker/engine_profile.py)",
    )
    worker_nice: int = Field(
        5,
        ge=0,
        le=19,
        description="Linux: the nice value of a vLLM worker's session scheduling group when it leads its own "
        "session, so the engine's busy polling does not starve Redis and clients on the same machine (0: off)",
    )
    engine_spin_ms: float = Field(
        2.0,
        ge=0,
        allow_inf_nan=False,
        description="how long vLLM's engine core and model process busy-wait for each other's next message "
        "before they sleep until it comes (vLLM's own is 1000: under load they never sleep, and on CPU the spin "
        "takes most of a core from the worker, Redis and the model; docs/benchmark-history.md). Only where the model "
        "runs in a process of its own: GPU tensor parallel, or CPU with engine_model_in_core off",
    )
    engine_model_in_core: bool = Field(
        True,
        description="CPU: run the model in vLLM's engine core process, with the OpenMP threads vLLM would give a "
        "model process of its own, rather than in that process (vLLM's CPU default), which the core hands "
        "every step to and waits on: two process hand-offs per step (docs/benchmark-history.md)",
    )
    standin_step_ms: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="the stand-in engine's time per token (`--engine standin`, "
        "for tests and queue benchmarks); 0: no wait at all, the queue's own capacity"
    )  # fmt: skip
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="serve /metrics (Prometheus) and /ready on this port (none: no server)"
    )
    metrics_host: str = Field(
        "127.0.0.1", min_length=1, description="address the metrics port listens on (0.0.0.0: every interface)"
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object per log line, with a request's id, model, lane and timings"
    )
    log_requests: bool = Field(
        False, description="log one line for each request that ends (as vLLM's --enable-log-requests does)"
    )

    # Admission and results.
    max_queue_len: int = Field(100_000, ge=1, description="refuse new work at this many entries in a lane")
    lane_caps: dict[str, int] = Field(
        default_factory=dict, description='per-lane overrides of max_queue_len, e.g. {"low": 1000} (JSON in env)'
    )
    max_lag: int = Field(0, ge=0, description="refuse new work when this many are unread in a lane (0: off)")
    tenant_cap: int = Field(0, ge=0, description="most unfinished requests one tenant may have per model (0: off)")
    tenant: str | None = Field(
        None, pattern=rf"^{TENANT_NAME}$", description="the tenant this client is bound to: its requests carry it, "
        "their ids and its reply channel start with it (TENANT:...), as the Redis producer role needs"
    )  # fmt: skip
    lane_min_share: float = Field(
        0.1, ge=0, le=0.5, description="share of starts each lower lane gets while it has work (anti-starvation)"
    )
    max_tokens_limit: int = Field(32_768, ge=1, description="largest max_tokens a request may ask for")
    max_request_bytes: int = Field(
        1 << 20, ge=1024, description="largest queue entry (the packed request: prompt, messages and all), in bytes"
    )
    max_messages: int = Field(256, ge=1, description="most chat messages in one request")
    max_stop_chars: int = Field(1000, ge=1, description="longest stop string, in characters")
    dlq_max_len: int = Field(10_000, ge=1, description="dead letters kept per model; the oldest beyond go (counted)")
    dlq_max_payload_bytes: int = Field(
        65_536, ge=0, description="a dead letter keeps its request only up to this size (its reason always)"
    )
    result_ttl_s: int = Field(86_400, ge=1, description="how long stored results live")
    max_queued_s: int = Field(
        7 * 86_400, ge=1, description="longest a request waits in its queue before it ends `expired` (unless its "
        "deadline comes sooner); bounds how long a queued request's result is kept"
    )  # fmt: skip
    request_timeout_s: float = Field(600.0, gt=0, description="default wait for a result in the client")

    # The HTTP gateway (inferq.gateway).
    api_keys: SecretStr | None = Field(
        None, description='the gateway\'s API keys, a JSON object: {"KEY": "TENANT"} or {"KEY": {"tenant": ..., '
        '"models": [...]}}'
    )  # fmt: skip
    api_keys_file: Path | None = Field(None, description="a file that holds the gateway's API keys (same JSON)")
    gateway_max_body_bytes: int = Field(
        4 << 20, ge=1024, description="largest HTTP request body the gateway reads (413 past it)"
    )
    gateway_max_file_bytes: int = Field(
        32 << 20, ge=1024, description="largest file the gateway's Batch API takes (it is kept in Redis)"
    )
    gateway_file_ttl_s: int = Field(7 * 86_400, ge=60, description="how long an uploaded file is kept")

    # Bulk jobs.
    bulk_window: int = Field(4096, ge=1, description="most requests of one bulk job outstanding at once")
    bulk_slice_s: float = Field(
        30.0,
        gt=0,
        description="a detached job runs in arq steps of this long; a dead runner's step is retried "
        "elsewhere within about twice this",
    )
    bulk_ttl_s: int = Field(7 * 86_400, ge=60, description="how long a finished job's record and output are kept")

    @field_validator("lane_caps")
    @classmethod
    def _check_lanes(cls, value: dict[str, int]) -> dict[str, int]:
        for lane, cap in value.items():
            if lane not in LANES:
                raise ValueError(f"lane_caps: unknown lane {lane!r}; use {', '.join(LANES)}")
            if cap < 1:
                raise ValueError(f"lane_caps: the cap of lane {lane!r} must be at least 1")
        return value

    def lane_cap(self, lane: str) -> int:
        return self.lane_caps.get(lane, self.max_queue_len)

    @field_validator("redis_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("INFERQ_REDIS_URL must start with redis://, rediss:// or unix://")
        return value

    def merged(self, **overrides: Any) -> Settings:
        """A copy with the given values replaced; None means "flag not given" and keeps the current value."""
        given = {k: v for k, v in overrides.items() if v is not None}
        try:
            return self.model_validate({**self.model_dump(), **given})
        except ValidationError as exc:
            raise ConfigError(describe_settings_error(exc)) from None


def describe_settings_error(exc: ValidationError) -> str:
    """One line per bad setting, named as its environment variable, without the value that was given: a
    URL may hold a password."""
    return "; ".join(
        f"INFERQ_{'_'.join(map(str, e['loc'])).upper()}: {e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors()[:5]
    )


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment with CLI flags on top; a bad value raises ConfigError, not a traceback."""
    try:
        base = Settings()
    except ValidationError as exc:
        raise ConfigError(f"bad INFERQ_* environment setting: {describe_settings_error(exc)}") from None
    except ValueError as exc:  # a value pydantic-settings could not even parse (JSON), named by its field
        raise ConfigError(f"bad INFERQ_* environment setting: {exc}") from None
    return base.merged(**overrides)
