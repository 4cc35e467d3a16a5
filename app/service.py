"""The classifier behind the API: a model loaded once (ONNX Runtime, or torch for a checkpoint),
the workers that turn request bodies into 28x28 bitmaps off the event loop, and batched forward
passes off it too."""
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
import anyio.to_thread
import numpy as np

from app.backends import Backend, ModelFileError, load_backend
from app.inputs import SIDE, Costly, strokes_to_bitmap, worker_started

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
    bitmaps: np.ndarray  # uint8 (N,28,28)
    top_k: int
    allowed: np.ndarray | None  # class indices the answer may name (None: all)
    future: asyncio.Future
    start: int = 0       # rows already sent to a forward pass
    parts: list[np.ndarray] = field(default_factory=list)


class Batcher:
    """Forward passes in one thread beside the event loop, each on the drawings of every request
    that arrived while the previous pass ran.

    A pass on 16 drawings costs little more than on one, so under load the requests share passes.
    A pass takes at most max_rows drawings: the rest of a large batch waits behind the requests
    that arrived during the pass, so that a large batch delays a small request by one pass at most.
    """

    def __init__(self, classifier: Classifier, max_rows: int = 64):
        self.classifier, self.max_rows = classifier, max_rows
        self.waiting: deque[_Job] = deque()
        self.running = False
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="forward")  # both runtimes compute without the GIL

    async def predict(self, bitmaps: np.ndarray, top_k: int, allowed: np.ndarray | None = None) -> list[dict]:
        """uint8 (N,28,28) -> per drawing its top_k labels (among `allowed` class indices) and unsure flag."""
        job = _Job(bitmaps, top_k, allowed, asyncio.get_running_loop().create_future())
        self.waiting.append(job)
        if not self.running:
            self._next()
        return await job.future

    def _next(self) -> None:
        taken, rows = [], 0
        while self.waiting and rows < self.max_rows:
            job = self.waiting.popleft()
            if job.future.done():  # cancelled: its client went away
                continue
            n = min(len(job.bitmaps) - job.start, self.max_rows - rows)
            taken.append((job, job.start, job.start + n))
            job.start, rows = job.start + n, rows + n
        self.running = bool(taken)
        if taken:
            batch = np.concatenate([job.bitmaps[a:b] for job, a, b in taken])
            done = asyncio.get_running_loop().run_in_executor(self.thread, self.classifier.probabilities, batch)
            done.add_done_callback(lambda f: self._finish(taken, f))

    def _finish(self, taken: list, done: asyncio.Future) -> None:
        error = done.exception()
        start = 0
        for job, a, b in taken:
            if job.future.done():
                pass
            elif error is not None:  # every request in the pass learns of it; the service keeps going
                job.future.set_exception(error)
            else:
                job.parts.append(done.result()[start:start + b - a])
                if b == len(job.bitmaps):
                    job.future.set_result(self.classifier.top(np.concatenate(job.parts), job.top_k, job.allowed))
            start += b - a
            if b < len(job.bitmaps) and not job.future.done():  # behind the requests that came meanwhile
                self.waiting.append(job)
        self._next()


class Workers:
    """Where a request's CPU work runs: never on the event loop, and never more at once than bounded.

    run(fn, ...) calls fn(..., budget=light_budget) in a thread (at most `threads` at once). An
    input that costs more than that budget raises Costly there, after only its cheap checks, and is
    then read again in full by a worker process of lower priority (at most `processes` at once,
    the rest wait their turn): its parsing, drawing or decoding neither holds the server's GIL
    nor takes the CPU from the ordinary requests.
    """

    def __init__(self, threads: int = 2, processes: int = 1):
        self.light = anyio.CapacityLimiter(threads)
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

    async def run(self, fn: Callable, *args, light_budget: float | None):
        """fn(*args, budget=...) off the event loop; light_budget None sends it to a process directly."""
        if light_budget is not None:
            try:
                return await anyio.to_thread.run_sync(lambda: fn(*args, budget=light_budget), limiter=self.light)
            except Costly:
                pass
        async with self.heavy:
            try:
                return await asyncio.wrap_future(self.pool.submit(fn, *args, budget=None))
            except BrokenProcessPool:  # a worker died (killed from outside): the next request gets a new one
                self.close()
                raise
