"""Liveness, readiness, what is running, and the Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from app.contracts import MANIFEST_SCHEMA_VERSION
from app.deps import ModelsDep, RedisDep, SettingsDep
from app.errors import not_ready
from app.network import ARCHS, DEFAULT_ARCH
from app.preprocess import PREPROCESS_HASH

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(models: ModelsDep, connection: RedisDep, settings: SettingsDep) -> dict[str, str]:
    """200 once a model is loaded and reads can be answered; 503 `service_not_ready` until then."""
    manifest = models.active_manifest()
    if manifest is None or not models.is_ready():
        raise await not_ready(connection, settings.rq.queue)
    return {"status": "ready", "model_id": manifest.model_id, "version": manifest.version}


@router.get("/version")
async def version(request: Request, models: ModelsDep) -> dict[str, str | list[str] | None]:
    """What this service is; an uploader compares `preprocess_hash` before training.

    `arch` is the served model's network (null before one is loaded), `default_arch` the one training builds
    unless TRAIN__ARCH says otherwise, `archs` every arch a model may name to be served."""
    manifest = models.active_manifest()
    return {
        "service": "handwriting-ai",
        "version": request.app.version,
        "preprocess_hash": PREPROCESS_HASH,
        "arch": manifest.arch if manifest is not None else None,
        "default_arch": DEFAULT_ARCH,
        "archs": sorted(ARCHS),
        "manifest_schema_version": MANIFEST_SCHEMA_VERSION,
    }


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    return Response(content=generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
