"""Run under mpirun by tests/test_mpi_failure.py, and under srun (`./launch.sh --module mpi_fail_check R` with tests/
on PYTHONPATH) by tests/test_slurm.py: rank `argv[1]` raises while the others wait in a broadcast."""
import sys
import time

from mpi4py import MPI
from ringlet.mpi import control, watchdog

world = MPI.COMM_WORLD
with watchdog.Watchdog(world) as dog:
    dog.ready()
    try:
        if world.Get_rank() == int(sys.argv[1]):
            time.sleep(1)
            raise ValueError("boom on purpose")
        control.bcast(world, None, root=int(sys.argv[1]), poll=True)  # never comes
    except Exception as e:
        watchdog.fail(e)
