"""Launch-time rank discovery: who am I, how many are we, which GPU is mine.

Rank and world size come from MPI itself (mpi4py's COMM_WORLD), the local rank from a shared-memory split of
COMM_WORLD, so they are right under any launcher that MPI understands (mpirun/mpiexec of Open MPI or MPICH,
srun with a PMI plugin). Environment variables are read only to decide whether a launcher started this process
at all: a plain `python -m ringlet ...` never imports mpi4py, because importing `mpi4py.MPI` initialises MPI
(slow, and as a singleton it can pick up a stray network stack or hang on a misconfigured PMI).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

# A process was started by an MPI launcher when any of these is set. Each launcher sets at least one:
#   PMI_RANK, PMI_SIZE      MPICH's hydra mpiexec/mpirun, Intel MPI, MVAPICH, Cray PALS, srun --mpi=pmi2
#   MPI_LOCALNRANKS         MPICH's hydra
#   PMIX_RANK               Open MPI 5 (PRRTE) mpirun, srun --mpi=pmix
#   OMPI_COMM_WORLD_SIZE    Open MPI 4 and 5 mpirun
# srun is handled apart (_srun_tasks): SLURM_PROCID alone is no sign, since sbatch sets it (to 0) in the batch
# script itself, and a one-task step (an interactive `srun --pty bash`) is a single process.
LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "MPI_LOCALNRANKS", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE")


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job. local_* count the ranks on this node (shared-memory domain)."""

    rank: int
    world_size: int
    local_rank: int
    local_size: int


SINGLE = RankInfo(rank=0, world_size=1, local_rank=0, local_size=1)


def _srun_tasks(env) -> int:
    """Tasks of the srun step this process belongs to; 0 outside an srun step.

    SLURM_STEP_ID and SLURM_STEP_NUM_TASKS are set by srun for each task of a step, never in a batch script or
    an salloc shell.
    """
    if "SLURM_STEP_ID" not in env:
        return 0
    value = env.get("SLURM_STEP_NUM_TASKS", "1")
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"SLURM_STEP_NUM_TASKS={value!r} is not an integer") from None


def launched(env=None) -> bool:
    """True when an MPI launcher or a multi-task srun step started this process (see LAUNCHER_VARS)."""
    env = os.environ if env is None else env
    return any(name in env for name in LAUNCHER_VARS) or _srun_tasks(env) > 1


def _expected_size(env):
    """The world size the launcher announced, or None where it announces none (a PMIx-only launcher)."""
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if name in env:
            try:
                return name, int(env[name])
            except ValueError:
                raise RuntimeError(f"{name}={env[name]!r} is not an integer") from None
    tasks = _srun_tasks(env)
    if tasks > 1:
        return "SLURM_STEP_NUM_TASKS", tasks
    return None


@functools.cache
def discover() -> RankInfo:
    """This process's RankInfo: RankInfo(0, 1, 0, 1) when no launcher started it, else asked of MPI, once per
    process (the asking is collective: a later call, made after other ranks have left, must not ask again).

    Raises RuntimeError naming the fix when a launcher started the process but mpi4py (or the MPI library it
    loads) is missing, or when MPI sees a different world size than the launcher started, which is what happens
    when mpi4py loads one MPI (say the pip `mpich` wheel's) and the ranks were started by another's mpirun (say
    Open MPI's): each rank then comes up alone as rank 0 of 1.
    """
    env = os.environ
    if not launched(env):
        return SINGLE
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise RuntimeError(
            f"this process was started by an MPI launcher but mpi4py cannot be imported ({exc}); "
            "install it with `pip install mpi4py` (and an MPI: `pip install mpich`, or load your cluster's MPI "
            "module), or run without a launcher for a single process") from None
    except RuntimeError as exc:
        # mpi4py's ABI-neutral wheels raise RuntimeError("cannot load MPI library ...") when no libmpi is found.
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RuntimeError(
            f"mpi4py found no MPI library ({first}); `pip install mpich` or load your cluster's MPI module, "
            "or point MPI4PY_LIBMPI at the libmpi of the MPI whose mpirun you use") from None

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    expected = _expected_size(env)
    if expected is not None and expected[1] != size:
        name, value = expected
        library = " ".join(MPI.Get_library_version().replace("\0", "").splitlines()[0].split())
        raise RuntimeError(
            f"the launcher started {value} ranks ({name}={value}) but MPI sees a world of {size}: mpi4py loaded "
            f"'{library}', which is not the MPI of the launcher. Use the mpirun of that MPI, or set MPI4PY_LIBMPI "
            "to the libmpi of the launcher's MPI; under srun pass --mpi=pmi2 (MPICH) or --mpi=pmix (Open MPI)")
    local = world.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    try:
        local_rank, local_size = local.Get_rank(), local.Get_size()
    finally:
        local.Free()
    return RankInfo(rank=rank, world_size=size, local_rank=local_rank, local_size=local_size)


def device_for(info: RankInfo, torch):
    """The torch.device this rank computes on: `cuda:{local_rank % device_count}` when CUDA is available, else cpu.

    torch is passed in so that rank discovery never imports it. The modulo lets more ranks than GPUs share them
    (tests, debugging) and keeps working when the launcher gives each rank one visible GPU (srun --gpus-per-task
    sets CUDA_VISIBLE_DEVICES per rank: every rank then sees its own GPU as cuda:0).
    """
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count > 0:
            return torch.device(f"cuda:{info.local_rank % count}")
    return torch.device("cpu")
