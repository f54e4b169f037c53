"""What routes need, one dependency each: `Annotated` aliases reading what `app.main` put on `app.state`.

Only routes use these; everything else takes plain arguments (a Redis connection, a queue name). The
dependencies are `async def`: FastAPI runs a plain `def` dependency on its thread pool, a thread hop per
dependency on every request (most of the event loop's time in a read, before these were async).
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
    """The settings, for code that has the request but is not a route parameter."""
    settings = request.app.state.settings
    assert isinstance(settings, Settings)
    return settings


def get_models(request: Request) -> ModelServer:
    """The model server, for code that has the request but is not a route parameter."""
    models = request.app.state.models
    assert isinstance(models, ModelServer)
    return models


async def _settings(request: Request) -> Settings:
    return get_settings_dep(request)


async def _models(request: Request) -> ModelServer:
    return get_models(request)


async def _gate(request: Request) -> PromotionGate:
    gate = request.app.state.gate
    assert isinstance(gate, PromotionGate)
    return gate


async def _redis(request: Request) -> redis.Redis | None:
    """The bytes client (decode_responses=False, as RQ expects); None when REDIS_URL is unset."""
    connection = request.app.state.redis
    assert connection is None or isinstance(connection, redis.Redis)
    return connection


async def _discord(request: Request) -> DiscordRuntime:
    discord = request.app.state.discord
    assert isinstance(discord, DiscordRuntime)
    return discord


SettingsDep = Annotated[Settings, Depends(_settings)]
ModelsDep = Annotated[ModelServer, Depends(_models)]
GateDep = Annotated[PromotionGate, Depends(_gate)]
RedisDep = Annotated[redis.Redis | None, Depends(_redis)]
DiscordDep = Annotated[DiscordRuntime, Depends(_discord)]
