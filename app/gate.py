"""The promotion gate: a candidate model goes live only if it is not worse than the model in service.

Both are measured on one fixed gate set that the API owns (`app.gate_set`: seeded MNIST test digits,
half plain and half photo-like, through the real preprocessing, cached under `DATA_DIR/gate`), never on
what the uploader claims (the manifest's val_acc decides nothing). A model's accuracy on the set is
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
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

import torch

from app.contracts import GateDecision, GateReport
from app.files import write_atomic
from app.gate_set import GATE_NICE, GateSet, GateStoppedError, cached_or_built, gate_key
from app.inference import ServedNet, forward_probs, on_this_thread
from app.loading import LoadedModel
from app.mnist import MnistUnavailableError
from app.network import available_cores
from app.observability import GATE_DECISIONS, GATE_READY
from app.preprocess import to_tensor
from config.settings import Settings

log = logging.getLogger("app.gate")

_BATCH: Final = 128


@dataclass(frozen=True)
class Measured:
    candidate_acc: float
    active_acc: float
    active_version: str
    images: int
    seconds: float


def accuracy(net: ServedNet, gate_set: GateSet) -> float:
    """Share of the set the network reads right (fp32, no test-time augmentation: both models alike)."""
    correct = 0
    labels = torch.from_numpy(gate_set.labels)
    for start in range(0, len(gate_set.images), _BATCH):
        probs = forward_probs(net, to_tensor(gate_set.images[start : start + _BATCH]), 1.0, tta=False)
        correct += int((probs.argmax(dim=1) == labels[start : start + _BATCH]).sum())
    return correct / len(gate_set.images)


def _background_thread(threads: int) -> None:
    """The gate's thread (and the torch threads it starts, which inherit it) runs at a low priority."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), GATE_NICE)
    torch.set_num_threads(threads)


def _weights_key(model: LoadedModel) -> str:
    """What a model's gate score is cached under: its weights' sha256 (model id and version without one)."""
    manifest = model.manifest
    return manifest.weights_sha256 or f"{manifest.model_id}-{manifest.version}"


def _points(fraction: float) -> str:
    return f"{fraction * 100:.2f}%"


class PromotionGate:
    """Decides whether a candidate may replace the model in service. One decision at a time.

    `prepare(model)` (called whenever a model goes into service) gets the next decision ready in the gate
    thread: the set is built and the served model scored before any candidate arrives, so a gate then
    measures only the candidate. A candidate that comes first waits for that work in the same queue.
    """

    def __init__(self, settings: Settings) -> None:
        self.directory = settings.gate_dir
        self.size = settings.api.gate_size
        self.tolerance_points = settings.api.gate_tolerance
        self.threads = settings.api.torch_threads or available_cores()
        self._pool: ThreadPoolExecutor | None = None
        self._set: GateSet | None = None
        self._scores: dict[tuple[str, str], float] = {}
        self._stop = threading.Event()
        self._prepared: set[str] = set()  # the weights whose preparation was queued
        self._latest = ""  # ... the last of them

    def close(self) -> None:
        self._stop.set()  # a set being built is abandoned at its next image
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gate",
                                            initializer=_background_thread, initargs=(self.threads,))
        return self._pool

    def prepare(self, model: LoadedModel) -> None:
        """Queue, in the gate thread, what the next decision about replacing `model` needs: the gate set
        (built and cached once per DATA_DIR) and `model`'s score. Returns at once; never raises."""
        weights = _weights_key(model)
        if self._stop.is_set() or weights in self._prepared:
            return
        self._prepared.add(weights)
        self._latest = weights
        GATE_READY.set(0)
        self._executor().submit(self._prepare, model)

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

    def _prepare(self, model: LoadedModel) -> None:
        try:
            self._score(model, self._gate_set())
            if _weights_key(model) == self._latest:
                GATE_READY.set(1)
        except GateStoppedError:
            pass
        except MnistUnavailableError as exc:
            log.warning("the gate set cannot be built yet (%s); the next gate will try again", exc)
        except Exception:  # the decision itself will retry and, if it fails again, refuse and say why
            log.exception("preparing the promotion gate for %s failed", model.manifest.version)

    def _measure_pair(self, candidate: LoadedModel, active: LoadedModel) -> tuple[float, float, int]:
        gate_set = self._gate_set()
        return self._score(candidate, gate_set), self._score(active, gate_set), len(gate_set.images)

    def _gate_set(self) -> GateSet:
        key = gate_key(self.size)
        if self._set is not None and self._set.key == key:
            return self._set
        started = time.perf_counter()
        gate_set = cached_or_built(self.directory / f"gate-{key}.npz", self.size, workers=self.threads,
                                   stop=self._stop)
        log.info("gate set ready (%d images) in %.1f s", len(gate_set.images), time.perf_counter() - started)
        self._set = gate_set
        return gate_set

    def _score(self, model: LoadedModel, gate_set: GateSet) -> float:
        manifest = model.manifest
        weights = _weights_key(model)
        cached = self._scores.get((gate_set.key, weights))
        if cached is not None:
            return cached
        path = self.directory / gate_set.key / f"{weights}.json"
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            score = float(json.loads(path.read_bytes())["accuracy"])
            if 0.0 <= score <= 1.0:
                self._scores[(gate_set.key, weights)] = score
                return score
        score = accuracy(on_this_thread(model.net), gate_set)
        self._scores[(gate_set.key, weights)] = score
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps({"accuracy": score, "images": len(gate_set.images),
                                           "model_id": manifest.model_id, "version": manifest.version}).encode())
        except OSError as exc:
            log.warning("could not cache the gate score at %s: %s", path, exc)
        return score
