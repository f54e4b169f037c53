"""What routes need, declared once: `Annotated` aliases that FastAPI injects (tests swap the app's state)."""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field
from typing import Annotated

import redis
from fastapi import Depends, Request

from app.serving import ModelServer
from config.settings import Settings


@dataclass
class Services:
    """Everything the running API holds. Built in `app.main.create_app`, kept on `app.state.services`."""

    settings: Settings
    # bytes client (decode_responses=False, as RQ expects); None when REDIS_URL is unset.
    redis: redis.Redis | None = None
    # The served model, built from the settings unless one is given; the app's lifespan starts and stops it.
    model_server: InitVar[ModelServer | None] = None
    models: ModelServer = field(init=False)

    def __post_init__(self, model_server: ModelServer | None) -> None:
        self.models = model_server if model_server is not None else ModelServer(self.settings)


def make_redis(url: str | None) -> redis.Redis | None:
    if url is None:
        return None
    # Short timeouts: with Redis down, /v1/train must answer 503 quickly and reads must not notice.
    return redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0, health_check_interval=30)


def get_services(request: Request) -> Services:
    services = request.app.state.services
    assert isinstance(services, Services)
    return services


def get_settings_dep(services: Annotated[Services, Depends(get_services)]) -> Settings:
    return services.settings


ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
