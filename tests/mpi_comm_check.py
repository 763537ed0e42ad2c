"""Run under mpirun by tests/test_mpi_comm.py: every backend's collectives against numpy on known inputs.

Rank 0 prints one JSON line per case: the largest error against a float64 numpy sum of every rank's input (each
rank's input is regenerated from its seed), the tolerance for the dtype, whether every rank got the same bits, and
whether all_reduce returned the very tensor it was given (the documented in-place contract); then one line per
backend for broadcast + all_gather and one for vocab_parallel_logits.
"""
import hashlib
import json
import sys

import numpy as np
import torch
from mpi4py import MPI
from ringlet.kernels import linear_ref
from ringlet.mpi import control
from ringlet.mpi.comm import make_communicator

LENGTHS = [1, 2, 7, 1000, 1 << 20]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Relative size of one ulp (2^-mantissa bits).
UNIT = {"float32": 2.0 ** -23, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}


def inputs(rank: int, n: int, dtype: str) -> torch.Tensor:
    rng = np.random.default_rng([rank, n, list(DTYPES).index(dtype)])
    return torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(DTYPES[dtype])


def main() -> None:
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    backends = sys.argv[1].split(",")
    comms = {name: make_communicator(name, world, device=torch.device("cpu")) for name in backends}
    # A small chunk makes every length >= 2 * size * 3 take the chunked, pipelined path too.
    comms["ring-chunked"] = make_communicator("ring", world, chunk_elems=3)
    for name, comm in comms.items():
        for dtype in DTYPES:
            for n in LENGTHS:
                if name == "ring-chunked" and n > 1000:
                    continue
                x = inputs(rank, n, dtype)
                out = comm.all_reduce(x)
                digest = hashlib.sha256(out.view(torch.uint8 if out.dtype == torch.float32 else torch.int16)
                                        .numpy().tobytes()).hexdigest()
                digests = control.allgather(world, digest)
                if rank == 0:
                    exact = sum(inputs(r, n, dtype).double().numpy() for r in range(size))
                    err = np.abs(out.double().numpy() - exact)
                    # float32 accumulation over the ranks, then one rounding to the dtype (half an ulp);
                    # 2^-25 absolute covers float16's subnormals.
                    acc = size * 2.0 ** -24 * sum(np.abs(inputs(r, n, dtype).double().numpy()) for r in range(size))
                    tol = 0.5 * UNIT[dtype] * (np.abs(exact) + acc) + acc + 2.0 ** -25
                    print(json.dumps({"backend": name, "dtype": dtype, "n": n, "ok": bool((err <= tol).all()),
                                      "max_err": float(err.max()), "same_on_all": len(set(digests)) == 1,
                                      "inplace": out is x}), flush=True)
        # broadcast and all_gather, float32 and bfloat16
        for dtype in ("float32", "bfloat16"):
            x = inputs(rank, 7, dtype)
            got = comm.broadcast(x.clone(), root=size - 1)
            gathered = comm.all_gather(x)
            if rank == 0:
                ok_b = torch.equal(got, inputs(size - 1, 7, dtype))
                ok_g = gathered.shape == (size, 7) and all(torch.equal(gathered[r], inputs(r, 7, dtype))
                                                          for r in range(size))
                print(json.dumps({"backend": name, "dtype": dtype, "op": "broadcast+all_gather",
                                  "ok": bool(ok_b and ok_g)}), flush=True)
        # vocab_parallel_logits: rank r's rows of a head [size * 5, 8], its 3 rows of logits side by side
        x = inputs(0, 3 * 8, "bfloat16").view(3, 8)
        heads = [inputs(100 + r, 5 * 8, "bfloat16").view(5, 8) for r in range(size)]
        logits = comm.vocab_parallel_logits(x, heads[rank])
        if rank == 0:
            expected = torch.cat([linear_ref(x, w) for w in heads], dim=1).float()
            print(json.dumps({"backend": name, "op": "vocab_parallel_logits",
                              "ok": logits.dtype == torch.float32 and torch.equal(logits, expected)}), flush=True)
        comm.barrier()
    if rank == 0:
        auto = comms.get("auto")
        print(json.dumps({"auto": auto.describe() if auto else None}), flush=True)


if __name__ == "__main__":
    main()
