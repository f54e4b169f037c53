"""A crash at any step of a write leaves what was there whole: stored versions, the active pointer, artifacts.

Each operation runs again and again on a fresh copy of the same state, dying at its first change to
the file system, then its second, ... until it completes (tests/crash_support.py). After every crash
the state is read back as a restart would: every stored version is whole, the pointer names a whole
version, and the restarted API answers with the model the pointer names.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
from pathlib import Path

from app.contracts import MANIFEST_FILE, WEIGHTS_FILE, DigitsTrainJobV1, ManifestV1_1
from app.files import fsync_path
from app.inference import forward_probs
from app.loading import load_candidate
from app.preprocess import preprocess
from app.store import ActivePointer, ModelStore
from tests.crash_support import crash_at_every_step
from tests.serving_support import (
    MODEL_ID,
    digit_png,
    install_model,
    make_settings,
    manifest,
    model_state,
    running_app,
    weights_bytes,
)
from worker.artifacts import write_artifacts
from worker.train import TrainOutcome

PNG = digit_png()
DIGIT_OF = {"v1": 1, "v2": 2}  # each stored version's model always answers its own digit


Fingerprint = tuple[tuple[str, str], ...]


class Restarts:
    """Start the real API on a data directory (a restart) and read a digit: (digit, version that answered).

    Memoised by what the API reads at start (the pointer and every stored file, by content), so each
    distinct state the crashes leave is served once.
    """

    def __init__(self) -> None:
        self.answers: dict[Fingerprint, tuple[int, str]] = {}

    def read(self, data_dir: Path, state: Fingerprint) -> tuple[int, str]:
        if state not in self.answers:
            self.answers[state] = asyncio.run(self._read(data_dir))
        return self.answers[state]

    @staticmethod
    async def _read(data_dir: Path) -> tuple[int, str]:
        async with running_app(make_settings(data_dir)) as client:
            response = await client.post("/v1/read", files={"file": ("d.png", PNG, "image/png")})
            assert response.status_code == 200, response.text
            return int(response.json()["digit"]), str(response.json()["version"])


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_whole_store(data_dir: Path, pristine: Path) -> tuple[str, Fingerprint]:
    """Every version on disk is whole, the earlier ones unchanged, and the pointer names a whole one.

    Returns the active version and the state's fingerprint (the pointer and every stored file by content).
    """
    store = ModelStore(data_dir / "models")
    store.prepare()
    on_disk = sorted(p.name for p in (store.root / MODEL_ID).iterdir())
    assert set(on_disk) <= set(DIGIT_OF), on_disk
    state: list[tuple[str, str]] = []
    for version in on_disk:
        stored = store.get(MODEL_ID, version)  # the manifest is there and valid
        weights_sha = sha256_of(stored.weights_path)
        assert weights_sha == stored.manifest.weights_sha256, version
        manifest_sha = sha256_of(stored.path / "manifest.json")
        state += [(f"{version}/model.pt", weights_sha), (f"{version}/manifest.json", manifest_sha)]
    for version in (p.name for p in (pristine / "models" / MODEL_ID).iterdir()):
        for name in ("model.pt", "manifest.json"):
            assert (f"{version}/{name}", _pristine_sha(pristine / "models" / MODEL_ID / version / name)) in state
    pointer = store.active()
    assert pointer is not None, "the active pointer is unreadable"
    assert (pointer.model_id, pointer.version) in {(MODEL_ID, v) for v in on_disk}
    state.append(("active.json", sha256_of(store.root / "active.json")))
    return pointer.version, tuple(state)


@functools.cache
def _pristine_sha(path: Path) -> str:
    return sha256_of(path)


V2_SHA = hashlib.sha256(weights_bytes(2)).hexdigest()


def upload_v2(data_dir: Path) -> None:
    """What an activating upload does to the store, in the order POST /v1/admin/models/upload does it."""
    store = ModelStore(data_dir / "models")
    incoming = store.new_incoming()
    weights = weights_bytes(2)
    (incoming / WEIGHTS_FILE).write_bytes(weights)
    fsync_path(incoming / WEIGHTS_FILE)
    doc = ManifestV1_1.model_validate_json(json.dumps(manifest(version="v2")))
    stored, _ = store.commit(incoming, doc, hashlib.sha256(weights).hexdigest())
    store.set_active(stored.model_id, stored.version)
    store.prune(stored.model_id)


def test_an_interrupted_upload_leaves_the_served_version_whole_and_can_be_retried(
    tmp_path: Path,
) -> None:
    pristine = tmp_path / "pristine"
    install_model(pristine, "v1", forced_digit=1)
    restarts: list[tuple[str, str, int, str]] = []
    api = Restarts()

    def after_crash(data_dir: Path, step: str) -> None:
        pointer, state = assert_whole_store(data_dir, pristine)
        digit, version = api.read(data_dir, state)
        restarts.append((step, pointer, digit, version))
        assert (digit, version) == (DIGIT_OF[pointer], pointer), step
        upload_v2(data_dir)  # the uploader retries: it goes through
        store = ModelStore(data_dir / "models")
        assert store.active() == ActivePointer(MODEL_ID, "v2"), step
        assert store.get(MODEL_ID, "v2").manifest.weights_sha256 == V2_SHA, step

    steps = crash_at_every_step(pristine, tmp_path, upload_v2, after_crash)
    # The crashes covered the weights, the manifest, the rename into place and the pointer's replacement.
    assert any(s.startswith("write models/.incoming/") and s.endswith("/model.pt") for s in steps), steps
    # The manifest is written beside the weights (a temp file renamed into place, or written directly).
    assert any(s.startswith(("write ", "replace ", "rename ")) and s.endswith("/manifest.json") for s in steps), steps
    assert any(s.startswith("rename ") and s.endswith(f"-> models/{MODEL_ID}/v2") for s in steps), steps
    assert any(s.startswith("replace ") and s.endswith("-> models/active.json") for s in steps), steps
    assert len(restarts) == len(steps)
    # Before the pointer moved, a restart serves v1; after, v2.
    assert restarts[0][1:] == ("v1", 1, "v1") and restarts[-1][1:] == ("v2", 2, "v2"), restarts


def test_a_rollback_interrupted_at_any_step_leaves_a_readable_pointer(tmp_path: Path) -> None:
    pristine = tmp_path / "pristine"
    install_model(pristine, "v1", forced_digit=1)
    install_model(pristine, "v2", forced_digit=2)  # v2 active; roll back to v1

    def roll_back(data_dir: Path) -> None:
        ModelStore(data_dir / "models").set_active(MODEL_ID, "v1")

    api = Restarts()

    def after_crash(data_dir: Path, step: str) -> None:
        pointer, state = assert_whole_store(data_dir, pristine)
        assert api.read(data_dir, state) == (DIGIT_OF[pointer], pointer), step

    steps = crash_at_every_step(pristine, tmp_path, roll_back, after_crash)
    assert any(s.startswith("write ") for s in steps), steps
    assert any(s.startswith("replace ") and s.endswith("-> models/active.json") for s in steps), steps


# --- the worker's artifacts --------------------------------------------------------------------------


def outcome(digit: int) -> TrainOutcome:
    return TrainOutcome(state_dict=model_state(digit), val_acc=0.5, test_acc=0.5, best_epoch=1, device="cpu",
                        seconds=1.0, train_samples=16, augment_seconds=0.0, history=[])


def read_with(weights: Path, doc: ManifestV1_1) -> int:
    """Load artifacts as the API would (weights_only, arch checked, smoke test) and read the digit."""
    model = load_candidate(weights, doc)
    return int(forward_probs(model.net, preprocess(PNG).tensor, 1.0, tta=False).argmax())


def test_artifacts_interrupted_at_any_step_are_whole_or_absent_and_earlier_runs_untouched(tmp_path: Path) -> None:
    job = DigitsTrainJobV1(request_id="r-crash", user_id=1, model_id="crash_m")
    # What a complete second run writes (the bytes are the same every time for the same weights).
    complete = write_artifacts(tmp_path / "complete", job, outcome(5), {})
    complete_doc = ManifestV1_1.model_validate_json(complete.manifest_path.read_bytes())
    assert read_with(complete.weights_path, complete_doc) == 5
    whole_weights = complete.weights_path.read_bytes()

    pristine = tmp_path / "pristine"
    earlier = write_artifacts(pristine, job, outcome(3), {})
    assert read_with(earlier.weights_path, ManifestV1_1.model_validate_json(earlier.manifest_path.read_bytes())) == 3
    earlier_files = {p.relative_to(pristine): p.read_bytes() for p in (earlier.weights_path, earlier.manifest_path)}

    def second_run(out_dir: Path) -> None:
        write_artifacts(out_dir, job, outcome(5), {})

    def after_crash(out_dir: Path, step: str) -> None:
        for path, data in earlier_files.items():  # the earlier run's files, byte for byte (read above)
            assert (out_dir / path).read_bytes() == data, step
        runs = [p for p in (out_dir / "crash_m").iterdir() if p.is_dir() and p.name != earlier.version]
        assert len(runs) <= 1, runs
        for run in runs:
            weights, doc_path = run / WEIGHTS_FILE, run / MANIFEST_FILE
            if weights.exists():  # whole: the bytes a complete run writes, which load and read a 5
                assert weights.read_bytes() == whole_weights, step
            if doc_path.exists():  # a manifest only ever stands beside the whole weights it describes
                doc = ManifestV1_1.model_validate_json(doc_path.read_bytes())
                assert weights.exists(), step
                assert hashlib.sha256(weights.read_bytes()).hexdigest() == doc.weights_sha256, step

    steps = crash_at_every_step(pristine, tmp_path, second_run, after_crash)
    assert any(s.startswith("write ") and "model.pt" in s for s in steps), steps
    assert any(s.startswith("write ") and "manifest.json" in s for s in steps), steps


def test_the_crash_harness_sees_an_in_place_write_break_the_file(tmp_path: Path) -> None:
    """The harness itself: a plain write_bytes over a file, crashed mid-write, leaves half of it."""
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    (pristine / "f.json").write_text(json.dumps({"a": 1, "b": 2}))
    broken: list[str] = []

    def overwrite(d: Path) -> None:
        (d / "f.json").write_text(json.dumps({"a": 3, "b": 4}))

    def after_crash(d: Path, step: str) -> None:
        broken.append((d / "f.json").read_text())

    steps = crash_at_every_step(pristine, tmp_path, overwrite, after_crash)
    assert steps == ["write f.json"] and broken == ['{"a": 3,']
