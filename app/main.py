"""Assembles the API: settings, the served model, Redis, Discord, middleware, error envelope, routers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.discord.runtime import DiscordRuntime
from app.errors import install_error_handlers
from app.gate import PromotionGate
from app.observability import RequestIdMiddleware, configure_logging
from app.redis_client import connect
from app.replication import Replicator
from app.routes import admin, health, job_events, jobs, models, page, read, train
from app.routes import discord as discord_routes
from app.serving import ModelServer
from config.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    # Short timeouts: with Redis down, /v1/train must answer 503 quickly and reads must not notice.
    connection = None if settings.redis_url is None else connect(settings.redis_url, settings.redis)
    model_server = ModelServer(settings)
    gate = PromotionGate(settings)
    model_server.on_serving = gate.prepare  # the set is built and the served model scored before a candidate
    # Without Redis a single API serves what its DATA_DIR holds; with it, every replica serves the same model.
    replicator = None if settings.redis_url is None else Replicator(settings, model_server)
    discord = DiscordRuntime(settings, connection, model_server)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await model_server.start()
        if replicator is not None:
            await replicator.start()
        await discord.start()
        try:
            yield
        finally:
            await discord.stop()
            if replicator is not None:
                await replicator.stop()
            await model_server.stop()
            gate.close()
            if connection is not None:
                connection.close()

    app = FastAPI(title="handwriting-ai", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.models = model_server
    app.state.gate = gate
    app.state.redis = connection
    app.state.discord = discord
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    for router in (health, train, jobs, job_events, read, models, admin, discord_routes, page):
        app.include_router(router.router)
    return app


app = create_app()
