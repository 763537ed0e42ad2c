"""Running the HTTP server (uvicorn) on rank 0 beside the engine thread, from start-up to a graceful stop."""
from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import time

import uvicorn

from .app import build_app
from .engine_loop import EngineLoop
from .metrics import ServerMetrics
from .protocol import ServedModel

GRACEFUL_SHUTDOWN_S = 5


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        """uvicorn's handlers (SIGINT/SIGTERM start a graceful shutdown), without re-raising the signal once the
        server has stopped: the caller still stops the engine thread and the other ranks, then returns."""
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve_http(args, sock: socket.socket, router, engine, on_fatal, dp: int = 1, tp: int = 1) -> None:
    """Serve on the listening `sock` until SIGINT/SIGTERM, or until the engine fails (on_fatal(exc) is called,
    then the server stops). Meanwhile an EngineLoop owns `router` (mpi.serve_router.ServeRouter) on its own
    thread; on the way out it is stopped (which stops the other replicas). `engine` is replica 0's Engine, read
    here for the model's facts before the engine thread starts, never after."""
    name = args.served_model_name or args.model
    model = ServedModel(name, engine.tokenizer, engine.model_config.vocab_size, engine.max_model_len,
                        int(time.time()))
    metrics = ServerMetrics(name, router.replicas)
    server: _Server | None = None

    def fatal(exc: BaseException) -> None:
        on_fatal(exc)
        if server is not None:
            server.should_exit = True

    capacity = args.max_num_seqs * dp
    loop = EngineLoop(router, engine.device, metrics, capacity, args.max_queue, fatal)
    config = uvicorn.Config(build_app(loop, model, metrics, args.api_key), log_level="warning",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, lifespan="off")
    server = _Server(config)
    host, port = sock.getsockname()[:2]

    async def run() -> None:
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            shown = f"[{host}]" if ":" in host else host
            print(f"ringlet serve: {name} on http://{shown}:{port}/v1 (dp {dp} x tp {tp}, {capacity} running + "
                  f"{args.max_queue} queued, max_model_len {engine.max_model_len})", file=sys.stderr, flush=True)
        await task

    loop.start()
    try:
        asyncio.run(run())
    finally:
        loop.stop()
        sock.close()
