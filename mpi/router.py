"""Data parallel request routing: rank 0 hands work items to replica leaders, least-loaded first.

An item is {"i": index, "prompt": str | list[int], "params": SamplingParams fields}; a result is {"i": index, ...}
(`ReplicaServer.result`). Rank 0 keeps up to `capacity` unfinished items on each replica and gives the next item
to the replica with the fewest (ties: the lowest replica), so replicas that finish early get more; rank 0 also runs
replica 0 itself between polls. Items go out longest first (`longest_first`). Leaders send results back as they
finish, in any order (`batch` journals each one as it arrives). All messages are msgpack over MPI
(`control.Mailbox`: non-blocking sends and receives), so rank 0 and a leader can never block on each other. Each
item and each result is a message of its own: one under MPI's eager limit (a few KiB) is delivered while its
sender computes, where a larger one may move only when the sender next enters MPI, after its engine step. Sent in
batches and received blocking (Open MPI 4.1, DP-2 on 2 H200s, Llama-7B shape), the first 64 items reached the second
replica 51 ms late, it paused up to 75 ms between steps waiting for items and left 20 steps' worth of batch slots
empty in 700 (bench/results/dp_batch-2xH200-2026-11-27-512-blocking-timeline.json).
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

from ringlet.engine import Engine
from ringlet.errors import RequestError
from ringlet.sampling_params import SamplingParams

ASSIGN, RESULTS, STOP = 11, 12, 13


class ReplicaServer:
    """Runs assigned items on a leader's engine and collects their results."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.live: set[int] = set()
        self.done: list[dict] = []

    def add(self, item: dict) -> None:
        i = item["i"]
        try:
            self.engine.add_request(item["prompt"], SamplingParams(**item["params"]), request_id=str(i))
        except (RequestError, TypeError) as e:
            self.done.append({"i": i, "error": str(e)})
            return
        self.live.add(i)

    @property
    def busy(self) -> bool:
        return bool(self.live)

    def step(self) -> None:
        for chunk in self.engine.step():
            if chunk.finished:
                i = int(chunk.request_id)
                out = self.engine.pop_finished(chunk.request_id)
                self.live.discard(i)
                self.done.append(self.result(i, out))

    @staticmethod
    def result(i: int, out) -> dict:
        return {"i": i, "text": out.text, "token_ids": list(out.token_ids), "finish_reason": out.finish_reason,
                "prompt_tokens": len(out.prompt_token_ids)}

    def take(self) -> list[dict]:
        done, self.done = self.done, []
        return done


def longest_first(items: Iterable[dict]) -> list[dict]:
    """Items by decreasing max_tokens, input order among equals (a missing or malformed value counts as the
    default and is left for ReplicaServer.add to reject).

    A request holds a batch slot for up to max_tokens decode steps. In input order the last long requests start
    when the queue runs dry and finish alone, on one replica while the others idle: that tail is the same length
    whatever the replica count, so it eats into DP's gain (bench/dp_batch.py). Started first, they overlap the
    short ones (longest-processing-time-first scheduling)."""
    default = SamplingParams().max_tokens

    def tokens(item: dict) -> int:
        value = item["params"].get("max_tokens", default) if isinstance(item.get("params"), dict) else default
        return value if type(value) is int else default

    return sorted(items, key=tokens, reverse=True)


def route(local: ReplicaServer, items: Iterable[dict], on_result: Callable[[dict], None], capacity: int,
          mailbox=None, leaders: list[int] | None = None, idle_sleep: float = 0.002) -> None:
    """Rank 0: run every item on some replica, calling on_result once per item (in completion order).

    capacity: unfinished items per replica (the engine's max_num_seqs); leaders: world ranks of the replica
    leaders, leaders[0] = 0 (this rank); mailbox: a control.Mailbox on the world communicator (None for a single
    replica). Sends STOP to the other leaders at the end.
    """
    leaders = leaders or [0]
    pending = deque(longest_first(items))
    total = len(pending)
    load = [0] * len(leaders)
    done = 0

    def dispatch() -> None:
        batches: dict[int, list] = {}
        while pending:
            g = min(range(len(leaders)), key=lambda r: (load[r], r))
            if load[g] >= capacity:
                break
            load[g] += 1
            batches.setdefault(g, []).append(pending.popleft())
        for g, batch in batches.items():
            if g == 0:
                for item in batch:
                    local.add(item)
            else:
                for item in batch:  # one small message each: see the module docstring
                    mailbox.send({"items": [item]}, leaders[g], ASSIGN)

    def finish(g: int, results: list[dict]) -> None:
        nonlocal done
        for r in results:
            load[g] -= 1
            done += 1
            on_result(r)

    dispatch()
    while done < total:
        heard = False
        while mailbox is not None:
            got = mailbox.poll(tag=RESULTS)
            if got is None:
                break
            heard = True
            finish(leaders.index(got[0]), got[2])
        finish(0, local.take())
        # Refill before this rank's own step, not after it: a remote leader then has its new items while it is
        # still in its current step, one step (~10 ms for a 7B model at batch 64) sooner.
        dispatch()
        if local.busy:
            local.step()
        elif not heard and done < total:
            time.sleep(idle_sleep)
    for leader in leaders[1:]:
        mailbox.send(None, leader, STOP)
    if mailbox is not None:
        mailbox.flush()


def follow(local: ReplicaServer, mailbox) -> None:
    """A leader other than rank 0: run what rank 0 assigns, send results back, until STOP.

    Every message waiting is taken before each step: rank 0 may send several between two of this leader's steps,
    and taking one per step would leave a backlog that delays every later refill of a freed slot."""
    while True:
        got = mailbox.poll(source=0) if local.busy else mailbox.receive(source=0)
        while got is not None:
            _, tag, message = got
            if tag == STOP:
                mailbox.flush()
                return
            for item in message["items"]:
                local.add(item)
            got = mailbox.poll(source=0)
        if local.busy:
            local.step()
        for result in local.take():  # one small message each: see the module docstring
            mailbox.send([result], 0, RESULTS)
