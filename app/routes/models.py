"""GET /v1/models/active: whether a model is loaded, its manifest, and when it went live."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from app.deps import ModelsDep
from app.store import StoreError

router = APIRouter(tags=["models"])


@router.get("/v1/models/active")
async def active_model(models: ModelsDep) -> dict[str, object]:
    """`model_loaded`, and the active manifest's fields when one is (`model_id`, `version`, ...), with
    `activated_at` (when it last went live) and `received_at` (when this server stored it)."""
    manifest = models.active_manifest()
    if manifest is None:
        return {"model_loaded": False}
    try:
        record = await asyncio.to_thread(models.store.record, manifest.model_id, manifest.version)
    except StoreError:  # served, but its files went away under us: the manifest still says what answers
        lifecycle: dict[str, object] = {"activated_at": None, "received_at": None}
    else:
        lifecycle = record.model_dump(mode="json", include={"activated_at", "received_at"})
    return {"model_loaded": True, **manifest.model_dump(mode="json"), **lifecycle}
