"""Upload a run's artifacts to the API's admin endpoint, retrying what is worth retrying.

Connection errors, timeouts and 5xx are retried with exponential backoff (capped, bounded by the attempts);
a 4xx is the API refusing this model, so it is final at once. A 507 (the API's disk is full) does not clear
in seconds: its backoff starts at INSUFFICIENT_STORAGE_BACKOFF_S, so the 45 MB are not sent again at once.
A `Retry-After` in seconds is honoured, within the cap.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import httpx
from pydantic import ValidationError

from app.contracts import MANIFEST_FILE, WEIGHTS_FILE, GateReport
from worker.artifacts import Artifacts

log = logging.getLogger(__name__)

UPLOAD_PATH: Final = "/v1/admin/models/upload"
INSUFFICIENT_STORAGE: Final = 507
INSUFFICIENT_STORAGE_BACKOFF_S: Final = 30.0


class UploadError(Exception):
    """The upload failed for good; the message says why."""


@dataclass(frozen=True)
class UploadResult:
    activated: bool
    status: int
    body: dict[str, object]
    model_bytes: int
    manifest_bytes: int
    gate: GateReport | None = None  # the API's promotion gate: whether and why the model went live


def _gate_of(body: dict[str, object]) -> GateReport | None:
    try:
        return GateReport.model_validate(body["gate"]) if body.get("gate") is not None else None
    except ValidationError as exc:
        log.warning("ignoring the upload answer's unreadable gate report: %s", exc)
        return None


def _describe(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    if isinstance(body, dict) and "message" in body:
        return f"HTTP {response.status_code} {body.get('code', '')}: {body['message']}"
    return f"HTTP {response.status_code}: {str(body)[:300]}"


def _retry_after(response: httpx.Response) -> float | None:
    try:
        value = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None  # absent, or an HTTP date: the exponential backoff stands
    return value if value >= 0 else None


def upload_artifacts(
    artifacts: Artifacts,
    base_url: str,
    api_key: str,
    *,
    attempts: int = 6,
    backoff_s: float = 2.0,
    timeout_s: float = 120.0,
    max_backoff_s: float = 300.0,
    sleep: Callable[[float], None] = time.sleep,
) -> UploadResult:
    url = base_url.rstrip("/") + UPLOAD_PATH
    manifest_bytes = artifacts.manifest_path.read_bytes()
    weights_bytes = artifacts.weights_path.read_bytes()
    model_id = str(artifacts.manifest["model_id"])
    last_error = "no attempt made"
    base, retry_after = backoff_s, None
    with httpx.Client(timeout=timeout_s) as client:
        for attempt in range(1, attempts + 1):
            try:
                response = client.post(
                    url,
                    headers={"X-Api-Key": api_key},
                    data={"model_id": model_id, "activate": "true"},
                    files={
                        "manifest": (MANIFEST_FILE, manifest_bytes, "application/json"),
                        "model": (WEIGHTS_FILE, weights_bytes, "application/octet-stream"),
                    },
                )
            except httpx.TransportError as exc:  # connection refused/reset, DNS, timeouts
                last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                retry_after = None
            else:
                if response.status_code < 300:
                    try:
                        body = response.json()
                    except (ValueError, json.JSONDecodeError):
                        body = {}
                    body = body if isinstance(body, dict) else {}
                    activated = body.get("activated", True)
                    return UploadResult(activated=activated is True, status=response.status_code, body=body,
                                        model_bytes=len(weights_bytes), manifest_bytes=len(manifest_bytes),
                                        gate=_gate_of(body))
                last_error = _describe(response)
                if response.status_code < 500:
                    raise UploadError(f"the API refused the model: {last_error}")
                if response.status_code == INSUFFICIENT_STORAGE:
                    base = max(base, INSUFFICIENT_STORAGE_BACKOFF_S)
                retry_after = _retry_after(response)
            if attempt < attempts:
                delay = min(max_backoff_s, max(base * 2 ** (attempt - 1), retry_after or 0.0))
                log.warning("upload attempt %d/%d to %s failed (%s); retrying in %.1fs",
                            attempt, attempts, url, last_error, delay)
                sleep(delay)
    raise UploadError(f"upload to {url} failed after {attempts} attempts: {last_error}")
