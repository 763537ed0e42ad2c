"""`./launch.sh -n 2 serve --dp 2` under real mpirun: rank 0 serves HTTP and routes each request to the replica
with the fewest outstanding tokens; the output is the same as one replica's; a client that goes away frees its
pages on the replica it ran on; SIGINT stops every rank cleanly; a killed rank ends the server with its name."""
import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest
from mpi_util import LAUNCH, clean_env, mpirun_path, rank_pid, write_random_model
from ringlet import LLM, SamplingParams
from serve_util import Server, idle_metrics, metrics, sample, wait_for

NAME = "tiny-random"
BOUND = 30


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all held open until each is chosen). Chosen here rather than with --port 0
    because launch.sh's output filter may hold rank 0's "listening on" line back."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class DPServer(Server):
    def __init__(self, log, model, port: int):
        mpirun_path()
        super().__init__(log, "--dp", "2", "--model", model, "--served-model-name", NAME, launcher=[LAUNCH, "-n", "2"],
                         env=clean_env(OMP_NUM_THREADS="1"), port=port)
        self.url = f"http://127.0.0.1:{port}"

    def wait(self, timeout: float = 120) -> "DPServer":
        def up():
            if self.proc.poll() is not None:
                pytest.fail(f"{self.args} exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                return httpx.get(self.url + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False
        wait_for(up, timeout, f"{self.args} to answer /health")
        return self


@pytest.fixture(scope="module")
def setup(tmp_path_factory, checkpoint):
    """Two DP-2 jobs started at once: one to use and stop with Ctrl-C, one to lose a rank."""
    d = tmp_path_factory.mktemp("mpi_serve")
    model = write_random_model(d / "model", checkpoint.tokenizer, seed=8)
    servers = []
    try:
        for name, port in zip(("main", "victim"), free_ports(2)):
            servers.append(DPServer(d / f"{name}.log", model, port))
        reference = LLM(str(model), device="cpu")
        yield {"main": servers[0].wait(), "victim": servers[1].wait(), "reference": reference}
    finally:
        for server in servers:
            server.kill()


def test_dp_streams_equal_one_replica_and_spread_over_both(setup):
    server, reference = setup["main"], setup["reference"]
    prompts = [[40 + i, 41 + 2 * i, 42 + 3 * i] for i in range(8)]
    want = reference.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    before = metrics(server.url)

    async def one(c, prompt):
        stream = await c.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].text)
            else:
                usage = chunk.usage
        return "".join(text), usage

    async def run():
        c = openai.AsyncOpenAI(base_url=server.v1, api_key="none", max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(c, p) for p in prompts))
        finally:
            await c.close()

    got = asyncio.run(run())
    assert [text for text, _ in got] == [w.text for w in want]
    assert all(u.prompt_tokens == 3 and u.completion_tokens == 12 for _, u in got)
    after = idle_metrics(server.url, NAME, replicas=2)
    routed = [sample(after, "ringlet_routed_requests_total", model=NAME, replica=str(g))
              - sample(before, "ringlet_routed_requests_total", model=NAME, replica=str(g)) for g in (0, 1)]
    assert routed == [4, 4]  # equal requests alternate between the replicas
    assert sample(after, "ringlet_generation_tokens_total", model=NAME) - \
        sample(before, "ringlet_generation_tokens_total", model=NAME) == 96


def test_dp_disconnect_frees_the_remote_replicas_pages(setup):
    server = setup["main"]
    body = {"model": NAME, "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.v1 + "/completions", json={**body, "prompt": [1, 2, 3]}, timeout=60) as first:
        first_lines = first.iter_lines()  # kept: dropping the iterator would close the connection
        next(first_lines)  # routed to replica 0, which was idle
        with httpx.stream("POST", server.v1 + "/completions", json={**body, "prompt": [4, 5]}, timeout=60) as second:
            lines = second.iter_lines()
            while not next(lines).startswith("data: "):
                pass
            wait_for(lambda: sample(metrics(server.url), "ringlet_kv_pages_used", model=NAME, replica="1") > 0,
                     what="replica 1 to hold pages")
        # the second client is gone: replica 1 frees its pages while replica 0 still streams to the first
        wait_for(lambda: sample(m := metrics(server.url), "ringlet_kv_pages_used", model=NAME, replica="1") == 0
                 and sample(m, "ringlet_kv_pages_used", model=NAME, replica="0") > 0,
                 what="replica 1's pages to return while replica 0 still runs")
    after = idle_metrics(server.url, NAME, replicas=2)
    assert sample(after, "ringlet_requests_total", model=NAME, outcome="aborted") == 2
    assert sample(after, "ringlet_kv_pages_free", model=NAME, replica="1") == \
        sample(after, "ringlet_kv_pages_free", model=NAME, replica="0") > 0


def mpirun_pid(launch_pid: int) -> int:
    """The mpirun that launch.sh started (its child)."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"mpi" in (entry / "cmdline").read_bytes().split(b"\0")[0]:
                stat = (entry / "stat").read_text()
                if int(stat[stat.rindex(")") + 2:].split()[1]) == launch_pid:
                    return int(entry.name)
        except (OSError, ValueError):
            continue
    pytest.fail(f"no mpirun under launch.sh (pid {launch_pid})")


def test_sigint_stops_every_rank_cleanly(setup):
    # To mpirun alone: a terminal's Ctrl-C also reaches launch.sh's output filters, whose death would end mpirun
    # with SIGPIPE whatever the ranks do. mpirun forwards SIGINT to every rank; rank 0 shuts down and stops the rest.
    server = setup["main"]
    os.kill(mpirun_pid(server.proc.pid), signal.SIGINT)
    assert server.exited(BOUND) == 0, server.log.read_text()
    assert "Traceback" not in server.log.read_text()


def test_killed_rank_ends_the_server_and_is_named(setup):
    server = setup["victim"]
    pid = rank_pid(server.proc.pid, 1)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    code = server.exited(BOUND + 10)
    assert time.monotonic() - killed < BOUND
    log = server.log.read_text()
    assert code != 0 and f"ringlet: rank 1 (pid {pid} on" in log and "killed (SIGKILL)" in log, log
