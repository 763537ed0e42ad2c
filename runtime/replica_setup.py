"""Start-up shared by the front ends that run over MPI ranks (`batch`, `serve`): the engine settings from the
command line, the collective steps that give every rank its part of a data/tensor-parallel replica, and the
watchdog-guarded skeleton both run (`run_on_ranks`)."""
from __future__ import annotations

import os


def add_rank_flags(p) -> None:
    """The flags of the commands that run over MPI ranks: --tp, --dp, --comm, --max-num-seqs, --heartbeat-timeout."""
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per replica (default 1)")
    p.add_argument("--dp", type=int, help="data-parallel replicas (default: ranks / tp)")
    p.add_argument("--comm", default="auto", choices=["auto", "ring", "mpi", "nccl"],
                   help="communicator for tensor-parallel all-reduces (default auto: NCCL on GPUs, else ring or "
                        "MPI by message size)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences each replica runs at once")
    p.add_argument("--heartbeat-timeout", type=float, default=20.0,
                   help="seconds of silence after which a hung rank ends the job (default 20; 180 while loading)")


def engine_config(args, device: str | None):
    """EngineConfig from the model flags (cli._add_model_flags) and --max-num-seqs."""
    from .cli import async_scheduling
    from .engine import EngineConfig
    return EngineConfig(device=device, dtype=args.dtype, attention=args.attention, kv_dtype=args.kv_dtype,
                        rope_scaling=args.rope_scaling, quant=args.quant, max_model_len=args.max_model_len,
                        kv_cache_tokens=args.kv_cache_tokens, max_num_seqs=args.max_num_seqs,
                        async_scheduling=async_scheduling(args))


def agreed_settings(args) -> dict:
    """What every rank must agree on (compared at start-up)."""
    # Not the model path: nodes may hold their own copies; the weights hash compares what was loaded.
    keys = ("dtype", "attention", "kv_dtype", "rope_scaling", "quant", "max_model_len", "kv_cache_tokens",
            "max_num_seqs", "tp", "dp", "comm")
    return {k: getattr(args, k) for k in keys}


def rank_device(args, info):
    """This rank's torch device: --device, else the rank's GPU, else the CPU (then one torch thread pool per rank
    sharing the node's cores, not one per core each)."""
    import torch
    from ringlet.mpi.ranks import device_for
    if args.device is None and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_size))
    return torch.device(args.device) if args.device else device_for(info, torch)


def build_replica(args, info, world, device):
    """Collective over `world` (every rank calls it at once): load the checkpoint, check that every rank runs the
    same settings and weights, and build this rank's part of its replica.

    Returns (layout: ringlet.mpi.parallel.Layout, replica: ringlet.mpi.parallel.Replica, messages: a duplicate of
    `world` for the messages between rank 0 and the replica leaders). Raises watchdog.RankError on every rank when
    any rank fails (a bad flag, a model that cannot be split, ranks that disagree).
    """
    from ringlet.mpi import agree, watchdog
    from ringlet.mpi.parallel import Replica, make_layout
    from ringlet.mpi.tp import check_tp

    from .checkpoint import load_checkpoint
    from .engine import check_engine_config

    config = engine_config(args, str(device))

    def load():
        layout = make_layout(info.world_size, info.rank, args.tp, args.dp)
        check_engine_config(config)  # a bad option fails before the weights load
        checkpoint = load_checkpoint(args.model)
        check_tp(checkpoint.config, layout.tp)
        return layout, checkpoint, agree.fingerprint(agreed_settings(args), checkpoint.weights)

    layout, checkpoint, mine = watchdog.collective(world, load)
    watchdog.collective(world, agree.check_agreement, world, mine)
    group = world.Split(color=layout.replica, key=info.rank)
    messages = world.Dup()  # rank 0 <-> leaders; apart from every other message
    replica = watchdog.collective(world, Replica, layout, group, world, checkpoint, config, args.comm, device)
    return layout, replica, messages


def run_on_ranks(args, info, prepare, work):
    """Run a multi-rank front end on this rank, under a Watchdog (see ringlet.mpi.watchdog).

    Set-up, collective (every rank at once; an error on any rank raises on rank 0 with that rank's message and
    makes the others return None): build this rank's part of its replica, then `prepare(layout, replica)`, this
    rank's front-end state (e.g. rank 0's input or socket). Then `work(layout, replica, messages, state)`, whose
    result is returned as (layout, result); a rank that raises in `work` ends every rank (MPI Abort, with its
    message). Every rank meets a barrier after `work` while heartbeats still run, so a rank lost at the very end is
    still reported.
    """
    from mpi4py import MPI
    from ringlet.mpi import watchdog

    world = MPI.COMM_WORLD
    device = rank_device(args, info)
    with watchdog.Watchdog(world, timeout=args.heartbeat_timeout) as dog:
        try:
            layout, replica, messages = build_replica(args, info, world, device)
            state = watchdog.collective(world, prepare, layout, replica)
        except watchdog.RankError:
            if info.rank == 0:
                raise
            return None
        dog.ready()
        try:
            result = work(layout, replica, messages, state)
            world.Barrier()
        except Exception as e:
            watchdog.fail(e)
        dog.stop()
    return layout, result
