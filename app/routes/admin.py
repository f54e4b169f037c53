"""Admin endpoints (X-Api-Key): upload a model, list stored versions, activate one (rollback).

An upload with `activate=true` goes live only through the promotion gate (app/gate.py): a candidate
worse than the active model on the gate set is stored inactive and the answer is 200 with
`activated: false` and the gate's figures and reason; `force=true` skips the gate. Activating a
stored version by hand (a rollback) is the admin's own decision and is not gated.

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
| insufficient_storage       | 507    | the disk is full: nothing was stored, the store is unchanged  |
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from datetime import datetime
from pathlib import Path
from typing import IO, Annotated, Final

from fastapi import APIRouter, File, Form, UploadFile
from pydantic import BaseModel, ValidationError

from app.auth import ApiKeyDep, key_before_body
from app.body_limit import body_limit_route
from app.contracts import (
    MANIFEST_SCHEMA_VERSION,
    MODEL_ID_PATTERN,
    WEIGHTS_FILE,
    GateReport,
    ManifestV1_1,
    describe_errors,
)
from app.deps import GateDep, ModelsDep, SettingsDep
from app.errors import ApiError
from app.loading import CandidateError, LoadedModel
from app.preprocess import PREPROCESS_HASH
from app.store import (
    GateVerdict,
    StorageFullError,
    StoredVersion,
    VersionExistsError,
    VersionNotFoundError,
    is_safe_model_id,
    storage_errors,
)
from config.settings import ApiSettings, Settings

router = APIRouter(tags=["admin"])

_MULTIPART_OVERHEAD: Final = 64 * 1024
_COPY_CHUNK: Final = 1024 * 1024


class UploadResponse(BaseModel):
    model_id: str
    version: str
    sha256: str
    activated: bool
    gate: GateReport | None = None  # what the promotion gate decided (only when activation was asked for)


class ActivateResponse(BaseModel):
    model_id: str
    version: str
    activated: bool


class StoredVersionOut(BaseModel):
    model_id: str
    version: str
    active: bool
    received_at: datetime  # when this server stored it (retention's order), not the manifest's created_at
    activated_at: datetime | None  # when it last went live
    gate: GateVerdict | None  # the promotion gate's verdict: passed | refused | forced
    manifest: dict[str, object]


class ModelsListing(BaseModel):
    active: dict[str, str] | None
    versions: list[StoredVersionOut]


def _refuse(code: str, message: str, status: int = 400) -> ApiError:
    return ApiError(status, code, message)


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


def _upload_cap(settings: Settings) -> int:
    return settings.api.manifest_max_bytes + settings.api.model_max_bytes + _MULTIPART_OVERHEAD


def check_sizes(api: ApiSettings, manifest: UploadFile, model: UploadFile) -> None:
    for name, part, cap in (("manifest", manifest, api.manifest_max_bytes), ("model", model, api.model_max_bytes)):
        if (part.size or 0) > cap:
            raise _refuse(
                "too_large",
                f"the {name} part is {part.size} bytes, over its limit of {cap} bytes "
                f"(caps: manifest {api.manifest_max_bytes} bytes, model {api.model_max_bytes} bytes)",
                413,
            )


def validate_manifest(model_id: str, raw: bytes) -> ManifestV1_1:
    """The checks that need no weights: the form's model_id, then the manifest against it and this service."""
    if not is_safe_model_id(model_id):
        raise _refuse(
            "invalid_model_id",
            f"model_id {model_id[:80]!r} is not a safe name: 1-64 of a-z 0-9 _ . - starting with a letter or digit",
        )
    manifest = parse_manifest(raw)
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
    return manifest


def write_weights(source: IO[bytes], dest: Path) -> str:
    """Copy the spooled upload to `dest` (fsynced), returning its sha256. Runs off the event loop."""
    digest = hashlib.sha256()
    source.seek(0)
    with storage_errors("the model's weights"), dest.open("wb") as out:
        while chunk := source.read(_COPY_CHUNK):
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


async def upload_model(
    manifest: Annotated[UploadFile, File(description="manifest.json (v1.1)")],
    model: Annotated[UploadFile, File(description="the weights: a state dict (torch.save)")],
    models: ModelsDep,
    gate: GateDep,
    settings: SettingsDep,
    _: ApiKeyDep,
    # Not required in the schema: FastAPI reads an empty form field as absent, and "" must be invalid_model_id.
    model_id: Annotated[str, Form(description=f"matches {MODEL_ID_PATTERN}")] = "",
    activate: Annotated[bool, Form(description="serve it, if it passes the promotion gate")] = True,
    force: Annotated[bool, Form(description="with activate: serve it without the promotion gate")] = False,
) -> UploadResponse:
    check_sizes(settings.api, manifest, model)
    doc = validate_manifest(model_id, await manifest.read())
    if not model.size:
        raise _refuse("invalid_weights", "the model file is empty")
    store = models.store
    report: GateReport | None = None

    async def promote(candidate: LoadedModel, active: LoadedModel | None) -> bool:
        nonlocal report
        report = await gate.decide(candidate, active, force=force)
        return report.activated

    try:
        incoming = await asyncio.to_thread(store.new_incoming)
    except StorageFullError as exc:
        raise _refuse("insufficient_storage", str(exc), 507) from exc
    try:
        sha256 = await asyncio.to_thread(write_weights, model.file, incoming / WEIGHTS_FILE)
        if doc.weights_sha256 is not None and doc.weights_sha256 != sha256:
            raise _refuse(
                "checksum_mismatch",
                f"the manifest says the weights' sha256 is {doc.weights_sha256}, the file's is {sha256}",
            )
        stored, activated = await models.add_version(incoming, doc, sha256, activate=activate, promote=promote)
    except CandidateError as exc:
        raise _refuse(exc.code, exc.message) from exc
    except VersionExistsError as exc:
        raise _refuse("version_exists", str(exc), 409) from exc
    except StorageFullError as exc:
        raise _refuse("insufficient_storage", f"{exc}; nothing was stored", 507) from exc
    finally:
        # Gone already when stored (renamed into place) or refused inside add_version.
        await asyncio.to_thread(store.discard, incoming)
    if report is not None:
        await asyncio.to_thread(store.record_gate, stored.model_id, stored.version, report.decision)
    return UploadResponse(model_id=stored.model_id, version=stored.version, sha256=sha256, activated=activated,
                          gate=report)


router.add_api_route(
    "/v1/admin/models/upload",
    upload_model,
    methods=["POST"],
    response_model=UploadResponse,
    route_class_override=body_limit_route(_upload_cap, multipart=True, before_body=key_before_body),
)


def version_out(stored: StoredVersion, active: bool) -> StoredVersionOut:
    record = stored.record
    return StoredVersionOut(model_id=stored.model_id, version=stored.version, active=active,
                            received_at=record.received_at, activated_at=record.activated_at, gate=record.gate,
                            manifest=stored.manifest.model_dump(mode="json"))


@router.get("/v1/admin/models", response_model=ModelsListing)
async def list_models(models: ModelsDep, _: ApiKeyDep) -> ModelsListing:
    """Stored versions, the one received last first."""
    store = models.store
    versions = await asyncio.to_thread(store.versions)
    active = await asyncio.to_thread(store.active)
    listed = [
        version_out(v, active is not None and (active.model_id, active.version) == (v.model_id, v.version))
        for v in sorted(versions, key=lambda v: (v.record.received_at, v.version), reverse=True)
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
    except StorageFullError as exc:
        raise _refuse("insufficient_storage", f"{exc}; the active version is unchanged", 507) from exc
    except CandidateError as exc:
        raise _refuse(exc.code, f"version {version} of {model_id} cannot be served: {exc.message}", 409) from exc
    return ActivateResponse(model_id=stored.model_id, version=stored.version, activated=True)
