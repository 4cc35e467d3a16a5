"""The classifier behind the API: a model loaded once (ONNX Runtime, or torch for a checkpoint), the
batcher that reads requests, draws them as 28x28 bitmaps and classifies them in one thread beside the
event loop, and the worker processes for the costly ones."""
from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import anyio
import numpy as np

from app.backends import Backend, ModelFileError, load_backend
from app.inputs import SIDE, Costly, Drawings, draw_strokes, strokes_to_bitmap, worker_started

# An answer whose top probability is below this is flagged "unsure" (python -m app --unsure-below).
# On the default model's validation split, drawings answered with less are right less than half the
# time (models/quickdraw17/MODEL_CARD.md).
UNSURE_BELOW = 0.5


@dataclass
class Classifier:
    """A model on its backend (app.backends: ONNX Runtime, or torch for a checkpoint), its class names,
    and batched top-k prediction on uint8 bitmaps. Nothing here imports torch."""
    backend: Backend
    unsure_below: float = UNSURE_BELOW

    @property
    def classes(self) -> list[str]:
        return self.backend.classes

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def path(self) -> Path:
        return self.backend.path

    @classmethod
    def from_file(cls, path: str | Path, threads: int | None = 1, unsure_below: float = UNSURE_BELOW) -> "Classifier":
        """Load once at start (.onnx on ONNX Runtime, .pt on torch); any failure is a ModelFileError of
        one line naming the path."""
        try:
            return cls(load_backend(path, threads), unsure_below)
        except Exception as e:  # missing, foreign, truncated, or for another model: the service cannot start
            reason = (str(e).strip() or type(e).__name__).splitlines()[0]
            raise ModelFileError(reason if str(path) in reason else f"cannot load model {path}: {reason}") from e

    from_checkpoint = from_file

    def warm_up(self, max_batch: int = 64) -> None:
        """Pay the first-call costs (cairo loading, kernels per batch size) before the first request."""
        strokes_to_bitmap([[[0, 10, 20], [0, 20, 0]]])
        for n in range(1, max_batch + 1):
            self.probabilities(np.zeros((n, SIDE, SIDE), np.uint8))

    def probabilities(self, bitmaps: np.ndarray) -> np.ndarray:
        """uint8 (N,28,28) -> class probabilities float32 (N,C), one forward pass."""
        return self.backend.probabilities(bitmaps)

    def top(self, probabilities: np.ndarray, top_k: int, allowed: np.ndarray | None = None) -> list[dict]:
        """(N,C) probabilities -> per row {"predictions": the top_k labels, most probable first, "unsure"}.

        allowed: class indices the answer may name (None: all); the probabilities are renormalized
        over them. A row is unsure when its top probability is below unsure_below.
        """
        index = np.arange(probabilities.shape[1]) if allowed is None else allowed
        p = probabilities[:, index]  # (N,A)
        p = p / p.sum(axis=1, keepdims=True)
        order = np.argsort(-p, axis=1, kind="stable")[:, :top_k]  # (N,k)
        values = np.take_along_axis(p, order, axis=1).tolist()
        return [{"predictions": [{"label": self.classes[index[i]], "probability": v} for i, v in zip(row_i, row_p)],
                 "unsure": row_p[0] < self.unsure_below}
                for row_i, row_p in zip(order.tolist(), values)]


@dataclass(eq=False)
class _Job:
    """One request in the batcher: its reading (done in the batch thread), then its rows."""
    future: asyncio.Future
    read: Callable[..., Drawings] | None = None  # read(budget=..., draw=...) -> Drawings; Costly over budget
    budget: float | None = None
    drawings: Drawings | None = None
    start: int = 0       # rows already sent to a forward pass
    parts: list[np.ndarray] = field(default_factory=list)
    error: BaseException | None = None
    result: list[dict] | None = None

    def rows(self) -> int:
        return 1 if self.drawings is None else len(self.drawings.bitmaps) - self.start


def _draw_apart(many: list) -> list[Exception | None]:
    """draw_strokes for a pass's requests; should it fail in a way no input check foresaw, each request is drawn
    alone, so that the fault stays with the request that caused it."""
    try:
        return draw_strokes(many)
    except Exception:  # noqa: BLE001 - kept per request below
        errors = []
        for drawings in many:
            try:
                errors.append(draw_strokes([drawings])[0])
            except Exception as e:  # noqa: BLE001 - that request's answer (a 500), nobody else's
                errors.append(e)
        return errors


class Batcher:
    """Requests read, drawn and classified in one thread beside the event loop, in batches: each pass
    takes every request that arrived while the previous pass ran, reads and draws them, and classifies
    all their drawings in one forward pass.

    A request costs the event loop one hand-off to the thread and one answer back, whatever it holds.
    A pass on 16 drawings costs little more than on one, so under load the requests share passes.
    A pass takes at most max_rows drawings: the rest of a large batch waits behind the requests
    that arrived during the pass, so that a large batch delays a small request by one pass at most.
    Reading a request that costs more than its light budget raises Costly in the thread, after only
    its cheap checks; it is then read by a worker process (Workers) and comes back as bitmaps.
    """

    def __init__(self, classifier: Classifier, workers: Workers | None = None, max_rows: int = 16):
        self.classifier, self.max_rows = classifier, max_rows
        self.workers = workers or Workers()
        self.waiting: deque[_Job] = deque()
        self.running = False
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="batch")  # both runtimes compute without the GIL

    async def predict(self, read: Callable[..., Drawings], light_budget: float | None) -> tuple[Drawings, list[dict]]:
        """read(budget=..., draw=...) -> Drawings (app.inputs.read_drawings or read_image), then per drawing
        its top_k labels (among the allowed classes) and unsure flag. read runs in the batch thread within
        light_budget, its strokes drawn with those of the other requests of the pass; over it, or with
        light_budget None, in a worker process."""
        if light_budget is not None:
            try:
                return await self._submit(_Job(asyncio.get_running_loop().create_future(), read, light_budget))
            except Costly:
                pass
        drawings = await self.workers.run(read)
        return await self._submit(_Job(asyncio.get_running_loop().create_future(), drawings=drawings))

    async def predict_bitmaps(self, bitmaps: np.ndarray, top_k: int, allowed: np.ndarray | None = None) -> list[dict]:
        """uint8 (N,28,28) -> per drawing its top_k labels (among `allowed` class indices) and unsure flag."""
        job = _Job(asyncio.get_running_loop().create_future(), drawings=Drawings(bitmaps, top_k, True, allowed))
        return (await self._submit(job))[1]

    def _submit(self, job: _Job) -> asyncio.Future:
        self.waiting.append(job)
        if not self.running:
            self._next()
        return job.future

    def _next(self) -> None:
        taken, rows = [], 0
        while self.waiting and rows < self.max_rows:
            job = self.waiting.popleft()
            if job.future.done():  # cancelled: its client went away
                continue
            taken.append(job)
            rows += job.rows()  # a request not read yet counts as one
        self.running = bool(taken)
        if taken:
            done = asyncio.get_running_loop().run_in_executor(self.thread, self._pass, taken)
            done.add_done_callback(lambda f: self._finish(taken, f))

    def _pass(self, taken: list[_Job]) -> None:
        """In the batch thread: read the requests not read yet and draw their strokes (all at once), then
        one forward pass on at most max_rows drawings."""
        fresh = []
        for job in taken:
            if job.drawings is None:
                try:
                    job.drawings = job.read(budget=job.budget, draw=False)
                    fresh.append(job)
                except Exception as e:  # Costly, or what is wrong with the input: that request's answer
                    job.error = e
        for job, error in zip(fresh, _draw_apart([job.drawings for job in fresh])):
            job.error = error
        slices, rows = [], 0
        for job in taken:
            if job.error is None and rows < self.max_rows:
                n = min(job.rows(), self.max_rows - rows)
                slices.append((job, job.start, job.start + n))
                job.start, rows = job.start + n, rows + n
        if not slices:
            return
        try:
            probabilities = self.classifier.probabilities(np.concatenate([j.drawings.bitmaps[a:b] for j, a, b in slices]))
        except Exception as e:  # every request in the pass learns of it; the service keeps going
            for job, _, _ in slices:
                job.error = e
            return
        start = 0
        for job, a, b in slices:
            job.parts.append(probabilities[start:start + b - a])
            start += b - a
            if b == len(job.drawings.bitmaps):
                d = job.drawings
                job.result = self.classifier.top(np.concatenate(job.parts), d.top_k, d.allowed)

    def _finish(self, taken: list[_Job], done: asyncio.Future) -> None:
        failure = done.exception()  # not raised by a request or the model: a fault of the batcher itself
        for job in taken:
            if job.future.done():
                continue
            if failure is not None or job.error is not None:
                job.future.set_exception(failure or job.error)
            elif job.result is not None:
                job.future.set_result((job.drawings, job.result))
            else:  # rows left: behind the requests that came meanwhile
                self.waiting.append(job)
        self._next()


class Workers:
    """Worker processes of lower CPU priority for the requests too costly for the batch thread: at
    most `processes` at once, the rest wait their turn. Their parsing, drawing or decoding neither
    holds the server's GIL nor takes the CPU from the ordinary requests."""

    def __init__(self, processes: int = 1):
        self.heavy = anyio.CapacityLimiter(processes)
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None

    @property
    def pool(self) -> ProcessPoolExecutor:
        if self._pool is None:  # spawn: a fork would copy the server's threads and event loop into the child
            self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=worker_started)
        return self._pool

    async def start(self) -> None:
        """Start the worker processes now rather than on the first costly request."""
        await asyncio.gather(*(asyncio.wrap_future(self.pool.submit(os.getpid)) for _ in range(self.processes)))

    def close(self) -> None:
        """Stop the worker processes (a later request starts new ones)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, fn: Callable[..., Drawings]):
        """fn(budget=None) in a worker process (fn must pickle: a module-level function or a partial of one)."""
        async with self.heavy:
            try:
                return await asyncio.wrap_future(self.pool.submit(fn, budget=None))
            except BrokenProcessPool:  # a worker died (killed from outside): the next request gets a new one
                self.close()
                raise
