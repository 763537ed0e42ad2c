"""The server's Prometheus metrics (prometheus_client, in a registry of their own), labelled by the served model
and, for what describes one engine, by replica (the data-parallel index; 0 without data parallelism).

    ringlet_requests_total{model, outcome}             API requests by how they ended: stop / length (finished;
                                                        "length" if any choice hit its token limit), aborted (the
                                                        client went away), error (refused: 4xx/5xx), rejected (429)
    ringlet_prompt_tokens_total{model}                 prompt tokens of accepted requests (as in their usage)
    ringlet_generation_tokens_total{model}             tokens generated (aborted requests' included)
    ringlet_time_to_first_token_seconds{model}         histogram: request accepted -> first token out of the engine
    ringlet_inter_token_latency_seconds{model}         histogram: between consecutive tokens of one sequence
    ringlet_requests_running{model, replica}           sequences in the engine's running batch
    ringlet_requests_queued{model, replica}            sequences waiting in the engine (preempted ones included)
    ringlet_kv_pages_used{model, replica}              KV cache pages held by sequences
    ringlet_kv_pages_free{model, replica}              KV cache pages free
    ringlet_preemptions_total{model, replica}          sequences preempted (pages taken back, recomputed later)
    ringlet_routed_requests_total{model, replica}      sequences the router sent to each replica
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

OUTCOMES = ("stop", "length", "aborted", "error", "rejected")
# Seconds; token latencies from a fraction of a millisecond (GPU decode) to seconds (queued, or a CPU run).
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 2.5)


class ServerMetrics:
    """Every metric of one server. Thread-safe (prometheus_client's own locks): the HTTP thread counts requests,
    the engine thread counts tokens, observes latencies and sets the engine gauges."""

    def __init__(self, model: str, replicas: int):
        self.model = model
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ringlet_requests", "API requests by outcome", ["model", "outcome"], registry=r)
        self.prompt_tokens = Counter("ringlet_prompt_tokens", "Prompt tokens of accepted requests", ["model"],
                                     registry=r)
        self.generation_tokens = Counter("ringlet_generation_tokens", "Generated tokens", ["model"], registry=r)
        self.ttft = Histogram("ringlet_time_to_first_token_seconds", "Request accepted to first token", ["model"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("ringlet_inter_token_latency_seconds", "Time between consecutive tokens of a sequence",
                             ["model"], buckets=ITL_BUCKETS, registry=r)
        per_replica = ["model", "replica"]
        self.running = Gauge("ringlet_requests_running", "Sequences running", per_replica, registry=r)
        self.queued = Gauge("ringlet_requests_queued", "Sequences waiting in the engine", per_replica, registry=r)
        self.kv_used = Gauge("ringlet_kv_pages_used", "KV cache pages in use", per_replica, registry=r)
        self.kv_free = Gauge("ringlet_kv_pages_free", "KV cache pages free", per_replica, registry=r)
        self.preemptions = Counter("ringlet_preemptions", "Sequences preempted", per_replica, registry=r)
        self.routed = Counter("ringlet_routed_requests", "Sequences sent to each replica", per_replica, registry=r)
        for outcome in OUTCOMES:  # every series exists from the start, at 0
            self.requests.labels(model, outcome)
        for metric in (self.prompt_tokens, self.generation_tokens, self.ttft, self.itl):
            metric.labels(model)
        for g in range(replicas):
            for metric in (self.running, self.queued, self.kv_used, self.kv_free, self.preemptions, self.routed):
                metric.labels(model, str(g))
        self._preempted = [0] * replicas

    def outcome(self, outcome: str) -> None:
        self.requests.labels(self.model, outcome).inc()

    def replica_stats(self, replica: int, stats: dict) -> None:
        """Set the engine gauges of one replica from its stats (mpi.serve_router.engine_stats)."""
        labels = (self.model, str(replica))
        self.running.labels(*labels).set(stats["running"])
        self.queued.labels(*labels).set(stats["waiting"])
        self.kv_used.labels(*labels).set(stats["kv_pages_used"])
        self.kv_free.labels(*labels).set(stats["kv_pages_free"])
        new = stats["preemptions"] - self._preempted[replica]
        if new > 0:
            self.preemptions.labels(*labels).inc(new)
            self._preempted[replica] = stats["preemptions"]

    def render(self) -> tuple[bytes, str]:
        """(the Prometheus text exposition, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
