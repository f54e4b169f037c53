"""What a run leaves on disk: `model.pt` (a state dict, loadable with weights_only=True) + `manifest.json`."""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from app.contracts import (
    MANIFEST_FILE,
    MANIFEST_SCHEMA_VERSION,
    N_CLASSES,
    WEIGHTS_FILE,
    DigitsTrainJobV1,
    ManifestV1_1,
    utc_now,
)
from app.files import write_atomic
from app.network import DEFAULT_ARCH
from app.preprocess import PREPROCESS_HASH
from worker.train import TrainOutcome

# Written into a run's directory once the API has accepted its model; only such runs are ever pruned.
UPLOADED_MARKER = "uploaded.json"


@dataclass(frozen=True)
class Artifacts:
    directory: Path
    weights_path: Path
    manifest_path: Path
    manifest: dict[str, object]

    @property
    def version(self) -> str:
        return str(self.manifest["version"])


def new_version(now: datetime) -> str:
    """Unique per run and sortable by time: 20250101T120000Z-3f9a1c2b."""
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def write_artifacts(
    out_dir: Path, job: DigitsTrainJobV1, outcome: TrainOutcome, settings_used: dict[str, object],
    *, arch: str = DEFAULT_ARCH,
) -> Artifacts:
    """Writes `out_dir/<model_id>/<version>/{model.pt, manifest.json}`; the manifest passes ManifestV1_1.

    `arch` is the network `outcome` was trained as (TRAIN__ARCH), so the API loads it as that network (a wrong
    one is refused there: the weights would not fit)."""
    created = utc_now()
    version = new_version(created)
    directory = out_dir / job.model_id / version
    directory.mkdir(parents=True, exist_ok=True)

    buf = io.BytesIO()
    torch.save(outcome.state_dict, buf)
    weights = buf.getvalue()
    manifest: dict[str, object] = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "model_id": job.model_id,
        "arch": arch,
        "n_classes": N_CLASSES,
        "version": version,
        "created_at": created.isoformat(),
        "preprocess_hash": PREPROCESS_HASH,
        "val_acc": round(outcome.val_acc, 6),
        "temperature": outcome.temperature,
        "test_acc": round(outcome.test_acc, 6),
        "epochs": job.epochs,
        "batch_size": job.batch_size,
        "lr": job.lr,
        "seed": job.seed,
        "augment": job.augment,
        "device": outcome.device,
        "train_seconds": round(outcome.seconds, 2),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "train_samples": outcome.train_samples,
        "notes": job.notes,
        "request_id": job.request_id,
        "best_epoch": outcome.best_epoch,
        "settings": settings_used,
    }
    ManifestV1_1.model_validate_json(json.dumps(manifest))  # our own output honours the contract
    weights_path = directory / WEIGHTS_FILE
    manifest_path = directory / MANIFEST_FILE
    write_atomic(weights_path, weights)
    write_atomic(manifest_path, json.dumps(manifest, indent=2).encode("utf-8"))
    return Artifacts(directory=directory, weights_path=weights_path, manifest_path=manifest_path, manifest=manifest)


def mark_uploaded(artifacts: Artifacts, status: int) -> None:
    write_atomic(artifacts.directory / UPLOADED_MARKER,
                 json.dumps({"status": status, "uploaded_at": utc_now().isoformat()}).encode("utf-8"))


def prune_artifacts(out_dir: Path, keep: int) -> int:
    """Deletes the run directories under `out_dir/<model_id>/` beyond the newest `keep` uploaded ones.

    Runs whose upload failed (or never happened) hold the only copy of their model and are kept.
    Versions sort by time (see `new_version`), so the newest are the last. Returns how many were deleted.
    """
    uploaded = sorted((marker.parent for marker in out_dir.glob(f"*/*/{UPLOADED_MARKER}")),
                      key=lambda d: d.name)
    deleted = 0
    for directory in uploaded[: max(0, len(uploaded) - keep)]:
        try:
            shutil.rmtree(directory)
        except FileNotFoundError:
            continue  # another worker sharing DATA_DIR pruned it first
        deleted += 1
    return deleted
