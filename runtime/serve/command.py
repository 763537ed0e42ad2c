"""`python -m ringlet serve` / `./launch.sh -n N serve --tp T --dp D`: the OpenAI-compatible server.

One rank: the process loads the engine, starts the engine thread and serves HTTP. N ranks (N = tp x dp): every
rank loads and agrees as `batch` does (runtime.replica_setup); rank 0 serves HTTP and leads replica 0, the other
replica leaders run `mpi.serve_router.lead`, tensor-parallel workers replay their leader's plans. Rank 0 binds
the port during the collective set-up, so a port in use ends every rank with one message. A rank that dies or
hangs ends the job through the Watchdog (mpirun/srun notice a death; heartbeats notice a hang), and an engine
failure on rank 0 ends it through `watchdog.fail`; shutting rank 0 down (SIGINT/SIGTERM) stops the others.
"""
from __future__ import annotations

import os
import signal
import socket

from ..errors import ConfigError, RingletError
from ..replica_setup import add_rank_flags


def add_parser(sub, add_model_flags) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with Prometheus /metrics")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                       "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one, printed at "
                                                          "start)")
    p.add_argument("--api-key", default=os.environ.get("RINGLET_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/... (default: $RINGLET_API_KEY, else none)")
    p.add_argument("--served-model-name", help="the model name clients ask for (default: the --model value)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="sequences that may wait beyond those running before requests get 429 (default 256)")
    add_rank_flags(p)
    add_model_flags(p)


def cmd_serve(args) -> int:
    from ringlet.mpi.ranks import discover
    if args.max_queue < 0:
        raise ConfigError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    info = discover()
    if info.world_size == 1:
        return _run_single(args)
    return _run_ranks(args, info)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; RingletError naming the address when that fails."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise RingletError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _run_single(args) -> int:
    from ringlet.mpi.parallel import make_layout
    from ringlet.mpi.serve_router import ServeRouter

    from ..engine import Engine
    from ..replica_setup import engine_config
    from .server import serve_http
    make_layout(1, 0, args.tp, args.dp)
    engine = Engine.from_path(args.model, engine_config(args, args.device))
    sock = bind(args.host, args.port)
    failure: list[BaseException] = []
    serve_http(args, sock, ServeRouter(engine), engine, on_fatal=failure.append)
    if failure:
        raise RingletError(f"the engine failed: {type(failure[0]).__name__}: {failure[0]}")
    return 0


def _run_ranks(args, info) -> int:
    from ringlet.mpi import watchdog
    from ringlet.mpi.control import Mailbox
    from ringlet.mpi.serve_router import ServeRouter, lead

    from ..replica_setup import run_on_ranks
    from .server import serve_http

    def prepare(layout, replica):
        return bind(args.host, args.port) if info.rank == 0 else None

    def work(layout, replica, messages, sock):
        if info.rank == 0:
            router = ServeRouter(replica.engine, Mailbox(messages), layout.leaders)
            serve_http(args, sock, router, replica.engine, on_fatal=watchdog.fail, dp=layout.dp, tp=layout.tp)
        else:
            # Ctrl-C reaches every rank of an mpirun job; only rank 0 acts on it, and stops the others.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            if layout.leader:
                lead(replica.engine, Mailbox(messages))
            else:
                replica.serve_plans()
        if layout.leader:
            replica.stop_workers()

    return 0 if run_on_ranks(args, info, prepare, work) is not None else 1
