"""Helpers of the MPI tests (tests/test_mpi_*.py): real mpirun launches with timeouts, and a small random model."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
LAUNCH = str(REPO / "launch.sh")
# Variables by which a launcher or SLURM tells a process its place, and launch.sh's own choices: none may leak in
# from the shell that runs pytest (say, pytest started under srun or mpirun). A site's MPI settings (OMPI_MCA_*,
# HYDRA_*, MPI4PY_LIBMPI) stay: the machine may need them to launch at all.
PLACE_PREFIXES = ("PMI_", "PMIX_", "OMPI_COMM_WORLD_", "OMPI_UNIVERSE_SIZE", "MPI_LOCALNRANKS", "MPI_LOCALRANKID",
                  "SLURM_", "RINGLET_MPIRUN", "RINGLET_SRUN_MPI", "RINGLET_RANK_MAP", "RINGLET_DEATHS")


def mpirun_path() -> str:
    """mpirun's path; fails, never skips, without one: the MPI tests are part of what CI must prove."""
    path = shutil.which("mpirun")
    if path is None:
        pytest.fail("no mpirun on PATH: pip install -e '.[test]' installs the `mpich` wheel, which brings one")
    return path


def clean_env(**extra) -> dict:
    """The test's environment without launcher variables; every rank runs this very python."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(PLACE_PREFIXES)}
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def start(args, env=None) -> subprocess.Popen:
    return subprocess.Popen(args, env=env or clean_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Wait for proc; on timeout kill its whole process group (mpirun and every rank) and fail the test."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} hung for {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(args, timeout=110, env=None) -> subprocess.CompletedProcess:
    return finish(start(args, env), timeout)


def batch(n: int, *args, timeout=110) -> subprocess.CompletedProcess:
    """`./launch.sh -n N batch ARGS --no-progress`."""
    return run([LAUNCH, "-n", str(n), "batch", *map(str, args), "--no-progress"], timeout)


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def rank_pid(ancestor: int, rank: int, deadline: float = 30) -> int:
    """The pid of MPI rank `rank` among the descendants of `ancestor` (hydra sets PMI_RANK in each rank's
    environment; ranks run in sessions of their own, so ancestry is what ties them to the test's launch): the rank
    itself, not launch.sh's rank_guard above it."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmdline = (entry / "cmdline").read_bytes()
                if f"PMI_RANK={rank}".encode() not in environ or b"ringlet" not in cmdline or b"rank_guard" in cmdline:
                    continue
                pid = int(entry.name)
                while pid > 1 and pid != ancestor:
                    pid = _parent(pid)
            except (OSError, ValueError, IndexError):
                continue
            if pid == ancestor:
                return int(entry.name)
        time.sleep(0.2)
    pytest.fail(f"no rank {rank} process appeared under pid {ancestor}")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_random_model(directory: Path, tokenizer, seed: int = 0, n_heads: int = 4, n_kv_heads: int = 2) -> Path:
    """A small random Llama (2 layers, dim 64, head_dim 16) as an HF directory, with the bundled tokenizer."""
    from ringlet.config import ModelConfig
    from ringlet.hf_loader import hf_name
    from ringlet.model import random_weights
    from safetensors.torch import save_file

    cfg = ModelConfig(vocab_size=tokenizer.backend.get_vocab_size(), dim=64, n_layers=2, n_heads=n_heads,
                      n_kv_heads=n_kv_heads, ffn_dim=128, head_dim=16, max_seq_len=512)
    weights = random_weights(cfg, torch.float32, torch.device("cpu"), seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
              "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
              "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
              "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len,
              "vocab_size": cfg.vocab_size, "tie_word_embeddings": False, "hidden_act": "silu",
              "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    (directory / "config.json").write_text(json.dumps(config))
    save_file({hf_name(n): t.contiguous() for n, t in weights.items()}, str(directory / "model.safetensors"))
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tokenizer.backend.id_to_token(tokenizer.bos_id),
        "eos_token": tokenizer.backend.id_to_token(tokenizer.eos_id), "add_bos_token": tokenizer.add_bos}))
    return directory
