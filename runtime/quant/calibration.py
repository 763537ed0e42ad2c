"""Calibration text and the statistics the calibrated methods need from it.

Text: gensim's Lee background corpus (shipped with gensim; nothing is fetched from a network), split by lines
into a calibration part (the first 75%) and a held-out part (the last 25%), on which quality is measured.
Statistics: for the input x [T, K] of every linear, H = 2 X^T X / n (GPTQ's Hessian, also AWQ's output-error
metric) and mean |x| per input channel (AWQ's activation scale), gathered through `Llama.observer`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..errors import ConfigError

HELDOUT_FRACTION = 0.25


@dataclass
class LinearStats:
    """hessian float32 [K, K] = 2 X^T X / n; act_mean float32 [K] = mean |x| per channel; tokens = n."""

    hessian: torch.Tensor
    act_mean: torch.Tensor
    tokens: int


@dataclass
class CalibrationText:
    calibration: str
    heldout: str
    sha256: str  # of the whole source text
    source: str


def lee_corpus_path() -> str:
    """gensim's test/test_data/lee_background.cor (located without importing gensim)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("calibration text: gensim is not installed (its lee_background.cor is the default "
                          "calibration text); pip install gensim or pass --calib-file")
    return os.path.join(spec.submodule_search_locations[0], "test", "test_data", "lee_background.cor")


def load_calibration_text(path: str | None = None) -> CalibrationText:
    """Read `path` (default: the Lee corpus) and split its lines: first 75% calibration, last 25% held out."""
    path = path or lee_corpus_path()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"calibration text {path}: cannot read it ({e})") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 4:
        raise ConfigError(f"calibration text {path}: has {len(lines)} non-empty lines; need at least 4 to split "
                          f"into calibration and held-out parts")
    cut = len(lines) - max(1, round(len(lines) * HELDOUT_FRACTION))
    return CalibrationText("\n".join(lines[:cut]), "\n".join(lines[cut:]),
                           hashlib.sha256(text.encode("utf-8")).hexdigest(), path)


def token_windows(tokenizer, text: str, tokens: int, context: int, what: str) -> list[list[int]]:
    """The first `tokens` tokens of `text` in windows of `context`; ConfigError if the text is shorter."""
    ids = tokenizer.encode(text)
    if len(ids) < tokens:
        raise ConfigError(f"{what} text is too short: {len(ids)} tokens, need {tokens} (lower the token count "
                          f"or give a longer text)")
    ids = ids[:tokens]
    return [ids[i:i + context] for i in range(0, tokens, context) if len(ids[i:i + context]) >= 2]


class StatsCollector:
    """A `Llama.observer`: accumulates X^T X and sum |x| (float64) per linear name."""

    def __init__(self) -> None:
        self.xtx: dict[str, torch.Tensor] = {}
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}

    def __call__(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double().cpu()
        if name not in self.xtx:
            self.xtx[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
            self.abs_sum[name] = torch.zeros(x.shape[1], dtype=torch.float64)
            self.count[name] = 0
        self.xtx[name] += x.T @ x
        self.abs_sum[name] += x.abs().sum(0)
        self.count[name] += x.shape[0]

    def stats(self) -> dict[str, LinearStats]:
        return {name: LinearStats((2 * self.xtx[name] / n).float(), (self.abs_sum[name] / n).float(), n)
                for name, n in self.count.items()}


def collect_stats(engine, text: str, tokens: int, context: int = 512) -> dict[str, LinearStats]:
    """Run the first `tokens` tokens of `text` through `engine` (a dense-weight Engine) and return the input
    statistics of every linear, keyed by its name in the model (e.g. "layers.0.attention.wqkv")."""
    windows = token_windows(engine.tokenizer, text, tokens, context, "calibration")
    collector = StatsCollector()
    engine.model.observer = collector
    try:
        for window in tqdm(windows, desc="calibrating", unit="window"):
            engine.score(window)
    finally:
        engine.model.observer = None
    return collector.stats()
