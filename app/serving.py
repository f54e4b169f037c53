"""The served model: hot swap and a micro-batching predictor (loading and smoke tests: `app.loading`).

One reference, `ModelServer._current`, names the model that answers. A new model is loaded and smoke-tested
off the request path, then installed by assigning that reference; a batch already running keeps the model it
started with, so in-flight reads finish on the old one and every answer names the version that computed it.

Reads are preprocessed in a thread pool. A read alone in the server is answered on its preprocessing thread, at
once; other reads are queued, and one batcher task takes whatever has queued up (waiting a moment only while other
reads are still being preprocessed) and runs one forward pass in the inference thread: on that thread alone while
other reads, being preprocessed, hold the other cores, else on every core. Under load, reads share a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from app.admission import ReadAdmission
from app.contracts import WEIGHTS_FILE, ManifestV1_1
from app.decode import HEAVY_DECODE_PIXELS, decode_gray, decoded_pixels
from app.inference import forward_probs, on_this_thread, pick_dtype, threads_for
from app.loading import CandidateError, LoadedModel, load_candidate
from app.network import available_cores
from app.observability import ACTIVE_MODEL, FAILED_ACTIVATIONS, MODEL_SWAPS
from app.prediction import ModelNotReadyError, Prediction, PredictionTimeoutError, Reading
from app.preprocess import Preprocessed, preprocess_gray
from app.store import ActivePointer, ModelStore, StorageFullError, StoredVersion, VersionNotFoundError
from config.settings import Settings

log = logging.getLogger("app.serving")


def _wake(nudge: asyncio.Future[None] | None) -> None:
    if nudge is not None and not nudge.done():
        nudge.set_result(None)


@dataclass(frozen=True)
class _Prepared:
    """What a read's preprocessing thread made: the 28x28, the network's input and (a read alone) the answer."""

    pre: Preprocessed
    tensor: torch.Tensor
    answer: tuple[list[float], LoadedModel] | None = None


# The promotion gate as the server sees it: (candidate, model in service or None) -> serve the candidate?
Promote = Callable[[LoadedModel, LoadedModel | None], Awaitable[bool]]


@dataclass
class _Job:
    tensor: torch.Tensor
    future: asyncio.Future[tuple[list[float], LoadedModel]]


@dataclass
class _Runtime:
    """What exists only while the server runs inside an event loop."""

    preprocess_pool: ThreadPoolExecutor
    infer_pool: ThreadPoolExecutor
    queue: asyncio.Queue[_Job]
    lock: asyncio.Lock
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class ModelServer:
    """The model that answers reads, and the only way to change it."""

    def __init__(self, settings: Settings, store: ModelStore | None = None) -> None:
        self.settings = settings
        self.api = settings.api
        self.store = store or ModelStore(settings.models_dir, keep_versions=settings.api.keep_versions)
        self.threads = self.api.torch_threads or available_cores()
        self.dtype = pick_dtype(self.api.precision)  # None: fp32 on ONNX Runtime; bf16: torch autocast
        self._current: LoadedModel | None = None
        self._runtime: _Runtime | None = None
        self._preprocessing = 0
        self._nudge: asyncio.Future[None] | None = None  # the batcher, waiting for a read's preprocessing to end
        self._failed_pointer: ActivePointer | None = None
        # Decodes and preprocessing run on this many threads at once; more reads than
        # API__READ_QUEUE_MAX waiting or running are refused at once (503 overloaded).
        self.decode_workers = max(2, available_cores())
        self.admission = ReadAdmission(self.api.read_queue_max, self.decode_workers)
        # Told of every activation made here (an upload or a rollback), with the change lock held:
        # replication publishes it for the other replicas. Not told of what it installs itself.
        self.on_activated: Callable[[StoredVersion], Awaitable[None]] | None = None
        # Asked, with the change lock held, for a version an activation names that the local store lacks
        # (replication fetches it from Redis); True when the store now holds it.
        self.fetch_missing: Callable[[str, str], Awaitable[bool]] | None = None
        # Told of every model put into service, however it came (start, upload, rollback, another replica):
        # the promotion gate gets its next decision ready. Called on the event loop; must not block.
        self.on_serving: Callable[[LoadedModel], None] | None = None

    # --- lifecycle ---

    async def start(self) -> None:
        """Start the batcher and serve the stored active version, if there is one."""
        if self._runtime is not None:
            return
        torch.set_num_threads(self.threads)
        await asyncio.to_thread(self.store.prepare)
        self.admission = ReadAdmission(self.api.read_queue_max, self.decode_workers)  # bound to this loop
        runtime = _Runtime(
            preprocess_pool=ThreadPoolExecutor(max_workers=self.decode_workers, thread_name_prefix="preprocess"),
            infer_pool=ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer",
                                          initializer=torch.set_num_threads, initargs=(self.threads,)),
            queue=asyncio.Queue(),
            lock=asyncio.Lock(),
        )
        self._runtime = runtime
        runtime.tasks.append(asyncio.create_task(self._run_batches(), name="model-batcher"))
        await self._follow_pointer_once()
        if self.api.model_poll_s > 0:
            runtime.tasks.append(asyncio.create_task(self._follow_pointer(), name="model-pointer"))

    async def stop(self) -> None:
        runtime, self._runtime = self._runtime, None
        if runtime is None:
            return
        for task in runtime.tasks:
            task.cancel()
        await asyncio.gather(*runtime.tasks, return_exceptions=True)
        while not runtime.queue.empty():
            job = runtime.queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(ModelNotReadyError("the service is shutting down"))
        runtime.preprocess_pool.shutdown(wait=False, cancel_futures=True)
        runtime.infer_pool.shutdown(wait=True, cancel_futures=True)

    # --- the interface routes and the Discord handler use ---

    def is_ready(self) -> bool:
        return self._current is not None and self._runtime is not None

    def active_manifest(self) -> ManifestV1_1 | None:
        current = self._current
        return current.manifest if current is not None else None

    async def read_digit(self, data: bytes, *, invert: bool | None = None) -> Prediction:
        """Image bytes -> Prediction. Raises PreprocessError subclasses, ModelNotReadyError,
        PredictionTimeoutError, ReadOverloadedError (at once, when `API__READ_QUEUE_MAX` reads are in)."""
        runtime = self._runtime
        if runtime is None or self._current is None:
            raise ModelNotReadyError()
        loop = asyncio.get_running_loop()
        gave_up = threading.Event()
        with self.admission.admit():
            try:
                async with asyncio.timeout(self.api.read_timeout_s):
                    self._preprocessing += 1
                    try:
                        work = functools.partial(self._prepare_if_light, data, invert, gave_up)
                        prepared = await self.admission.run(runtime.preprocess_pool, work)
                        if prepared is None:  # the heavy lane
                            work_heavy = functools.partial(self._prepare, data, invert, gave_up)
                            prepared = await self.admission.run(runtime.preprocess_pool, work_heavy, heavy=True)
                    finally:
                        self._preprocessing -= 1
                        _wake(self._nudge)
                    answer = prepared.answer
                    if answer is None:
                        future: asyncio.Future[tuple[list[float], LoadedModel]] = loop.create_future()
                        runtime.queue.put_nowait(_Job(prepared.tensor, future))
                        answer = await future  # a read that gives up here is dropped from its batch
                    probs, model = answer
            except TimeoutError as exc:
                gave_up.set()  # its thread, if still decoding, does not go on to preprocess
                raise PredictionTimeoutError(self.api.read_timeout_s) from exc
        digit = max(range(len(probs)), key=probs.__getitem__)
        confidence = probs[digit]
        reading = Reading(digit=digit, confidence=confidence, probs=probs, model_id=model.manifest.model_id,
                          version=model.manifest.version, uncertain=confidence < self.api.uncertain_below)
        return Prediction(reading, prepared.pre.preview)

    def _prepare_if_light(self, data: bytes, invert: bool | None, gave_up: threading.Event) -> _Prepared | None:
        """The header first (cheap; refuses bombs at once), then `_prepare`; None when the decode would be heavy."""
        heavy = decoded_pixels(data, max_pixels=self.api.read_max_pixels) > HEAVY_DECODE_PIXELS
        return None if heavy else self._prepare(data, invert, gave_up)

    def _prepare(self, data: bytes, invert: bool | None, gave_up: threading.Event) -> _Prepared:
        """On a preprocessing thread: decode, then (unless the read gave up) preprocess; a read alone in the server
        is answered here too, on this thread: cheaper than waking the inference thread and ONNX Runtime's other one
        (2 AVX2 cores, resnet_s2_w32: a forward after preprocessing 2.7 against 3.9 ms, and two hops fewer)."""
        gray = decode_gray(data, max_pixels=self.api.read_max_pixels)
        if gave_up.is_set():
            raise PredictionTimeoutError(self.api.read_timeout_s)  # it has answered 504: no more work for it
        pre = preprocess_gray(gray, invert=invert)
        tensor, model = pre.tensor, self._current
        if model is None or self.admission.admitted > 1:  # other reads are in: the batcher serves them all
            return _Prepared(pre, tensor)
        return _Prepared(pre, tensor, (self._forward(model, [tensor], one_thread=True)[0], model))

    # --- changing the served model ---

    async def add_version(
        self, incoming: Path, manifest: ManifestV1_1, weights_sha256: str, *, activate: bool,
        promote: Promote | None = None,
    ) -> tuple[StoredVersion, bool]:
        """Validate an uploaded model (weights at `incoming/model.pt`), store it, maybe serve it. The candidate is
        loaded and smoke-tested before anything is stored; on any refusal `incoming` is removed, nothing is stored and
        the served model is untouched. With `activate`, `promote` (the promotion gate) decides whether the stored
        candidate replaces the model in service. Returns the stored version and whether it is now active."""
        self._require_runtime()  # not ready: refused before the candidate is loaded
        candidate = await self._load_incoming(incoming, manifest)
        async with self.changing():
            stored, activated = await self._store(
                incoming, manifest, weights_sha256, serve=candidate if activate else None, promote=promote)
            if activated:
                await self._announce(stored)
        return stored, activated

    async def activate(self, model_id: str, version: str) -> StoredVersion:
        """Serve a stored version (a rollback, or a version uploaded without activation)."""
        async with self.changing():
            try:
                stored = await self.serve_stored(model_id, version)
            except VersionNotFoundError:
                if self.fetch_missing is None or not await self.fetch_missing(model_id, version):
                    raise
                stored = await self.serve_stored(model_id, version)
            await self._announce(stored)
        return stored

    @contextlib.asynccontextmanager
    async def changing(self) -> AsyncIterator[None]:
        """Held while the served model changes: one change at a time (`adopt` and `serve_stored` need it)."""
        async with self._require_runtime().lock:
            yield

    async def adopt(
        self, incoming: Path, manifest: ManifestV1_1, weights_sha256: str, *, serve: bool = True
    ) -> StoredVersion:
        """Store, and serve, a version another replica activated (weights at `incoming/model.pt`): the same safe load
        and smoke test as an upload; no promotion gate (the replica where it landed decided). Hold `changing()`."""
        candidate = await self._load_incoming(incoming, manifest)
        stored, _ = await self._store(incoming, manifest, weights_sha256, serve=candidate if serve else None)
        return stored

    async def serve_stored(self, model_id: str, version: str) -> StoredVersion:
        """Load, smoke-test and serve a stored version, and point the store at it. The caller holds `changing()`."""
        stored = await asyncio.to_thread(self.store.get, model_id, version)
        try:
            candidate = await self._load(stored.weights_path, stored.manifest)
        except BaseException:
            FAILED_ACTIVATIONS.inc()
            raise
        await asyncio.to_thread(self.store.set_active, model_id, version)
        self._install(candidate)
        return stored

    async def _load_incoming(self, incoming: Path, manifest: ManifestV1_1) -> LoadedModel:
        try:
            return await self._load(incoming / WEIGHTS_FILE, manifest)
        except BaseException:
            FAILED_ACTIVATIONS.inc()
            await asyncio.to_thread(self.store.discard, incoming)
            raise

    async def _store(
        self, incoming: Path, manifest: ManifestV1_1, weights_sha256: str, *, serve: LoadedModel | None,
        promote: Promote | None = None,
    ) -> tuple[StoredVersion, bool]:
        """Commit `incoming`; serve `serve` if given and `promote` (the promotion gate) agrees. The caller holds
        `changing()`. A full disk while pointing the store at the new version undoes this commit, so the store is
        left as it was. Returns the stored version and whether it is served."""
        stored, new = await asyncio.to_thread(self.store.commit, incoming, manifest, weights_sha256)
        if serve is not None and promote is not None and not await promote(
                LoadedModel(manifest=stored.manifest, net=serve.net), self._current):
            serve = None
        if serve is not None:
            try:
                await asyncio.to_thread(self.store.set_active, stored.model_id, stored.version)
            except StorageFullError:
                if new:
                    await asyncio.to_thread(self.store.remove, stored.model_id, stored.version)
                raise
            self._install(LoadedModel(manifest=stored.manifest, net=serve.net))
        # Retention never removes the version just stored.
        await asyncio.to_thread(self.store.prune, stored.model_id, protect=(stored.version,))
        return stored, serve is not None

    async def _announce(self, stored: StoredVersion) -> None:
        if self.on_activated is not None:
            await self.on_activated(stored)

    async def _load(self, weights: Path, manifest: ManifestV1_1) -> LoadedModel:
        """`load_candidate` off the event loop, smoke-tested in the precision reads will use."""
        return await asyncio.to_thread(load_candidate, weights, manifest, dtype=self.dtype, threads=self.threads)

    def _install(self, model: LoadedModel) -> None:
        previous = self._current
        self._current = model  # the swap: one reference assignment
        self._failed_pointer = None
        MODEL_SWAPS.inc()
        ACTIVE_MODEL.clear()
        served = {"model_id": model.manifest.model_id, "version": model.manifest.version}
        ACTIVE_MODEL.labels(**served).set(1)
        was = f"{previous.manifest.model_id} {previous.manifest.version}" if previous else "none"
        log.info("serving %s %s (was %s)", served["model_id"], served["version"], was, extra=served)
        if self.on_serving is not None:
            self.on_serving(model)

    def _require_runtime(self) -> _Runtime:
        if self._runtime is None:
            raise ModelNotReadyError("the model server is not running")
        return self._runtime

    # --- following the active pointer (a restart, or another process sharing DATA_DIR) ---

    async def _follow_pointer(self) -> None:
        while True:
            await asyncio.sleep(self.api.model_poll_s)
            try:
                await self._follow_pointer_once()
            except Exception:
                log.exception("following the active pointer failed")

    async def _follow_pointer_once(self) -> None:
        runtime = self._require_runtime()
        pointer = await asyncio.to_thread(self.store.active)
        if pointer is None or pointer == self._failed_pointer or pointer == self._served_pointer():
            return
        async with runtime.lock:
            pointer = await asyncio.to_thread(self.store.active)
            if pointer is None or pointer == self._served_pointer():
                return
            try:
                stored = await asyncio.to_thread(self.store.get, pointer.model_id, pointer.version)
                candidate = await self._load(stored.weights_path, stored.manifest)
            except (CandidateError, VersionNotFoundError, OSError) as exc:
                self._failed_pointer = pointer
                FAILED_ACTIVATIONS.inc()
                log.error("cannot serve the active version %s %s: %s", pointer.model_id, pointer.version, exc)
                return
            self._install(candidate)

    def _served_pointer(self) -> ActivePointer | None:
        current = self._current
        return ActivePointer(current.manifest.model_id, current.manifest.version) if current is not None else None

    # --- the batcher ---

    async def _run_batches(self) -> None:
        runtime = self._require_runtime()
        loop = asyncio.get_running_loop()
        wait_s = self.api.batch_wait_ms / 1000.0
        while True:
            batch = [await runtime.queue.get()]
            self._drain(runtime.queue, batch)
            # Wait a moment for reads still being preprocessed, only when there are some (a read alone is never
            # delayed), woken as each one's preprocessing ends: c16 259.7 -> 265.8 req/s against a 0.5 ms poll.
            deadline = loop.time() + wait_s
            while len(batch) < self.api.batch_max and self._preprocessing > 0 and loop.time() < deadline:
                self._nudge = nudge = loop.create_future()
                timer = loop.call_at(deadline, _wake, nudge)
                await nudge
                timer.cancel()
                self._drain(runtime.queue, batch)
            live = [job for job in batch if not job.future.done()]
            model = self._current
            if not live or model is None:
                continue
            busy = self._preprocessing > 0 or not runtime.queue.empty()  # other reads hold the cores
            try:
                work = functools.partial(self._forward, model, [job.tensor for job in live], one_thread=busy)
                probs = await loop.run_in_executor(runtime.infer_pool, work)
            except Exception as exc:
                log.exception("batched forward pass failed")
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            for job, row in zip(live, probs, strict=True):
                if not job.future.done():
                    job.future.set_result((row, model))

    def _drain(self, queue: asyncio.Queue[_Job], batch: list[_Job]) -> None:
        batch.extend(queue.get_nowait() for _ in range(min(self.api.batch_max - len(batch), queue.qsize())))

    def _forward(self, model: LoadedModel, tensors: list[torch.Tensor], *, one_thread: bool) -> list[list[float]]:
        batch = torch.cat(tensors)
        threads = threads_for(len(tensors), self.threads, tta=self.api.tta)
        if torch.get_num_threads() != threads:  # set on this thread, it holds for its next pass
            torch.set_num_threads(threads)
        net = on_this_thread(model.net) if one_thread else model.net
        probs = forward_probs(net, batch, model.manifest.temperature, tta=self.api.tta, dtype=self.dtype)
        rows: list[list[float]] = probs.tolist()
        return [[p if math.isfinite(p) else 0.0 for p in row] for row in rows]
