"""`inferq status` as text: one block per model, a row per lane and per worker; once, or again and again."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from inferq.producer.client import InferenceClient
from inferq.shared.settings import Settings


async def show_status(
    settings: Settings, models: list[str] | None, *, watch: bool, interval: float, as_json: bool
) -> None:
    """`inferq status`: print the report once, or again every `interval` seconds until interrupted."""
    async with InferenceClient(settings) as client:
        while True:
            report = await client.stats(models)
            if as_json:
                print(json.dumps(report), flush=True)
            else:
                if watch:
                    print("\x1b[2J\x1b[H", end="")  # clear the screen between refreshes
                print(render_status(report), flush=True)
            if not watch:
                return
            await asyncio.sleep(interval)


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s"


def render_status(report: dict[str, Any]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(report["time"]))
    if not report["models"]:
        return f"{stamp}  no queues and no live workers (nothing submitted yet under this key prefix?)"
    lines = [stamp]
    for model, m in report["models"].items():
        lines.append("")
        lines.append(
            f"model {model}: {len(m['workers'])} workers, {m['completions_per_s']:.1f} req/s, "
            f"{m['tokens_per_s']:.0f} tok/s, {m['dlq']} dead letters"
            + (f" ({m['dlq_dropped']} older ones dropped)" if m.get("dlq_dropped") else "")
        )
        lines.append(f"  {'lane':<8}{'length':>8}{'lag':>8}{'pending':>9}{'oldest':>9}  consumers (pending, idle)")
        for lane, x in m["lanes"].items():
            consumers = ", ".join(f"{c['name']} ({c['pending']}, {c['idle_ms'] / 1000:.1f}s)" for c in x["consumers"])
            lines.append(
                f"  {lane:<8}{x['length']:>8}{x['lag']:>8}{x['pending']:>9}{_age(x['oldest_pending_s']):>9}"
                f"  {consumers or '-'}"
            )
        if m["tenants"]:
            lines.append("  tenants (unfinished): " + ", ".join(f"{t} {n}" for t, n in sorted(m["tenants"].items())))
        for w in m["workers"]:
            lines.append(
                f"  worker {w['name']} on {w['host'] or '?'}: {w['inflight']}/{w['slots']} in flight "
                f"(capacity {w['capacity']}), {w['tokens_per_s']:.0f} tok/s, {w['completed']} done, "
                f"seen {w['last_seen_s']:.1f}s ago"
            )
    return "\n".join(lines)
