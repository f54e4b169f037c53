"""The versioned model store on disk, and the pointer to the active version.

Layout under `DATA_DIR/models`:

    <model_id>/<version>/model.pt        the weights (a state dict, loaded with weights_only=True)
    <model_id>/<version>/manifest.json   manifest v1.1
    active.json                          {"model_id": ..., "version": ...}
    .incoming/                           uploads being received; never read as versions
    .trash/                              versions being deleted; never read as versions

A version appears by renaming a complete, fsynced directory into place, and disappears by being
renamed into `.trash` before it is deleted, so a reader sees a whole version or none. The active
pointer is replaced the same way (temp file, fsync, rename). Nothing here knows about torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydantic import ValidationError

from app.contracts import MANIFEST_FILE, MODEL_ID_PATTERN, VERSION_PATTERN, WEIGHTS_FILE, ManifestV1_1

ACTIVE_FILE: Final = "active.json"
INCOMING_DIR: Final = ".incoming"
TRASH_DIR: Final = ".trash"

_MODEL_ID = re.compile(MODEL_ID_PATTERN)
_VERSION = re.compile(VERSION_PATTERN)

log = logging.getLogger("app.store")


class StoreError(Exception):
    pass


class VersionNotFoundError(StoreError):
    pass


class VersionExistsError(StoreError):
    """The version is already stored with different weights (versions are immutable)."""


@dataclass(frozen=True, slots=True)
class StoredVersion:
    model_id: str
    version: str
    path: Path
    manifest: ManifestV1_1

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE


@dataclass(frozen=True, slots=True)
class ActivePointer:
    model_id: str
    version: str


def is_safe_model_id(value: str) -> bool:
    return _MODEL_ID.fullmatch(value) is not None


def is_safe_version(value: str) -> bool:
    return _VERSION.fullmatch(value) is not None


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename is durable once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: a reader sees the old content or the new, never a part."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


class ModelStore:
    """Versions of every model under one root, with bounded retention and an active pointer.

    Methods are synchronous file operations; call them off the event loop. A lock makes the
    mutating ones (commit, prune, set_active) one at a time within the process.
    """

    def __init__(self, root: Path, keep_versions: int = 5) -> None:
        self.root = root
        self.keep_versions = keep_versions
        self._lock = threading.RLock()

    def prepare(self) -> None:
        """Create the root and clear what a crash mid-upload or mid-delete left (never versions)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in (INCOMING_DIR, TRASH_DIR):
            shutil.rmtree(self.root / leftover, ignore_errors=True)

    # --- uploads ---------------------------------------------------------------------------------

    def new_incoming(self) -> Path:
        """A fresh private directory for an upload in progress; `discard` or `commit` it."""
        incoming = self.root / INCOMING_DIR
        incoming.mkdir(parents=True, exist_ok=True)
        path = incoming / uuid.uuid4().hex
        path.mkdir()
        return path

    @staticmethod
    def discard(incoming: Path) -> None:
        shutil.rmtree(incoming, ignore_errors=True)

    def commit(self, incoming: Path, manifest: ManifestV1_1, weights_sha256: str) -> tuple[StoredVersion, bool]:
        """Move a complete upload (`model.pt` already written and fsynced in `incoming`) into place.

        Writes `manifest.json` beside the weights. Returns the stored version and whether it is new;
        the same version uploaded again with the same weights is the same version (a retried upload),
        with other weights it is refused with VersionExistsError.
        """
        model_dir = self.root / manifest.model_id
        target = model_dir / manifest.version
        with self._lock:
            if target.exists():
                existing = self.get(manifest.model_id, manifest.version)
                self.discard(incoming)
                if existing.manifest.weights_sha256 != weights_sha256:
                    raise VersionExistsError(
                        f"{manifest.model_id} version {manifest.version} is already stored with other weights; "
                        "versions are immutable, give the new one a new version"
                    )
                return existing, False
            stored_manifest = manifest.model_copy(update={"weights_sha256": weights_sha256})
            write_atomic(incoming / MANIFEST_FILE, stored_manifest.model_dump_json(indent=2).encode("utf-8"))
            model_dir.mkdir(exist_ok=True)
            os.rename(incoming, target)
            fsync_path(model_dir)
            fsync_path(self.root)
            return StoredVersion(manifest.model_id, manifest.version, target, stored_manifest), True

    # --- reading ---------------------------------------------------------------------------------

    def get(self, model_id: str, version: str) -> StoredVersion:
        if not (is_safe_model_id(model_id) and is_safe_version(version)):
            raise VersionNotFoundError(f"no version {version!r} of model {model_id!r}")
        path = self.root / model_id / version
        try:
            raw = (path / MANIFEST_FILE).read_bytes()
        except FileNotFoundError as exc:
            raise VersionNotFoundError(f"no version {version!r} of model {model_id!r}") from exc
        try:
            manifest = ManifestV1_1.model_validate_json(raw)
        except ValidationError as exc:
            raise StoreError(f"stored manifest of {model_id}/{version} is unreadable: {exc}") from exc
        return StoredVersion(model_id, version, path, manifest)

    def versions(self, model_id: str | None = None) -> list[StoredVersion]:
        """Stored versions, oldest first (by the manifest's created_at); unreadable ones are skipped."""
        found: list[StoredVersion] = []
        if not self.root.is_dir():
            return found
        model_dirs = [self.root / model_id] if model_id is not None else sorted(self.root.iterdir())
        for model_dir in model_dirs:
            if not (model_dir.is_dir() and is_safe_model_id(model_dir.name)):
                continue
            for version_dir in sorted(model_dir.iterdir()):
                if not version_dir.is_dir():
                    continue
                try:
                    found.append(self.get(model_dir.name, version_dir.name))
                except StoreError as exc:
                    log.warning("skipping %s: %s", version_dir, exc)
        found.sort(key=lambda v: (v.model_id, v.manifest.created_at, v.version))
        return found

    # --- the active pointer ----------------------------------------------------------------------

    def active(self) -> ActivePointer | None:
        try:
            raw = json.loads((self.root / ACTIVE_FILE).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("active pointer unreadable: %s", exc)
            return None
        model_id = raw.get("model_id") if isinstance(raw, dict) else None
        version = raw.get("version") if isinstance(raw, dict) else None
        if not (isinstance(model_id, str) and isinstance(version, str)):
            log.error("active pointer malformed: %r", raw)
            return None
        return ActivePointer(model_id, version)

    def set_active(self, model_id: str, version: str) -> None:
        with self._lock:
            self.get(model_id, version)  # exists, or VersionNotFoundError
            body = json.dumps({"model_id": model_id, "version": version}).encode("utf-8")
            write_atomic(self.root / ACTIVE_FILE, body)

    # --- retention -------------------------------------------------------------------------------

    def prune(self, model_id: str) -> list[str]:
        """Keep the newest `keep_versions` versions of `model_id`, and the active one whatever its age."""
        with self._lock:
            active = self.active()
            versions = self.versions(model_id)
            removed: list[str] = []
            for stored in versions[: max(0, len(versions) - self.keep_versions)]:
                if active is not None and (active.model_id, active.version) == (stored.model_id, stored.version):
                    continue
                trash = self.root / TRASH_DIR
                trash.mkdir(exist_ok=True)
                gone = trash / uuid.uuid4().hex
                os.rename(stored.path, gone)
                shutil.rmtree(gone, ignore_errors=True)
                removed.append(stored.version)
            if removed:
                log.info("retention removed %d version(s) of %s: %s", len(removed), model_id, ", ".join(removed))
            return removed
