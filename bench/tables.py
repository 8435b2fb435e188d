"""What `inferq bench` prints: the figures of each benchmark as text tables, and one-line descriptions of the
machine and of the engine setup."""

from __future__ import annotations

from typing import Any

from inferq.bench.bulk import INFERQ, RUN_BATCH


def describe_environment(env: dict[str, Any]) -> str:
    versions = ", ".join(f"{name} {v}" for name, v in env["versions"].items())
    return f"{env['machine']}, {env['cpus']} CPUs, Python {env['python']}, {env['platform']}; {versions}"


def engine_setup(report: dict[str, Any]) -> str:
    """How inferq's own worker ran vLLM in a bench report (INFERQ_ENGINE_MODEL_IN_CORE, INFERQ_ENGINE_SPIN_MS)."""
    where = "in vLLM's engine core" if report.get("inferq_model_in_core") else "in a process of its own"
    return f"the model {where}, busy-wait {report.get('inferq_engine_spin_ms', 1000):g} ms"


def table(results: list[dict[str, Any]]) -> str:
    """The figures of several runs side by side, one column per run."""
    rows = [
        ("target", lambda r: r["target"]),
        ("concurrency / rate", lambda r: r["load"]),
        ("completed / errors", lambda r: f"{r['completed']} / {r['errors']}"),
        ("duration s", lambda r: f"{r['duration_s']:.2f}"),
        ("requests/s", lambda r: f"{r['request_throughput']:.2f}"),
        ("output tok/s", lambda r: f"{r['output_throughput']:.0f}"),
        ("total tok/s", lambda r: f"{r['total_throughput']:.0f}"),
    ]
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        for stat in ("mean", "p50", "p90", "p99"):
            rows.append((f"{metric[:-3].upper()} {stat} ms", lambda r, m=metric, s=stat: f"{r[m][s]:.1f}"))
    width = max(len(name) for name, _ in rows)
    cols = [[str(get(r)) for _, get in rows] for r in results]
    col_w = [max(len(c) for c in col) for col in cols]
    lines = []
    for i, (name, _) in enumerate(rows):
        cells = "  ".join(col[i].rjust(w) for col, w in zip(cols, col_w, strict=True))
        lines.append(f"{name:<{width}}  {cells}")
    return "\n".join(lines)


def bulk_table(report: dict[str, Any]) -> str:
    lines = [f"{'round':<6}{'target':<22}{'wall s':>8}{'out tokens':>12}{'tok/s':>9}{'errors':>8}{'ratio':>8}"]
    for row in report["rounds"]:
        for name in (RUN_BATCH, INFERQ):
            r = row[name]
            ratio = f"{row['ratio']:.3f}" if name == INFERQ else ""
            lines.append(
                f"{row['round']:<6}{name:<22}{r['wall_s']:>8.1f}{r['output_tokens']:>12}{r['tok_per_s']:>9.0f}"
                f"{r['errors']:>8}{ratio:>8}"
            )
    lines.append(f"ratio inferq / run-batch (tok/s, wall included), median of {len(report['rounds'])}: "
                 f"{report['median_ratio']:.3f}")  # fmt: skip
    return "\n".join(lines)


def queue_table(report: dict[str, Any]) -> str:
    lines = [
        f"raw pipelined XADD on this server: {report['raw_xadd_per_s']:,.0f}/s (the limit)",
        f"{'workers':>8}{'producers':>10}{'requests/s':>12}{'added p50 ms':>14}{'added p99 ms':>14}"
        f"{'redis CPU %':>13}{'errors':>8}",
    ]
    for r in report["rows"]:
        lines.append(
            f"{r['workers']:>8}{r['producers']:>10}{r['requests_per_s']:>12,.0f}{r['added_ms_p50']:>14.2f}"
            f"{r['added_ms_p99']:>14.2f}{r['redis_cpu_pct']:>13.0f}{r['errors']:>8}"
        )
    return "\n".join(lines)
