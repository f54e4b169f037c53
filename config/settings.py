"""Settings shared by the API and the worker, read from the environment (and `.env`).

Nested groups use `__` as the separator: `RQ__QUEUE`, `TRAIN__LIMIT`, `API__READ_TIMEOUT_S`.
A bad value fails at start with pydantic's message, which names the variable.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DISCORD_API_BASE = "https://discord.com/api/v10"
DEFAULT_DISCORD_ATTACHMENT_ORIGINS = "https://cdn.discordapp.com,https://media.discordapp.net"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str) -> str | None:
    """`scheme://host[:port]` of an http(s) URL, lower-case, the scheme's default port left out; None for
    anything else (another scheme, no host, user info, a port that is not a number)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if scheme not in _DEFAULT_PORTS or not host or parts.username is not None or parts.password is not None:
        return None
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" if port is None or port == _DEFAULT_PORTS[scheme] else f"{scheme}://{host}:{port}"


class RqSettings(BaseModel):
    queue: str = Field(default="digits", min_length=1)


class RedisSettings(BaseModel):
    """Timeouts on every Redis connection (API, worker, work-horse, event publisher, relay), and how long a
    worker holds a finished job's outcome for a Redis that went away."""

    connect_timeout_s: float = Field(default=2.0, gt=0)
    socket_timeout_s: float = Field(
        default=5.0, gt=0, description="longest wait for one command's answer; the RQ worker's own connection "
        "waits at least 20 s, as its blocking dequeue polls every 10 s"
    )
    outage_s: float = Field(
        default=600.0, ge=0, description="how long a work-horse waits for Redis to come back to record a finished "
        "job (events and state are kept in order meanwhile); also added to the job's heartbeat lease"
    )
    buffer_max: int = Field(default=2000, ge=10, description="events and state writes kept while Redis is away; "
                            "beyond it the oldest progress events are dropped")


class ApiSettings(BaseModel):
    """Limits and behaviour of the HTTP service."""

    read_max_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    read_max_pixels: int = Field(
        default=9_437_184, ge=1, description="pixels one decode may hold at full size (app.decode): a PNG's, or "
        "a baseline JPEG's at 1/8 scale; the default is app.decode.DEFAULT_MAX_PIXELS"
    )
    read_timeout_s: float = Field(default=5.0, gt=0)
    read_queue_max: int = Field(
        default=64, ge=1, description="reads admitted at once (waiting or running); one more answers 503 overloaded"
    )
    # 0.9: on our photo set the default job's calibrated confidence (seeds 42, 1, 2, 3) flags 60-74% of its
    # wrong answers and 1.7-3.3% of its right ones (0.8: 43-55% / 1.1-1.9%). README, "Reading photos".
    uncertain_below: float = Field(default=0.90, ge=0, le=1)
    tta: bool = False
    batch_max: int = Field(default=32, ge=1, le=512)
    batch_wait_ms: float = Field(default=2.0, ge=0, le=100)
    torch_threads: int = Field(default=0, ge=0, description="threads of a forward pass; 0: the cores available")
    precision: str = Field(default="auto", pattern=r"^(auto|fp32|bf16)$",
                           description="fp32 runs on ONNX Runtime, bf16 on torch autocast; auto: fp32, which was "
                           "faster than bf16 even where the CPU has native bf16")
    manifest_max_bytes: int = Field(default=64 * 1024, ge=1024)
    model_max_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)
    keep_versions: int = Field(default=5, ge=1, description="versions kept per model, by the time this server "
                               "received them; the active one and the last that passed the gate are kept besides")
    gate_tolerance: float = Field(default=0.2, ge=0, le=100, description="accuracy points a candidate may lose "
                                  "against the active model on the gate set and still go live")
    gate_size: int = Field(default=1000, ge=50, le=10_000, description="MNIST test digits in the promotion "
                           "gate's set (half plain, half photo-like renders)")
    model_poll_s: float = Field(
        default=5.0, ge=0, description="seconds between checks of the active pointer for changes made by another "
        "process sharing DATA_DIR; 0: never"
    )
    replicate_keep: int = Field(
        default=2, ge=1, description="versions whose weights Redis holds for other replicas: the active one and the "
        "ones activated before it (2: active and previous)"
    )
    replicate_poll_s: float = Field(
        default=2.0, gt=0, le=8, description="seconds between checks of the shared active pointer in Redis (a missed "
        "notification is caught up within this)"
    )


class TrainSettings(BaseModel):
    """The worker's training configuration; none of this travels in the job payload."""

    arch: str = Field(default="resnet_s2_w32", description="the network trained: a key of app.network.ARCHS; "
                      "resnet_s2_w48 and resnet18_1ch are the networks of earlier models")
    limit: int | None = Field(default=None, ge=1, description="train on the first N images")
    val_size: int = Field(default=5000, ge=1)
    threads: int = Field(default=0, ge=0, description="0: the cores available")
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda)$")
    precision: str = Field(default="auto", pattern=r"^(auto|fp32|bf16|fp16)$",
                           description="auto: bf16 where the CPU has native bf16, bf16/fp16 on CUDA, else fp32")
    progress_every: int = Field(default=20, ge=1, description="batches between progress events")
    batch_views: int = Field(default=0, ge=0, le=8, description="optimiser steps taken on each batch, each on its "
                             "own random augmentation of it (the batch is one step of progress however many); "
                             "0: the arch's own (app.network.ARCHS)")
    noise_prob: float = Field(default=0.0, ge=0, le=1, description="salt/pepper per-pixel probability")
    dots_prob: float = Field(default=0.0, ge=0, le=1, description="share of images given dots/occlusions")
    blur_prob: float = Field(default=0.0, ge=0, le=1, description="share of images blurred")
    morph_prob: float = Field(default=0.0, ge=0, le=1, description="share of images eroded or dilated")
    photo_share: float = Field(default=0.2, ge=0, le=1, description="share of the training (and validation) "
                               "digits shown as photo-like renders, preprocessed as /v1/read does; 0: plain MNIST")
    upload_attempts: int = Field(default=6, ge=1)
    upload_backoff_s: float = Field(default=2.0, ge=0)
    upload_timeout_s: float = Field(default=120.0, gt=0)
    upload_max_backoff_s: float = Field(default=300.0, ge=0, description="longest wait between two upload attempts")
    estimate_images_per_s: float = Field(
        default=60.0, gt=0, description="training speed (images x epochs per second) assumed for the enqueue-time "
        "estimate until a worker has measured its own"
    )
    keep_artifacts: int = Field(default=3, ge=0, description="uploaded runs whose files stay under "
                                "DATA_DIR/artifacts; runs whose upload failed are always kept")


    @field_validator("arch")
    @classmethod
    def _arch_is_known(cls, value: str) -> str:
        from app.network import ARCHS  # here, not at the top: torch loads only where an arch is named

        if value not in ARCHS:
            raise ValueError(f"unknown arch {value!r}; known: {', '.join(ARCHS)}")
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        env_nested_delimiter="__",
        extra="ignore",
        case_sensitive=False,
        # `TRAIN__LIMIT=` (as .env.example writes it) means "the default", not "an empty value".
        env_ignore_empty=True,
    )

    redis_url: str | None = None
    rq: RqSettings = RqSettings()
    redis: RedisSettings = RedisSettings()
    digits_events_channel: str = Field(default="digits:events", min_length=1)
    data_dir: Path = Path("./data")

    handwriting_api_url: str = "http://127.0.0.1:8000"
    handwriting_api_key: SecretStr | None = None

    discord_public_key: str | None = None
    discord_application_id: str | None = None
    discord_bot_token: SecretStr | None = None
    discord_api_base: str = DEFAULT_DISCORD_API_BASE
    discord_read_public: bool = False
    discord_train_rate_per_hour: int = Field(default=3, ge=0, description="0 disables the limit")
    discord_read_rate_per_minute: int = Field(default=10, ge=0, description="/read per user; 0 disables the limit")
    discord_timestamp_max_age_s: int = Field(
        default=300, ge=0, description="refuse interactions signed further than this from now; 0: no check"
    )
    discord_attachment_origins: str = Field(
        default=DEFAULT_DISCORD_ATTACHMENT_ORIGINS,
        description="comma-separated scheme://host[:port] that /read downloads attachments from (each redirect too)",
    )
    discord_progress_interval_s: float = Field(
        default=5.0, ge=0.5, description="least seconds between two progress edits of one /train message"
    )
    discord_download_timeout_s: float = Field(default=10.0, gt=0, description="whole /read attachment download")

    log_level: str = Field(default="INFO", pattern=r"^(?i:debug|info|warning|error|critical)$")

    api: ApiSettings = ApiSettings()
    train: TrainSettings = TrainSettings()

    @field_validator("discord_public_key")
    @classmethod
    def _public_key_is_hex(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("must be the application's public key: 64 hex characters")
        return value

    @field_validator("discord_attachment_origins")
    @classmethod
    def _origins_are_origins(cls, value: str) -> str:
        origins = []
        for entry in (e.strip() for e in value.split(",")):
            origin = origin_of(entry)
            if origin is None or urlsplit(entry).path not in ("", "/") or urlsplit(entry).query:
                raise ValueError(f"{entry!r} is not an origin: each entry is scheme://host[:port], http or https")
            origins.append(origin)
        return ",".join(origins)

    @property
    def attachment_origins(self) -> frozenset[str]:
        return frozenset(self.discord_attachment_origins.split(","))

    @field_validator("handwriting_api_url", "discord_api_base")
    @classmethod
    def _strip_trailing_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def gate_dir(self) -> Path:
        return self.data_dir / "gate"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
