"""The promotion gate: a candidate model goes live only if it is not worse than the model in service.

Both are measured on one fixed gate set that the API owns, never on what the uploader claims (the
manifest's val_acc decides nothing): MNIST *test* digits drawn deterministically (seeded), half as they
ship and half as photo-like renders of them (`photo_view`), every image through the real preprocessing
(`app.preprocess`), as `/v1/read` would see it. The set is built once and cached under `DATA_DIR/gate` as
numpy arrays (no pickle) with their sha256; a damaged cache is rebuilt. A model's accuracy on the set is
cached per weights (sha256), so the active model is measured once per version.

The measurement runs in the gate's own thread at a low CPU priority (nice 10: about a tenth of a core that
reads keep busy), never on the event loop or the inference thread: reads keep their latency while a gate
runs, and a gate still finishes under sustained reads (at nice 19 it starved and the upload timed out).

Decision (`API__GATE_TOLERANCE`, in accuracy points): activate when
candidate >= active - tolerance; otherwise the version is stored inactive. With no active model the
candidate has nothing to beat; `force` activates without measuring. If the set cannot be built, the
gate refuses (fails closed) and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import torch

from app.contracts import GateDecision, GateReport
from app.inference import forward_probs
from app.mnist import FULL_TEST, I64, SIDE, U8, MnistUnavailableError, load_raw
from app.network import available_cores
from app.observability import GATE_DECISIONS
from app.photo import CONDITIONS, RENDERER_VERSION, render_photo
from app.preprocess import PREPROCESS_HASH, PreprocessError, preprocess, preprocess_gray, to_tensor
from app.serving import LoadedModel
from app.store import write_atomic
from config.settings import Settings

log = logging.getLogger("app.gate")

GATE_RECIPE: Final = "gate-v1"  # change it when the way the set is drawn changes: a new set, new scores
GATE_SEED: Final = 1129
_BATCH: Final = 128
_NICE: Final = 10

@dataclass(frozen=True)
class Measured:
    candidate_acc: float
    active_acc: float
    active_version: str
    images: int
    seconds: float


@dataclass(frozen=True)
class GateSet:
    images: U8  # (N, 28, 28) preprocessed, white ink on black: what the network sees
    labels: I64
    key: str  # names this set: its recipe, size and preprocessing


def gate_key(size: int) -> str:
    recipe = f"{GATE_RECIPE}|size={size}|preprocess={PREPROCESS_HASH}|photo={photo_recipe()}"
    return hashlib.sha256(recipe.encode("utf-8")).hexdigest()[:16]


def photo_recipe() -> str:
    """What the photo-like half of the set is made with (part of the set's key)."""
    return f"app.photo v{RENDERER_VERSION}: {','.join(CONDITIONS)}"


def photo_view(digit: U8, index: int) -> U8 | None:
    """A photo-like render of a raw MNIST digit (`app.photo`, the conditions taken in turn, its own seeded
    rng) read back through the real preprocessing, as `/v1/read` would see the file; None when
    preprocessing refuses it (the plain digit then takes its place)."""
    rng = np.random.default_rng([GATE_SEED, index])
    data = render_photo(digit, CONDITIONS[index % len(CONDITIONS)], rng)
    try:
        return preprocess(data).preview
    except PreprocessError:
        return None


def _plain_view(digit: U8) -> U8:
    try:
        return preprocess_gray(digit, invert=False).preview
    except PreprocessError:
        return digit  # as the training data does: the network sees what /v1/read would refuse


def build_gate_set(size: int) -> GateSet:
    """Draw `size` test digits (seeded) and preprocess them; the second half as photo-like renders."""
    _, _, test_x, test_y = load_raw()
    picks = np.random.default_rng(GATE_SEED).permutation(FULL_TEST)[: min(size, FULL_TEST)]
    images: list[U8] = []
    labels: list[int] = []
    half = len(picks) // 2
    for n, index in enumerate(picks):
        view = photo_view(test_x[index], n) if n >= half else None
        images.append(view if view is not None else _plain_view(test_x[index]))
        labels.append(int(test_y[index]))
    return GateSet(np.stack(images).astype(np.uint8), np.asarray(labels, dtype=np.int64), gate_key(size))


def _digest(images: U8, labels: I64) -> str:
    return hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()


def save_gate_set(path: Path, gate_set: GateSet) -> None:
    buf = io.BytesIO()
    checksum = np.frombuffer(bytes.fromhex(_digest(gate_set.images, gate_set.labels)), dtype=np.uint8)
    np.savez(buf, images=gate_set.images, labels=gate_set.labels, sha256=checksum)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buf.getvalue())


def load_gate_set(path: Path, key: str) -> GateSet | None:
    """The cached set, or None when it is missing, unreadable or fails its checksum."""
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels, checksum = z["images"], z["labels"], z["sha256"]
    except FileNotFoundError:
        return None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        log.warning("ignoring unreadable gate set %s: %s", path, exc)
        return None
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (SIDE, SIDE) or len(labels) != len(images):
        log.warning("ignoring misshapen gate set %s", path)
        return None
    if checksum.dtype != np.uint8 or checksum.tobytes().hex() != _digest(images, labels.astype(np.int64)):
        log.warning("ignoring gate set %s: its checksum does not match its content", path)
        return None
    return GateSet(images, labels.astype(np.int64), key)


def accuracy(net: torch.nn.Module, gate_set: GateSet) -> float:
    """Share of the set the network reads right (fp32, no test-time augmentation: both models alike)."""
    correct = 0
    labels = torch.from_numpy(gate_set.labels)
    for start in range(0, len(gate_set.images), _BATCH):
        probs = forward_probs(net, to_tensor(gate_set.images[start : start + _BATCH]), 1.0, tta=False)
        correct += int((probs.argmax(dim=1) == labels[start : start + _BATCH]).sum())
    return correct / len(gate_set.images)


def _background_thread(threads: int) -> None:
    """The gate's thread (and the torch threads it starts, which inherit it) runs at a low priority (_NICE)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)
    torch.set_num_threads(threads)


def _points(fraction: float) -> str:
    return f"{fraction * 100:.2f}%"


class PromotionGate:
    """Decides whether a candidate may replace the model in service. One decision at a time."""

    def __init__(self, settings: Settings) -> None:
        self.directory = settings.gate_dir
        self.size = settings.api.gate_size
        self.tolerance_points = settings.api.gate_tolerance
        self.threads = settings.api.torch_threads or available_cores()
        self._pool: ThreadPoolExecutor | None = None
        self._set: GateSet | None = None
        self._scores: dict[tuple[str, str], float] = {}

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gate",
                                            initializer=_background_thread, initargs=(self.threads,))
        return self._pool

    def _report(self, decision: GateDecision, reason: str, measured: Measured | None = None) -> GateReport:
        GATE_DECISIONS.labels(decision=decision).inc()
        figures = {} if measured is None else {
            "candidate_acc": round(measured.candidate_acc, 6), "active_acc": round(measured.active_acc, 6),
            "active_version": measured.active_version, "images": measured.images,
            "seconds": round(measured.seconds, 3),
        }
        return GateReport.model_validate({"decision": decision, "activated": decision != "refused", "reason": reason,
                                          "tolerance_points": self.tolerance_points, **figures})

    async def decide(self, candidate: LoadedModel, active: LoadedModel | None, *, force: bool) -> GateReport:
        """Whether `candidate` may replace `active` (the model in service, None when there is none)."""
        if force:
            return self._report("forced", "activated with force=true; the gate did not measure it")
        if active is None:
            return self._report("passed", "no model was active: the first model has nothing to beat")
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            cand_acc, active_acc, images = await loop.run_in_executor(
                self._executor(), self._measure_pair, candidate, active)
        except MnistUnavailableError as exc:
            return self._report("refused", f"the gate set is unavailable ({exc}); the candidate was stored "
                                "inactive; activate it with force=true if you are sure")
        except Exception as exc:  # a gate that cannot measure refuses (fails closed), and says why
            log.exception("the promotion gate could not measure %s", candidate.manifest.version)
            return self._report("refused", f"the gate could not measure the models ({type(exc).__name__}: "
                                f"{str(exc)[:200]}); the candidate was stored inactive")
        measured = Measured(cand_acc, active_acc, active.manifest.version, images, time.perf_counter() - started)
        margin = self.tolerance_points / 100.0
        cand, was = _points(cand_acc), _points(active_acc)
        # A tiny epsilon: both are counts over the same set, so equal must compare equal.
        if cand_acc + 1e-12 >= active_acc - margin:
            reason = (f"gate passed: {cand} on {images} gate images vs {was} for the active version "
                      f"{active.manifest.version} (tolerance {self.tolerance_points:g} points)")
            return self._report("passed", reason, measured)
        reason = (f"gate refused: {cand} on {images} gate images, worse than the active version "
                  f"{active.manifest.version} at {was} by more than {self.tolerance_points:g} points; "
                  "stored inactive")
        return self._report("refused", reason, measured)

    # --- in the gate thread ---

    def _measure_pair(self, candidate: LoadedModel, active: LoadedModel) -> tuple[float, float, int]:
        gate_set = self._gate_set()
        return self._score(candidate, gate_set), self._score(active, gate_set), len(gate_set.images)

    def _gate_set(self) -> GateSet:
        key = gate_key(self.size)
        if self._set is not None and self._set.key == key:
            return self._set
        path = self.directory / f"gate-{key}.npz"
        gate_set = load_gate_set(path, key)
        if gate_set is None:
            started = time.perf_counter()
            gate_set = build_gate_set(self.size)
            try:
                save_gate_set(path, gate_set)
            except OSError as exc:  # a full disk costs a rebuild next start, not the decision
                log.warning("could not cache the gate set at %s: %s", path, exc)
            log.info("built the gate set (%d images) in %.1f s", len(gate_set.images), time.perf_counter() - started)
        self._set = gate_set
        return gate_set

    def _score(self, model: LoadedModel, gate_set: GateSet) -> float:
        manifest = model.manifest
        weights = manifest.weights_sha256 or f"{manifest.model_id}-{manifest.version}"
        cached = self._scores.get((gate_set.key, weights))
        if cached is not None:
            return cached
        path = self.directory / gate_set.key / f"{weights}.json"
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            score = float(json.loads(path.read_bytes())["accuracy"])
            if 0.0 <= score <= 1.0:
                self._scores[(gate_set.key, weights)] = score
                return score
        score = accuracy(model.net, gate_set)
        self._scores[(gate_set.key, weights)] = score
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps({"accuracy": score, "images": len(gate_set.images),
                                           "model_id": manifest.model_id, "version": manifest.version}).encode())
        except OSError as exc:
            log.warning("could not cache the gate score at %s: %s", path, exc)
        return score
