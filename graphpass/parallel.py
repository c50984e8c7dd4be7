"""The run's workers: per-tensor tasks mapped in parallel, results taken in input order.

Passes never start threads of their own. They hand independent per-tensor tasks to
`ctx.workers.map(task, items)` and consume the results in the order of `items`, so the output
bytes cannot depend on how many workers ran them or which finished first; a task that needs
randomness seeds it from its weight, never from the worker.

A long task (one of auto's studies: a weight's settings, minutes on a large model) calls
`stop_point()` between its units of work. Once the map that runs it has stopped early (an
error, Ctrl-C, SIGTERM), nobody waits for its result and the stop point ends it, so that the
run stops within one unit, not one task.

`Workers(jobs)` runs tasks on `jobs` local threads (jobs=1: in the calling thread, no pool at
all). The hot per-tensor work is numpy over whole tensors or large chunks, which releases the
GIL, so threads share the weights without copying them; bench/bench_jobs.py measures what two
of them buy. `Workers(jobs, scheduler="tcp://host:port")` sends the tasks that can run on another
machine (`map_remote`) to a Dask cluster instead: such a task is a plain module-level function of
a small description (which weight, where its bytes are, which codec settings) that reads the
weight itself on the worker, so no weight leaves the client (graphpass.streamed).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from graphpass.errors import UsageError
from graphpass.streamed import StoredWeight, WeightSource, source_of
from graphpass.weights import WeightRef

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")

# Tasks submitted ahead of the one being consumed, per worker: enough to keep every worker busy
# while the caller applies a result, few enough that pending inputs (weight-sized arrays) and
# results do not pile up in memory.
AHEAD_PER_WORKER = 2
# How long to keep trying a Dask scheduler that does not answer.
CONNECT_SECONDS = 30


def default_jobs() -> int:
    """Every core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Workers:
    """Where a run's per-tensor tasks execute: `jobs` local threads, or a Dask cluster as well.

    `stored` (graphpass.streamed.stored_weights) says which weights remote tasks read from the
    input's external data rather than carry."""

    def __init__(self, jobs: int | None = None, scheduler: str | None = None,
                 stored: dict[str, StoredWeight] | None = None):
        jobs = default_jobs() if jobs is None else jobs
        if jobs < 1:
            raise UsageError(f"--jobs must be at least 1 (got {jobs})")
        self.jobs = jobs
        self.scheduler = scheduler
        self.stored = stored or {}
        self._client = None

    @property
    def free(self) -> int:
        """Threads a library call may use here (scipy's `workers=`): 1 inside a task."""
        return 1 if getattr(_worker, "busy", False) else self.jobs

    def source_of(self, weight: WeightRef) -> WeightSource:
        """How a remote task finds this weight's values (read on the calling thread if inline)."""
        return source_of(weight, self.stored)

    def map(self, task: Callable[[_Item], _Result], items: Iterable[_Item],
            ahead: int | None = None) -> Iterator[_Result]:
        """task(item) for every item on the local threads, yielded in the order of `items`.

        Items are drawn from `items` on the calling thread as room frees up (a pass may read
        weights there), at most `ahead` (default AHEAD_PER_WORKER per worker) beyond the one
        being consumed. A task that maps again (auto's codebook fits) runs those tasks itself:
        every worker is busy already, and jobs x jobs threads would only contend."""
        if self.jobs == 1 or getattr(_worker, "busy", False):
            yield from map(task, items)
            return
        stop = threading.Event()
        with ThreadPoolExecutor(self.jobs, initializer=_mark_busy, initargs=(stop,)) as pool:
            yield from _in_order(pool.submit, task, items, ahead or AHEAD_PER_WORKER * self.jobs, stop)

    def map_remote(self, task: Callable[[_Item], _Result], items: Iterable[_Item]) -> Iterator[_Result]:
        """Like `map`, on the Dask cluster at `scheduler` when one is given. `task` must be a
        module-level function and each item small: both are pickled to the cluster."""
        if self.scheduler is None:
            yield from self.map(task, items)
            return
        client = self._dask_client()
        yield from _in_order(lambda fn, item: client.submit(fn, item, pure=False), task, items,
                             AHEAD_PER_WORKER * max(1, len(client.scheduler_info()["workers"])))

    def _dask_client(self):
        if self._client is None:
            try:
                from distributed import Client
            except ImportError:
                raise UsageError("--scheduler needs Dask's distributed: pip install 'graphpass[dask]'") from None
            try:
                self._client = Client(self.scheduler, set_as_default=False, timeout=CONNECT_SECONDS)
            except OSError as exc:
                raise UsageError(f"cannot reach the Dask scheduler at {self.scheduler}: {exc}") from None
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class Stopped(Exception):
    """Ends a task at a stop point once its map has stopped: nobody waits for its result."""


def stop_point() -> None:
    """Where a long task may end early; see the module docstring. Nothing outside a worker thread
    (a task run inline stops with its caller)."""
    stop = getattr(_worker, "stop", None)
    if stop is not None and stop.is_set():
        raise Stopped()


_worker = threading.local()


def _mark_busy(stop: threading.Event) -> None:
    _worker.busy = True
    _worker.stop = stop


def _in_order(submit: Callable[..., Any], task: Callable, items: Iterable, ahead: int,
              stop: threading.Event | None = None) -> Iterator:
    pending: deque = deque()
    try:
        for item in items:
            pending.append(submit(task, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        # Stopped early (an error, Ctrl-C, SIGTERM): tasks not yet started never start, and the
        # running ones end at their next stop point. Else the pool's exit waited for all of them;
        # one auto study is minutes on a large model.
        for future in pending:
            future.cancel()
        if stop is not None:
            stop.set()
