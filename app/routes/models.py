"""GET /v1/models/active: whether a model is loaded, and its manifest."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import ModelsDep

router = APIRouter(tags=["models"])


@router.get("/v1/models/active")
async def active_model(models: ModelsDep) -> dict[str, object]:
    """`model_loaded`, and the active manifest's fields when one is (`model_id`, `version`, ...)."""
    manifest = models.active_manifest()
    if manifest is None:
        return {"model_loaded": False}
    return {"model_loaded": True, **manifest.model_dump(mode="json")}
