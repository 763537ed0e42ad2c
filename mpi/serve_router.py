"""Serving over data-parallel replicas: rank 0 sends each request to the replica with the fewest outstanding tokens
and relays what that replica streams back; the other replica leaders run what they are sent.

A replica's outstanding tokens: over its unfinished requests, prompt tokens + max_tokens - tokens produced so far
(what the request still holds in KV pages plus what it will still compute). Ties go to the replica with fewer
unfinished requests, then to the lower replica. Rank 0 runs replica 0 itself (`ServeRouter.step`); with one
replica the router is just that engine.

Messages, msgpack over a `control.Mailbox` on a world communicator (never pickle):
    rank 0 -> leader   ADD    [[request_id, prompt_ids, SamplingParams fields], ...]
                       ABORT  [request_id, ...]
                       STOP   None
    leader -> rank 0   OUT    {"chunks": [wire chunk, ...], "errors": [[request_id, message], ...], "stats": {...}}
                       BYE    None (the answer to STOP: the leader's last message; rank 0 reads everything up to
                              it, so every message a leader sent is received and its sends can complete)
A wire chunk is [request_id, text, token_ids, logprobs | None, finish_reason | None] with logprobs a list of
[token_id, logprob, [[token_id, logprob], ...]]. A leader sends OUT after every loop turn in which something
happened (output, errors, or changed stats), so rank 0's view of each replica's pages and queues stays current.
"""
from __future__ import annotations

import dataclasses

from ringlet.engine import Engine
from ringlet.errors import RequestError
from ringlet.outputs import StreamChunk, TokenLogprob
from ringlet.sampling_params import SamplingParams

ADD, ABORT, STOP, OUT, BYE = 21, 22, 23, 24, 25
# Seconds rank 0's engine loop waits for news when only other replicas have work, and when nothing runs at all
# (it still hears their page and queue counts).
REMOTE_POLL_S = 0.002
IDLE_POLL_S = 0.05


def engine_stats(engine: Engine) -> dict:
    """{"running", "waiting", "kv_pages_used", "kv_pages_free", "preemptions"} of one engine (ints)."""
    alloc = engine.kv.allocator
    return {"running": len(engine.scheduler.running), "waiting": len(engine.scheduler.waiting),
            "kv_pages_used": alloc.num_pages - alloc.num_free, "kv_pages_free": alloc.num_free,
            "preemptions": engine.scheduler.num_preemptions}


class EngineReplica:
    """One engine driven by request id: add, abort, step. Finished and aborted requests leave the engine at once
    (their outputs are popped), so the engine holds nothing for requests nobody will read."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; RequestError (queuing nothing) when the engine refuses it."""
        self.engine.add_request(prompt_ids, params, request_id=request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV pages now; unknown ids are ignored."""
        self.engine.abort(request_id)
        self.engine.pop_finished(request_id)

    @property
    def busy(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> list[StreamChunk]:
        chunks = self.engine.step()
        for chunk in chunks:
            if chunk.finished:
                self.engine.pop_finished(chunk.request_id)
        return chunks

    def stats(self) -> dict:
        return engine_stats(self.engine)


def to_wire(chunk: StreamChunk) -> list:
    logprobs = None if chunk.logprobs is None else [[lp.token_id, lp.logprob, list(lp.top.items())]
                                                   for lp in chunk.logprobs]
    return [chunk.request_id, chunk.text, list(chunk.token_ids), logprobs, chunk.finish_reason]


def from_wire(wire: list) -> StreamChunk:
    request_id, text, token_ids, logprobs, finish_reason = wire
    if logprobs is not None:
        logprobs = [TokenLogprob(t, lp, {int(i): v for i, v in top}) for t, lp, top in logprobs]
    return StreamChunk(request_id, text, list(token_ids), logprobs, finish_reason)


@dataclasses.dataclass
class _Routed:
    replica: int
    cost: int  # tokens still outstanding: prompt + max_tokens - produced


class ServeRouter:
    """Rank 0's side: replica 0's engine plus, under data parallelism, the other leaders behind a mailbox.

    Called from one thread only (the server's engine loop). `add`/`abort` take effect at once; `step` runs one step
    of replica 0 (when it has work), collects what the other replicas sent, and returns (chunks, errors): every new
    StreamChunk, and (request_id, message) for requests a replica refused.
    """

    def __init__(self, engine: Engine, mailbox=None, leaders: list[int] | None = None):
        """leaders: world ranks of the replica leaders, leaders[0] = 0 (this rank); mailbox: a control.Mailbox on
        the world communicator (None for a single replica)."""
        self.local = EngineReplica(engine)
        self.mailbox = mailbox
        self.leaders = leaders or [0]
        n = len(self.leaders)
        self.tokens = [0] * n  # outstanding tokens per replica
        self.requests = [0] * n  # unfinished requests per replica
        self.stats = [self.local.stats()] + [dict.fromkeys(self.local.stats(), 0) for _ in range(n - 1)]
        self._routed: dict[str, _Routed] = {}

    @property
    def replicas(self) -> int:
        return len(self.leaders)

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> int:
        """Send a request to the least-loaded replica; returns that replica's index. RequestError (routing
        nothing) when replica 0 refuses it."""
        g = min(range(self.replicas), key=lambda r: (self.tokens[r], self.requests[r], r))
        if g == 0:
            self.local.add(request_id, prompt_ids, params)
        else:
            self.mailbox.send([[request_id, list(prompt_ids), dataclasses.asdict(params)]], self.leaders[g], ADD)
        cost = len(prompt_ids) + params.max_tokens
        self._routed[request_id] = _Routed(g, cost)
        self.tokens[g] += cost
        self.requests[g] += 1
        return g

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it runs (its pages are freed there); unknown ids are ignored."""
        routed = self._forget(request_id)
        if routed is None:
            return
        if routed.replica == 0:
            self.local.abort(request_id)
        else:
            self.mailbox.send([request_id], self.leaders[routed.replica], ABORT)

    @property
    def idle_wait(self) -> float | None:
        """How long the caller may block waiting for new requests before calling `step` again (None: as long as
        it likes)."""
        if self.local.busy:
            return 0.0
        if self.replicas == 1:
            return None
        return REMOTE_POLL_S if self._routed else IDLE_POLL_S

    def step(self) -> tuple[list[StreamChunk], list[tuple[str, str]]]:
        chunks: list[StreamChunk] = []
        errors: list[tuple[str, str]] = []
        while self.mailbox is not None:
            got = self.mailbox.poll(tag=OUT)
            if got is None:
                break
            g = self.leaders.index(got[0])
            message = got[2]
            self.stats[g] = message["stats"]
            chunks += [from_wire(w) for w in message["chunks"] if w[0] in self._routed]
            errors += [(rid, text) for rid, text in message["errors"] if rid in self._routed]
        if self.local.busy:
            chunks += self.local.step()
        self.stats[0] = self.local.stats()
        for chunk in chunks:
            routed = self._routed.get(chunk.request_id)
            if routed is None:
                continue
            produced = min(len(chunk.token_ids), routed.cost)
            routed.cost -= produced
            self.tokens[routed.replica] -= produced
            if chunk.finished:
                self._forget(chunk.request_id)
        for request_id, _ in errors:
            self._forget(request_id)
        return chunks, errors

    def _forget(self, request_id: str) -> _Routed | None:
        routed = self._routed.pop(request_id, None)
        if routed is not None:
            self.tokens[routed.replica] -= routed.cost
            self.requests[routed.replica] -= 1
        return routed

    def stop(self) -> None:
        """Abort everything still running and end the other leaders' loops (returns once each has said BYE)."""
        for request_id in list(self._routed):
            self.abort(request_id)
        if self.mailbox is None:
            return
        for leader in self.leaders[1:]:
            self.mailbox.send(None, leader, STOP)
        talking = set(self.leaders[1:])
        while talking:
            source, tag, _ = self.mailbox.receive()
            if tag == BYE:
                talking.discard(source)
        self.mailbox.flush()


def lead(engine: Engine, mailbox) -> None:
    """A replica leader other than rank 0: run what rank 0 sends, stream the output back, until STOP."""
    replica = EngineReplica(engine)
    sent_stats = replica.stats()
    mailbox.send({"chunks": [], "errors": [], "stats": sent_stats}, 0, OUT)  # rank 0 shows this replica's pages
    while True:
        errors: list[list[str]] = []
        got = mailbox.poll(source=0) if replica.busy else mailbox.receive(source=0)
        while got is not None:
            _, tag, message = got
            if tag == STOP:
                mailbox.send(None, 0, BYE)
                mailbox.flush()
                return
            if tag == ADD:
                for request_id, prompt_ids, params in message:
                    try:
                        replica.add(request_id, prompt_ids, SamplingParams(**params))
                    except (RequestError, TypeError) as e:
                        errors.append([request_id, str(e)])
            elif tag == ABORT:
                for request_id in message:
                    replica.abort(request_id)
            got = mailbox.poll(source=0)
        chunks = replica.step() if replica.busy else []
        stats = replica.stats()
        if chunks or errors or stats != sent_stats:
            mailbox.send({"chunks": [to_wire(c) for c in chunks], "errors": errors, "stats": stats}, 0, OUT)
            sent_stats = stats
