"""Tensor and data parallel ranks: the layout of a job, and each rank's part of a model replica.

world = tp x dp ranks. Ranks [g tp, (g + 1) tp) form replica g, a tensor-parallel group; its first rank is the
replica's leader. A leader runs the whole Engine (scheduler, sampler) on its shard and, before every forward,
broadcasts that forward's plan (msgpack: token ids, positions, cache slots, block tables) to the group; the
other ranks (workers) replay each plan on their own shard and KV cache, so all-reduces inside the forward meet.
Rank 0 leads replica 0 and routes requests to replicas (`router`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from ringlet.checkpoint import Checkpoint
from ringlet.engine import Engine, EngineConfig
from ringlet.errors import ConfigError

from . import control
from .comm import make_communicator
from .tp import apply_tp

PLAN_SPIN_S = 0.05


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: replica (data-parallel index), tp_rank inside it, and every replica's leader."""

    tp: int
    dp: int
    rank: int

    @property
    def world(self) -> int:
        return self.tp * self.dp

    @property
    def replica(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def leader(self) -> bool:
        return self.tp_rank == 0

    @property
    def leaders(self) -> list[int]:
        return [g * self.tp for g in range(self.dp)]


def make_layout(world_size: int, rank: int, tp: int = 1, dp: int | None = None) -> Layout:
    """The layout of a job of world_size ranks; dp defaults to world_size // tp. ConfigError unless tp x dp is
    the world size."""
    if tp < 1 or (dp is not None and dp < 1):
        raise ConfigError(f"--tp and --dp must be >= 1, got tp={tp}, dp={dp}")
    if dp is None:
        if world_size % tp:
            raise ConfigError(f"--tp {tp} does not divide the job's {world_size} ranks; start it with "
                              f"`./launch.sh -n {tp * max(1, world_size // tp)} ...` or change --tp")
        dp = world_size // tp
    if tp * dp != world_size:
        raise ConfigError(f"--tp {tp} x --dp {dp} = {tp * dp} ranks, but the job has {world_size}; start it with "
                          f"`./launch.sh -n {tp * dp} ...` or change --tp/--dp")
    return Layout(tp, dp, rank)


class Replica:
    """This rank's part of a replica: its Engine (sharded under TP), plus plan broadcasting on the leader."""

    def __init__(self, layout: Layout, group, world, checkpoint: Checkpoint, config: EngineConfig,
                 comm_name: str = "auto", device: torch.device | None = None):
        """group: the replica's tensor-parallel mpi4py communicator (world.Split by replica). Collective: every
        rank of the world constructs its Replica at the same time (communicators are built collectively)."""
        self.layout, self.group = layout, group
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)  # Triton launches on the current device, whatever its tensors' device
        self.comm = None
        shard = None
        if layout.tp > 1:
            self.comm = make_communicator(comm_name, group, world, device)
            shard = lambda model: apply_tp(model, layout.tp, layout.tp_rank, self.comm)
        self.engine = Engine(checkpoint, config, shard=shard)
        if layout.tp > 1 and layout.leader:
            self.engine.runner.on_plan = self._broadcast

    def _broadcast(self, plan: dict) -> None:
        control.bcast(self.group, plan)

    @torch.inference_mode()
    def serve_plans(self) -> int:
        """Worker loop: replay the leader's plans until it says stop; returns the number of forwards run.

        On a GPU the worker queues each forward without waiting for it (the decode graphs' input buffers take
        turns, see cuda_graphs.py), so it has the next one queued as soon as the leader's plan arrives, and polls
        for that plan without sleeping for up to PLAN_SPIN_S: with async scheduling it comes while the forward
        before it runs, otherwise a few hundred microseconds after it, and a sleep would delay every step.
        """
        cuda = self.engine.device.type == "cuda"
        count = 0
        while True:
            plan = control.bcast(self.group, None, poll=True, spin=PLAN_SPIN_S if cuda else 0.0)
            if plan["op"] == "stop":
                return count
            self.engine.runner.run(plan)
            count += 1

    def stop_workers(self) -> None:
        """Leader: end the workers' loops (each leader once, when its replica has no more work)."""
        if self.layout.tp > 1 and self.layout.leader:
            control.bcast(self.group, {"op": "stop"})
