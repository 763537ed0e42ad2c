"""`python -m ringlet.mpi [--device]`: check a launch. Prints one JSON line per rank, ordered by rank.

    ./launch.sh -n 4 --module ringlet.mpi
    {"rank": 0, "world_size": 4, "local_rank": 0, "local_size": 4, "host": "node1", "pid": 1234}
    ...

Rank 0 gathers every rank's line and prints them all, so the output is in rank order and proves that the ranks
can talk to each other, not only that they started. `--device` adds the torch device each rank would use (this
imports torch). Exits 1 with one line on stderr when discovery fails (e.g. mpi4py missing under a launcher).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys

from .ranks import device_for, discover


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ringlet.mpi", description=__doc__.splitlines()[0])
    parser.add_argument("--device", action="store_true", help="also print the torch device of each rank")
    args = parser.parse_args(argv)
    try:
        info = discover()
    except RuntimeError as exc:
        print(f"ringlet.mpi: error: {exc}", file=sys.stderr)
        return 1
    line = dataclasses.asdict(info)
    line.update(host=socket.gethostname(), pid=os.getpid())
    if args.device:
        import torch
        line["device"] = str(device_for(info, torch))
    lines = [line]
    if info.world_size > 1:
        from mpi4py import MPI  # already initialised by discover()
        lines = MPI.COMM_WORLD.gather(line, root=0)
    if info.rank == 0:
        for item in lines:
            print(json.dumps(item), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
