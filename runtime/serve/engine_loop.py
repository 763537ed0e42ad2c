"""The server's engine thread: the one thread that ever touches the engine (through the router).

The HTTP side (asyncio) hands it work through a thread-safe inbox: `submit` (a request's sequences) and `abort`.
The thread drains the inbox, runs one router step (one engine step of replica 0, plus whatever the other replicas
sent), and passes each sequence's new output to that request's `sink`, which the HTTP side makes from
`loop.call_soon_threadsafe`. An aborted sequence leaves the engine at once, so its KV pages return to the pool.

Admission: at most `max_running` sequences run (the replicas' --max-num-seqs together) and `max_queue` more may
wait; `submit` beyond that raises Overloaded (answered 429), checked and counted at submission so that no burst
can overshoot it.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import RequestError
from ..outputs import StreamChunk
from ..sampling_params import SamplingParams
from .metrics import ServerMetrics


class Overloaded(Exception):
    """The server holds as many requests as it runs plus --max-queue waiting (answered 429 with Retry-After)."""


class EngineStopped(Exception):
    """The engine thread is not running: the server is shutting down, or its engine failed (answered 503)."""


@dataclass(frozen=True)
class Failure:
    """A sequence that ends without output: `status` 400 (the engine refused it) or 503 (shutdown, engine failure)."""

    message: str
    status: int


Sink = Callable[[int, "StreamChunk | Failure"], None]  # (choice index, its new output or its failure)


@dataclass
class _Submit:
    request_ids: list[str]
    prompts: list[list[int]]
    params: list[SamplingParams]
    sink: Sink
    arrival: float


@dataclass
class _Abort:
    request_ids: list[str]


@dataclass
class _Live:
    index: int
    sink: Sink
    arrival: float
    last_token: float | None = None


_STOP = object()


class EngineLoop:
    """Owns the router (mpi.serve_router.ServeRouter) on a thread of its own; see the module docstring.

    device: replica 0's torch device; a CUDA device becomes the thread's current device (CUDA keeps one per
    thread, and Triton and CUDA graphs use it). on_fatal(exc) is called (on the engine thread) if the router
    raises: every live request has been told (503) and the loop has ended; the caller ends the server.
    """

    def __init__(self, router, device: torch.device, metrics: ServerMetrics, max_running: int, max_queue: int,
                 on_fatal: Callable[[BaseException], None]):
        self.router = router
        self.device = device
        self.metrics = metrics
        self.max_running, self.max_queue = max_running, max_queue
        self.on_fatal = on_fatal
        self.error: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._admitted = 0  # sequences submitted and not yet ended
        self._stopping = False
        self._live: dict[str, _Live] = {}  # engine thread only
        self._thread = threading.Thread(target=self._run, name="ringlet-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._stopping

    # -- called from the HTTP side -------------------------------------------------------------------------

    def submit(self, request_ids: list[str], prompts: list[list[int]], params: list[SamplingParams],
               sink: Sink) -> None:
        """Queue sequences (request_ids[k] runs prompts[k] with params[k]; its output goes to sink(k, ...)).
        Raises Overloaded or EngineStopped, queuing nothing."""
        n = len(request_ids)
        with self._lock:
            if not self.alive:
                raise EngineStopped("the engine is not running")
            if self._admitted + n > self.max_running + self.max_queue:
                raise Overloaded(f"the server is at capacity ({self.max_running} running, {self.max_queue} queued)")
            self._admitted += n
            # Inside the lock: nothing can slip in behind the stop command and wait forever.
            self._inbox.put(_Submit(request_ids, prompts, params, sink, time.perf_counter()))

    def abort(self, request_ids: list[str]) -> None:
        """Stop these sequences and free their pages (ids already finished are ignored)."""
        self._inbox.put(_Abort(list(request_ids)))

    def stop(self, timeout: float = 30.0) -> None:
        """End the thread: running sequences are aborted and their requests told (503); other replicas stop."""
        with self._lock:
            self._stopping = True
        self._inbox.put(_STOP)
        self._thread.join(timeout)

    # -- the engine thread ---------------------------------------------------------------------------------

    def _release(self, n: int) -> None:
        with self._lock:
            self._admitted -= n

    def _next(self, wait: float | None):
        try:
            return self._inbox.get_nowait() if wait == 0 else self._inbox.get(timeout=wait)
        except queue.Empty:
            return None

    def _run(self) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            while True:
                command = self._next(self.router.idle_wait)
                while command is not None:
                    if command is _STOP:
                        self._end(Failure("the server is shutting down", 503))
                        self.router.stop()
                        return
                    self._apply(command)
                    command = self._next(0)
                chunks, errors = self.router.step()
                self._deliver(chunks, errors)
                for g, stats in enumerate(self.router.stats):
                    self.metrics.replica_stats(g, stats)
        except BaseException as e:  # a bug or a lost rank: tell every waiting client, then end the server
            with self._lock:
                self.error = e  # from here on submit refuses, so the inbox drained below stays empty
            self._end(Failure(f"the engine failed: {type(e).__name__}: {e}", 503))
            self.on_fatal(e)

    def _apply(self, command) -> None:
        if isinstance(command, _Abort):
            for request_id in command.request_ids:
                if self._live.pop(request_id, None) is not None:
                    self.router.abort(request_id)
                    self._release(1)
            return
        for k, (request_id, prompt, params) in enumerate(zip(command.request_ids, command.prompts,
                                                             command.params)):
            try:
                replica = self.router.add(request_id, prompt, params)
            except RequestError as e:
                self._release(1)
                command.sink(k, Failure(str(e), 400))
                continue
            self.metrics.routed.labels(self.metrics.model, str(replica)).inc()
            self._live[request_id] = _Live(k, command.sink, command.arrival)

    def _deliver(self, chunks: list[StreamChunk], errors: list[tuple[str, str]]) -> None:
        now = time.perf_counter()
        for chunk in chunks:
            live = self._live.get(chunk.request_id)
            if live is None:
                continue
            if chunk.token_ids:
                if live.last_token is None:
                    self.metrics.ttft.labels(self.metrics.model).observe(now - live.arrival)
                else:
                    self.metrics.itl.labels(self.metrics.model).observe((now - live.last_token) / len(chunk.token_ids))
                live.last_token = now
                self.metrics.generation_tokens.labels(self.metrics.model).inc(len(chunk.token_ids))
            if chunk.finished:
                del self._live[chunk.request_id]
                self._release(1)
            live.sink(live.index, chunk)
        for request_id, message in errors:
            live = self._live.pop(request_id, None)
            if live is not None:
                self._release(1)
                live.sink(live.index, Failure(message, 400))

    def _end(self, failure: Failure) -> None:
        """Tell every live sequence, and every one still in the inbox, that it ends with `failure`."""
        for live in self._live.values():
            live.sink(live.index, failure)
        self._release(len(self._live))
        self._live.clear()
        while (command := self._next(0)) is not None:
            if isinstance(command, _Submit):
                for k in range(len(command.request_ids)):
                    command.sink(k, failure)
                self._release(len(command.request_ids))
