"""What routes need, one dependency each: `Annotated` aliases reading what `app.main` put on `app.state`.

Only routes use these; everything else takes plain arguments (a Redis connection, a queue name).
"""

from __future__ import annotations

from typing import Annotated

import redis
from fastapi import Depends, Request

from app.discord.runtime import DiscordRuntime
from app.gate import PromotionGate
from app.serving import ModelServer
from config.settings import Settings


def get_settings_dep(request: Request) -> Settings:
    settings = request.app.state.settings
    assert isinstance(settings, Settings)
    return settings


def get_models(request: Request) -> ModelServer:
    models = request.app.state.models
    assert isinstance(models, ModelServer)
    return models


def get_gate(request: Request) -> PromotionGate:
    gate = request.app.state.gate
    assert isinstance(gate, PromotionGate)
    return gate


def get_redis(request: Request) -> redis.Redis | None:
    """The bytes client (decode_responses=False, as RQ expects); None when REDIS_URL is unset."""
    connection = request.app.state.redis
    assert connection is None or isinstance(connection, redis.Redis)
    return connection


def get_discord(request: Request) -> DiscordRuntime:
    discord = request.app.state.discord
    assert isinstance(discord, DiscordRuntime)
    return discord


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
ModelsDep = Annotated[ModelServer, Depends(get_models)]
GateDep = Annotated[PromotionGate, Depends(get_gate)]
RedisDep = Annotated[redis.Redis | None, Depends(get_redis)]
DiscordDep = Annotated[DiscordRuntime, Depends(get_discord)]
