"""Assembles the API: settings, services, middleware, error envelope, routers. Nothing else lives here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.deps import Services, make_redis
from app.discord.runtime import DiscordRuntime
from app.errors import install_error_handlers
from app.observability import RequestIdMiddleware, configure_logging
from app.routes import admin, health, jobs, models, read, train
from app.routes import discord as discord_routes
from config.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    services = Services(settings=settings, redis=make_redis(settings.redis_url))
    discord = DiscordRuntime(settings, services.redis, services.models)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await services.models.start()
        await discord.start()
        try:
            yield
        finally:
            await discord.stop()
            await services.models.stop()
            if services.redis is not None:
                services.redis.close()

    app = FastAPI(title="handwriting-ai", version="0.1.0", lifespan=lifespan)
    app.state.services = services
    app.state.discord = discord
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    app.include_router(health.router)
    app.include_router(train.router)
    app.include_router(jobs.router)
    app.include_router(read.router)
    app.include_router(models.router)
    app.include_router(admin.router)
    app.include_router(discord_routes.router)
    return app


app = create_app()
