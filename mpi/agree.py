"""The start-up agreement check: every rank must run the same configuration on the same weights.

Each rank hashes its configuration (a msgpack of the settings that change results) and its weights (cheaply: for
every tensor its name, shape, dtype and up to 4096 evenly strided elements' bytes, blake2b), the ranks exchange
the two digests, and every rank refuses with the same message when any rank differs from rank 0.
"""
from __future__ import annotations

import hashlib

import torch
from ringlet.errors import ConfigError

from . import control

SAMPLES = 4096


def hash_config(settings: dict) -> str:
    return hashlib.blake2b(control.pack(settings), digest_size=16).hexdigest()


def _hash_tensor(h, t: torch.Tensor) -> None:
    h.update(f"{tuple(t.shape)}|{t.dtype}".encode())
    flat = t.detach().reshape(-1)
    if flat.numel():
        step = max(1, flat.numel() // SAMPLES)
        sample = torch.cat([flat[::step][:SAMPLES], flat[-1:]]).contiguous().cpu()
        h.update(sample.view(torch.uint8).numpy().tobytes())


def hash_weights(weights: dict) -> str:
    """Digest of a weight dict (tensors, or quantized weight objects whose tensor attributes are hashed)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(weights):
        value = weights[name]
        h.update(name.encode() + b"\0")
        parts = value if isinstance(value, tuple) else (value,)
        for part in parts:
            if isinstance(part, torch.Tensor):
                _hash_tensor(h, part)
            else:
                h.update(type(part).__name__.encode())
                for key, attr in sorted(vars(part).items()):
                    if isinstance(attr, torch.Tensor):
                        h.update(key.encode())
                        _hash_tensor(h, attr)
                    else:
                        h.update(f"{key}={attr!r}".encode())
    return h.hexdigest()


def fingerprint(settings: dict, weights: dict) -> dict:
    """This rank's {"config": digest, "weights": digest} (computed locally, compared by `check_agreement`)."""
    return {"config": hash_config(settings), "weights": hash_weights(weights)}


def check_agreement(comm, mine: dict) -> None:
    """Exchange every rank's `fingerprint` and raise ConfigError on every rank, naming the first rank that differs
    from rank 0, when the ranks' settings or weights differ (every rank sees the same list, so all refuse alike)."""
    every = control.allgather(comm, mine)
    for key, what, fix in (("config", "configuration", "start every rank with the same flags"),
                           ("weights", "model weights", "every rank must load the same checkpoint (--model)")):
        for rank, digest in enumerate(every):
            if digest[key] != every[0][key]:
                raise ConfigError(f"ranks disagree on the {what}: rank {rank} has {digest[key][:12]} but rank 0 "
                                  f"has {every[0][key][:12]}; {fix}")
