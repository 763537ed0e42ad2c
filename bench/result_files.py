"""Where benchmark results go: one JSON file per run under bench/results/, named by benchmark, GPU and date."""
from __future__ import annotations

import json
import re
from pathlib import Path


def write_results(name: str, gpu: str, date: str, out: Path | None, results: dict) -> Path:
    """Write `results` as JSON to `out`, by default bench/results/<name>-<gpu>-<date>.json; returns the path."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    out = out or Path(__file__).parent / "results" / f"{name}-{slug}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    return out
