"""Admin endpoints (X-Api-Key): upload a model, list stored versions, activate one (rollback).

Refusals answer 4xx with a stable `code`, and leave the store and the served model untouched:

| code                       | status | when                                                          |
|----------------------------|--------|---------------------------------------------------------------|
| unauthorized               | 401    | the key is missing or wrong, or none is configured            |
| too_large                  | 413    | manifest over API__MANIFEST_MAX_BYTES, model over API__MODEL_MAX_BYTES |
| malformed_multipart        | 400    | not multipart/form-data, or a required part is missing        |
| invalid_model_id           | 400    | the form's model_id is not a safe name                        |
| invalid_manifest           | 400    | the manifest is not JSON or not a valid manifest v1.1         |
| unsupported_schema_version | 400    | schema_version is not "v1.1"                                  |
| preprocess_mismatch        | 400    | preprocess_hash differs from this service's (GET /version)    |
| model_id_mismatch          | 400    | the manifest's model_id differs from the form's               |
| checksum_mismatch          | 400    | the manifest's weights_sha256 differs from the file's         |
| invalid_weights            | 400    | not loadable with torch.load(weights_only=True)               |
| unsupported_arch           | 400    | arch or n_classes is not what this service serves             |
| weights_mismatch           | 400    | the weights do not fit the arch                               |
| smoke_test_failed          | 400    | a prediction with the candidate failed                        |
| version_exists             | 409    | the version is already stored with other weights              |
| not_found                  | 404    | (activate) no such stored version                             |
"""

from __future__ import annotations

import asyncio
import json
from typing import Final

from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError

from app.auth import ApiKeyDep
from app.contracts import MANIFEST_SCHEMA_VERSION, MODEL_ID_PATTERN, WEIGHTS_FILE, ManifestV1_1, describe_errors
from app.deps import ModelsDep, SettingsDep
from app.errors import ApiError
from app.multipart import (
    BodyTooLargeError,
    FileSpec,
    Form,
    MalformedMultipartError,
    openapi_multipart,
    parse_flag,
    read_multipart,
)
from app.preprocess import PREPROCESS_HASH
from app.routes.read import check_content_length
from app.serving import CandidateError
from app.store import VersionExistsError, VersionNotFoundError, fsync_path, is_safe_model_id

router = APIRouter(tags=["admin"])

_MULTIPART_OVERHEAD: Final = 64 * 1024

_OPENAPI_BODY: Final = openapi_multipart(
    ["model_id", "manifest", "model"],
    {
        "model_id": {"type": "string", "pattern": MODEL_ID_PATTERN},
        "activate": {"type": "boolean", "default": True},
        "manifest": {"type": "string", "format": "binary", "description": "manifest.json (v1.1)"},
        "model": {"type": "string", "format": "binary", "description": "state dict (torch.save)"},
    },
)


class UploadResponse(BaseModel):
    model_id: str
    version: str
    sha256: str
    activated: bool


class ActivateResponse(BaseModel):
    model_id: str
    version: str
    activated: bool


class StoredVersionOut(BaseModel):
    model_id: str
    version: str
    active: bool
    manifest: dict[str, object]


class ModelsListing(BaseModel):
    active: dict[str, str] | None
    versions: list[StoredVersionOut]


def _refuse(code: str, message: str, status: int = 400) -> ApiError:
    return ApiError(status, code, message)


def parse_activate(value: str | None) -> bool:
    flag = parse_flag(value if value is not None else "true")
    if flag is not None:
        return flag
    raise _refuse("invalid_request", f"activate must be true or false, not {value!r}")


def parse_manifest(raw: bytes) -> ManifestV1_1:
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _refuse("invalid_manifest", f"the manifest is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise _refuse("invalid_manifest", "the manifest must be a JSON object")
    schema = document.get("schema_version")
    if schema != MANIFEST_SCHEMA_VERSION:
        raise _refuse(
            "unsupported_schema_version",
            f"manifest schema_version is {schema!r}; this service accepts only {MANIFEST_SCHEMA_VERSION!r}",
        )
    try:
        return ManifestV1_1.model_validate_json(raw)
    except ValidationError as exc:
        problems = describe_errors(exc.errors())
        raise _refuse("invalid_manifest", f"the manifest is not a valid manifest v1.1: {problems}") from exc


def validate_upload(form: Form) -> tuple[ManifestV1_1, str, bool]:
    """The checks that need no weights loaded: returns the manifest, the weights' sha256, activate."""
    model_id = form.fields.get("model_id")
    if model_id is None:
        raise _refuse("malformed_multipart", "the form field 'model_id' is missing")
    if not is_safe_model_id(model_id):
        raise _refuse(
            "invalid_model_id",
            f"model_id {model_id[:80]!r} is not a safe name: 1-64 of a-z 0-9 _ . - starting with a letter or digit",
        )
    activate = parse_activate(form.fields.get("activate"))
    manifest_part, model_part = form.files.get("manifest"), form.files.get("model")
    if manifest_part is None or model_part is None:
        raise _refuse("malformed_multipart", "expected two file parts: 'manifest' (JSON) and 'model' (weights)")
    manifest = parse_manifest(manifest_part.data)
    if manifest.preprocess_hash != PREPROCESS_HASH:
        raise _refuse(
            "preprocess_mismatch",
            f"the model was trained on other preprocessing (preprocess_hash {manifest.preprocess_hash[:12]}...); "
            f"this service's is {PREPROCESS_HASH} (GET /version)",
        )
    if manifest.model_id != model_id:
        raise _refuse(
            "model_id_mismatch", f"the manifest's model_id {manifest.model_id!r} differs from the form's {model_id!r}"
        )
    if model_part.size == 0:
        raise _refuse("invalid_weights", "the model file is empty")
    if manifest.weights_sha256 is not None and manifest.weights_sha256 != model_part.sha256:
        raise _refuse(
            "checksum_mismatch",
            f"the manifest says the weights' sha256 is {manifest.weights_sha256}, the file's is {model_part.sha256}",
        )
    return manifest, model_part.sha256, activate


@router.post("/v1/admin/models/upload", response_model=UploadResponse, openapi_extra=_OPENAPI_BODY)
async def upload_model(request: Request, models: ModelsDep, settings: SettingsDep, _: ApiKeyDep) -> UploadResponse:
    api = settings.api
    max_total = api.manifest_max_bytes + api.model_max_bytes + _MULTIPART_OVERHEAD
    check_content_length(request, max_total)
    store = models.store
    incoming = await asyncio.to_thread(store.new_incoming)
    try:
        try:
            form = await read_multipart(
                request.headers.get("content-type"),
                request.stream(),
                files={
                    "manifest": FileSpec(max_bytes=api.manifest_max_bytes),
                    "model": FileSpec(max_bytes=api.model_max_bytes, dest=incoming / WEIGHTS_FILE),
                },
                max_total=max_total,
            )
        except BodyTooLargeError as exc:
            raise _refuse(
                "too_large",
                f"{exc.message} (caps: manifest {api.manifest_max_bytes} bytes, model {api.model_max_bytes} bytes)",
                413,
            ) from exc
        except MalformedMultipartError as exc:
            raise _refuse("malformed_multipart", exc.message) from exc
        manifest, sha256, activate = validate_upload(form)
        await asyncio.to_thread(fsync_path, incoming / WEIGHTS_FILE)
        stored, activated = await models.add_version(incoming, manifest, sha256, activate=activate)
    except CandidateError as exc:
        raise _refuse(exc.code, exc.message) from exc
    except VersionExistsError as exc:
        raise _refuse("version_exists", str(exc), 409) from exc
    finally:
        # Gone already when stored (renamed into place) or refused inside add_version.
        await asyncio.to_thread(store.discard, incoming)
    return UploadResponse(model_id=stored.model_id, version=stored.version, sha256=sha256, activated=activated)


@router.get("/v1/admin/models", response_model=ModelsListing)
async def list_models(models: ModelsDep, _: ApiKeyDep) -> ModelsListing:
    store = models.store
    versions = await asyncio.to_thread(store.versions)
    active = await asyncio.to_thread(store.active)
    listed = [
        StoredVersionOut(
            model_id=v.model_id,
            version=v.version,
            active=active is not None and (active.model_id, active.version) == (v.model_id, v.version),
            manifest=v.manifest.model_dump(mode="json"),
        )
        for v in sorted(versions, key=lambda v: (v.manifest.created_at, v.version), reverse=True)
    ]
    return ModelsListing(
        active={"model_id": active.model_id, "version": active.version} if active is not None else None,
        versions=listed,
    )


@router.post("/v1/admin/models/{model_id}/versions/{version}/activate", response_model=ActivateResponse)
async def activate_version(model_id: str, version: str, models: ModelsDep, _: ApiKeyDep) -> ActivateResponse:
    try:
        stored = await models.activate(model_id, version)
    except VersionNotFoundError as exc:
        raise _refuse("not_found", str(exc), 404) from exc
    except CandidateError as exc:
        raise _refuse(exc.code, f"version {version} of {model_id} cannot be served: {exc.message}", 409) from exc
    return ActivateResponse(model_id=stored.model_id, version=stored.version, activated=True)
