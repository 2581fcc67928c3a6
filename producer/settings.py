"""One settings model for producers and workers.

Values come from, highest priority first: keyword arguments, environment variables
(prefix ``VQUEUE_``, sections nested with ``__``: ``VQUEUE_MODEL__SOURCE``), the TOML file
named by ``VQUEUE_SETTINGS`` (default ``./settings.toml`` when it exists), then the
defaults below.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

SETTINGS_ENV = "VQUEUE_SETTINGS"
DEFAULT_SETTINGS_FILE = "settings.toml"


class _Section(BaseModel):
    # A typo in settings.toml must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid")


class RedisSettings(_Section):
    #: ``redis://``, ``rediss://`` (TLS) or kombu's ``sentinel://s1:26379;sentinel://s2:26379``
    #: form (``producer.connections`` says how each is used).
    url: str = "redis://127.0.0.1:6379/0"
    #: With a ``sentinel://`` url: the master's name in the sentinels' ``sentinel monitor`` line.
    sentinel_master: str | None = None
    #: How long a dead worker's jobs wait before they go back to the queue. A live worker
    #: renews the lease of every job it holds every lease_s / 6 seconds, so a job that runs
    #: for hours is never delivered twice; only a worker that stopped renewing (killed, hung,
    #: cut off from Redis for longer than this) loses its jobs to the others. Shorter: a dead
    #: worker's jobs come back sooner; longer: a worker may stall (a long GC pause, a Redis
    #: failover) this long without its jobs being run elsewhere too. The one setting to tune.
    #: (``visibility_timeout_s``, its old name, is still read.)
    lease_s: int = Field(60, ge=10, validation_alias=AliasChoices("lease_s", "visibility_timeout_s"))
    #: Results stay readable this long after a job ends.
    result_ttl_s: int = Field(86400, ge=60)

    @model_validator(mode="after")
    def _sentinel_needs_its_master(self) -> RedisSettings:
        sentinel = self.url.startswith("sentinel://")
        if sentinel and not self.sentinel_master:
            raise ValueError("redis.url is a sentinel:// URL: set redis.sentinel_master "
                             "(VQUEUE_REDIS__SENTINEL_MASTER) to the master's name in the sentinels' "
                             "`sentinel monitor NAME host port quorum` line")
        if self.sentinel_master and not sentinel:
            raise ValueError(f"redis.sentinel_master is {self.sentinel_master!r} but redis.url is not a "
                             "sentinel:// URL: give the sentinels as "
                             "sentinel://:PASSWORD@s1:26379/0;sentinel://s2:26379/0, or unset redis.sentinel_master")
        if sentinel and "?" in self.url:
            raise ValueError("redis.url: a sentinel:// URL takes no ?options (TLS through Sentinel is not supported "
                             "here); use sentinel://:PASSWORD@host:26379/0;sentinel://host2:26379/0")
        return self


class ModelSettings(_Section):
    #: A local folder, or a ModelScope model id such as ``Qwen/Qwen2-VL-2B-Instruct``.
    source: str = "Qwen/Qwen2-VL-2B-Instruct"
    #: The name producers address; also names the worker's queue.
    served_name: str = "Qwen2-VL-2B-Instruct"
    revision: str | None = None
    #: ModelScope download folder (None: ModelScope's default, ~/.cache/modelscope).
    cache_dir: str | None = None


class EngineSettings(_Section):
    max_model_len: int = Field(4096, ge=16)
    dtype: str = "bfloat16"
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    #: AsyncLLMEngine's own defaults (128 / 2048) cost 14-26 % on an H100.
    max_num_seqs: int = Field(1024, ge=1)
    max_num_batched_tokens: int = Field(8192, ge=16)
    enforce_eager: bool = False
    seed: int = 0
    load_format: str = "auto"
    limit_mm_per_prompt: dict[str, int] = Field(default_factory=lambda: {"image": 2, "video": 0})
    #: Any other ``AsyncEngineArgs`` field, passed through unchanged.
    extra_args: dict[str, Any] = Field(default_factory=dict)


class ImageSettings(_Section):
    """Limits on images in chat jobs, checked at submit and again in the worker."""

    max_images_per_job: int = Field(4, ge=0)
    max_image_bytes: int = Field(10 * 2**20, ge=1)
    #: Qwen2-VL's own max_pixels.
    max_image_pixels: int = Field(12_845_056, ge=1)
    #: The JSON of a job's messages, images included.
    max_message_bytes: int = Field(32 * 2**20, ge=1)
    #: Hosts whose http(s) image URLs the worker may fetch; none by default. Loopback,
    #: private and link-local addresses are refused whatever the host resolves to.
    allowed_url_hosts: list[str] = Field(default_factory=list)
    fetch_timeout_s: float = Field(10.0, gt=0)


class WorkerSettings(_Section):
    #: Jobs in the engine at once: the threads pool's concurrency.
    max_in_flight: int = Field(256, ge=1)
    #: How often the engine logs its own counters (running / waiting requests).
    log_stats_interval_s: float = Field(10.0, gt=0)
    #: Python's GIL switch interval in the worker process (Celery's consumer, the pool threads,
    #: the engine's result reader; the engine has a process of its own). Python's default 5 ms
    #: makes the consumer thread wait that long for each hand-over under load.
    gil_switch_interval_s: float = Field(0.0005, gt=0)
    #: Task events for Flower (received, succeeded); Celery publishes them in batches.
    task_events: bool = True
    #: Celery's two INFO lines per job ("received", "succeeded in"). Off by default: at
    #: thousands of jobs a second they were about a tenth of the worker's CPU (a py-spy of a
    #: burst, bench/results/NOTES.md), and each job's record (`vqueue job`), Flower and the
    #: metrics say the same, as for a job's typed failure (InvalidJob, ...: Celery logs
    #: those at INFO too). Unexpected errors are logged either way.
    log_each_job: bool = False
    #: How often a worker renews its announcement in Redis (``vqueue models``).
    heartbeat_s: float = Field(5.0, gt=0)
    #: The worker asks its engine process for a sign of life this often...
    engine_ping_interval_s: float = Field(5.0, gt=0)
    #: ...and treats an engine that has not answered for this long as dead: its jobs go back
    #: to the queue and the worker exits 70. Must be below ``redis.lease_s``, so that the
    #: worker hands its jobs back before their leases run out.
    engine_ping_timeout_s: float = Field(30.0, gt=0)
    #: Unreadable messages kept in ``vqueue:dead-letters`` (the oldest are dropped).
    dead_letter_max: int = Field(10_000, ge=1)
    #: A job in the engine this many times when it died is quarantined: failed
    #: (``Quarantined``), never delivered again, listed by ``vqueue dead``. Not 1: an engine
    #: also dies of things no job caused (a GPU fault, the OOM killer), and every job in flight
    #: shares each death. Not more than 3: each death costs a worker restart and requeues
    #: everything in flight with it. Three in a row almost surely names the job.
    max_engine_deaths: int = Field(3, ge=1)


class ModelQueueSettings(_Section):
    """``queue.models.<served name>``: one model's own limits (unset: the ``queue`` ones)."""

    max_backlog: int | None = Field(None, ge=0)
    default_timeout_s: float | None = Field(None, gt=0)


class QueueSettings(_Section):
    """What producers may queue: bounds, default priorities and deadlines (checked at submit)."""

    #: Jobs waiting in one model's queue (not yet taken by a worker) beyond which ``submit``
    #: raises ``QueueFull`` and enqueues nothing; 0 = unbounded. Producers count before
    #: sending, so producers racing each other can overshoot it by their batches.
    max_backlog: int = Field(0, ge=0)
    #: A job's deadline when it sets neither ``timeout_s`` nor ``deadline``; None: none.
    default_timeout_s: float | None = Field(None, gt=0)
    #: Priority (0-9, higher runs first) of a job that sets none...
    default_priority: int = Field(5, ge=0, le=9)
    #: ...and of the lines of a batch file, lower so that bulk work never starves single requests.
    batch_priority: int = Field(2, ge=0, le=9)
    #: Per served model name: ``[queue.models."Qwen2-VL-2B-Instruct"] max_backlog = 5000``.
    models: dict[str, ModelQueueSettings] = Field(default_factory=dict)

    def max_backlog_for(self, model: str) -> int:
        own = self.models.get(model)
        return own.max_backlog if own is not None and own.max_backlog is not None else self.max_backlog

    def default_timeout_s_for(self, model: str) -> float | None:
        own = self.models.get(model)
        return own.default_timeout_s if own is not None and own.default_timeout_s is not None \
            else self.default_timeout_s


class TestingSettings(_Section):
    """Fault hooks for vqueue's own tests. Off unless ``testing.hooks = true``: with them on, a
    completion job whose prompt is ``vqueue-test:hang-engine`` freezes the engine process's
    loop (it stops answering) and ``vqueue-test:kill-engine`` makes the engine process exit.
    Never turn them on in production."""

    hooks: bool = False


class ProducerSettings(_Section):
    #: Results arrive by Redis pub/sub at once; this is the pace of the safety-net sweep.
    poll_interval_s: float = Field(1.0, gt=0)
    default_timeout_s: float = Field(600.0, gt=0)
    #: Characters of a prompt that Flower and logs show.
    argsrepr_chars: int = Field(200, ge=0)


class GatewaySettings(_Section):
    """``vqueue gateway``: the OpenAI-compatible HTTP front (``gateway/``)."""

    #: Loopback by default; 0.0.0.0 to listen on every interface (then set api_keys).
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    #: uvicorn worker processes; each holds one Redis pool and one pub/sub connection.
    workers: int = Field(1, ge=1)
    #: Bearer keys that /v1/* accepts; none (the default) means no check, as `vllm serve`
    #: without --api-key. Give them by environment (VQUEUE_GATEWAY__API_KEYS='["k1"]'), not in a file.
    api_keys: list[SecretStr] = Field(default_factory=list)
    #: How long a request waits for its job when its body sets no ``timeout_s``: then the job is
    #: cancelled and the answer is 504 naming it.
    request_timeout_s: float = Field(600.0, gt=0)
    #: The Retry-After (seconds) of a 429 (queue.max_backlog reached).
    retry_after_s: int = Field(1, ge=0)
    #: How long the list of served models (live workers) is reused before Redis is asked again.
    models_cache_s: float = Field(1.0, ge=0)
    #: Redis connections per gateway process; past them a request waits for one. A streaming
    #: request holds one while it waits for its next tokens (up to producer.poll_interval_s).
    redis_max_connections: int = Field(1024, ge=8)


class BatchSettings(_Section):
    """Batch files: ``vqueue batch run`` and the gateway's ``/v1/batches`` (``producer.batch``)."""

    #: Lines of one batch queued or running at once; the next are submitted as these finish.
    #: Enough to keep the engines full (the sum of the workers' worker.max_in_flight), and it
    #: bounds what a batch holds in memory and adds to the backlog (queue.max_backlog).
    window: int = Field(4096, ge=1)
    #: A batch has one runner at a time (a CLI or a gateway), holding a lease it renews every
    #: lease_s / 3; a runner that died loses the batch to the next one after lease_s.
    lease_s: int = Field(30, ge=3)
    #: Output files are fsync'ed this often (a machine that reboots loses at most this much of
    #: them; the lost lines are written again from Redis when the batch is run again).
    fsync_every_s: float = Field(5.0, gt=0)


class FilesSettings(_Section):
    """The gateway's ``/v1/files``: uploaded batch inputs and the batches' output files."""

    #: A folder every gateway can reach (a shared volume when several run).
    dir: str = "vqueue-files"
    #: The largest file ``/v1/files`` accepts (OpenAI's limit is 200 MB for batch inputs).
    max_bytes: int = Field(200 * 2**20, ge=1)


class MetricsSettings(_Section):
    """Prometheus metrics (``producer.metrics`` names them; README "Operations: metrics")."""

    #: Each worker serves ``/metrics`` on this port (``prometheus_client``'s own HTTP server, in
    #: a thread); 0: no metrics server. Several workers on one host need one port each.
    port: int = Field(9400, ge=0, le=65535)
    #: The worker's metrics server listens here; loopback by default, 0.0.0.0 for a Prometheus
    #: on another host (the figures hold no secrets, but say which models run and how busy).
    host: str = "127.0.0.1"
    #: How often the engine process sends its own figures (running, waiting, KV cache) to the worker.
    engine_stats_interval_s: float = Field(1.0, gt=0)


class Settings(BaseSettings):
    """Every setting of vqueue, in sections (``redis``, ``model``, ``engine``, ``worker``,
    ``producer``, ``queue``, ``gateway``, ``metrics``, ``batch``, ``files``). Build one directly in tests:
    ``Settings(redis={"url": ...})``."""

    model_config = SettingsConfigDict(
        env_prefix="VQUEUE_", env_nested_delimiter="__", extra="forbid", nested_model_default_partial_update=True
    )

    redis: RedisSettings = RedisSettings()
    model: ModelSettings = ModelSettings()
    engine: EngineSettings = EngineSettings()
    images: ImageSettings = ImageSettings()
    worker: WorkerSettings = WorkerSettings()
    producer: ProducerSettings = ProducerSettings()
    queue: QueueSettings = QueueSettings()
    testing: TestingSettings = TestingSettings()
    gateway: GatewaySettings = GatewaySettings()
    metrics: MetricsSettings = MetricsSettings()
    batch: BatchSettings = BatchSettings()
    files: FilesSettings = FilesSettings()

    @model_validator(mode="after")
    def _engine_ping_within_lease(self) -> Settings:
        w = self.worker
        if w.engine_ping_timeout_s + w.engine_ping_interval_s >= self.redis.lease_s:
            raise ValueError(
                f"worker.engine_ping_timeout_s ({w.engine_ping_timeout_s:g}) + worker.engine_ping_interval_s "
                f"({w.engine_ping_interval_s:g}) must be below redis.lease_s ({self.redis.lease_s}): a worker must "
                "give up on a hung engine, and hand its jobs back, before their leases expire"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The order is the priority: arguments, then env, then the TOML file.
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=settings_file())


def settings_file() -> Path | None:
    """The TOML file in use: ``$VQUEUE_SETTINGS``, else ``./settings.toml`` if present."""
    named = os.environ.get(SETTINGS_ENV)
    if named:
        path = Path(named)
        if not path.is_file():
            raise FileNotFoundError(f"{SETTINGS_ENV}={named} names no file; point it at a settings TOML file.")
        return path
    default = Path(DEFAULT_SETTINGS_FILE)
    return default if default.is_file() else None


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
