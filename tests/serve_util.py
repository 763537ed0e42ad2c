"""Helpers of the serving tests: the real server as a subprocess on a free loopback port, and its /metrics."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
READY = re.compile(r"ringlet serve: .* on http://127\.0\.0\.1:(\d+)/v1")


class Server:
    """`python -m ringlet serve --port PORT ARGS` (or another launcher's command for the same), its stderr in a
    file. PORT 0: the server picks a free port and prints it. Start several at once, then `wait()` each: their
    loading overlaps.
    """

    def __init__(self, log: Path, *args: str, launcher: list[str] | None = None, env: dict | None = None,
                 port: int = 0):
        self.log = log
        self.args = [*(launcher or [sys.executable, "-m", "ringlet"]), "serve", "--port", str(port),
                     *map(str, args)]
        self._err = open(log, "w")
        self.proc = subprocess.Popen(self.args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=self._err,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.url = ""

    def wait(self, timeout: float = 120) -> "Server":
        """Block until the server prints its address (fails the test if it exits or takes longer)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = READY.search(self.log.read_text())
            if found:
                self.url = f"http://127.0.0.1:{found.group(1)}"
                return self
            if self.proc.poll() is not None:
                pytest.fail(f"{self.args} exited with {self.proc.returncode}:\n{self.log.read_text()}")
            time.sleep(0.1)
        self.kill()
        pytest.fail(f"{self.args} did not start within {timeout} s:\n{self.log.read_text()}")

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the server's process group and wait; returns its exit code (kills it after `timeout`)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        return self.exited(timeout)

    def exited(self, timeout: float) -> int:
        """Wait for the server to end by itself; its exit code (fails the test, killing it, after `timeout`)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.args} did not end within {timeout} s:\n{self.log.read_text()}")
        self._err.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._err.close()


def metrics(url: str) -> dict[tuple, float]:
    """Every sample of /metrics, parsed by prometheus_client: {(sample name, (label items, sorted)): value}."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(values: dict[tuple, float], name: str, **labels) -> float:
    """One sample's value (0 when the series does not exist)."""
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(predicate, timeout: float = 10, what: str = "condition"):
    """Poll predicate() until it returns a true value; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def idle_metrics(url: str, model: str, replicas: int = 1, timeout: float = 10) -> dict[tuple, float]:
    """/metrics once no replica holds KV pages any more (fails the test if that takes longer than `timeout`)."""
    def idle():
        values = metrics(url)
        used = [sample(values, "ringlet_kv_pages_used", model=model, replica=str(g)) for g in range(replicas)]
        return values if not any(used) else None
    return wait_for(idle, timeout, "the KV pages to return to the pool")
