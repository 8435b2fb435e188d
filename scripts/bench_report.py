"""`make bench`: every benchmark in one run on this machine, then the figures into BENCHMARKS.md (between its
`make bench` markers), the JSON into benchmarks/results/ and a plot of throughput and TTFT against
concurrency for the online targets (benchmarks/results/online-<model>.png).

    python scripts/bench_report.py            # all of it (~1 h on 2 cores)
    python scripts/bench_report.py --quick    # small runs, to check the harness end to end
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from inferq.producer.local import inferq_argv

ROOT = Path(__file__).resolve().parent.parent

RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- make bench: begin -->", "<!-- make bench: end -->"
# The first is the base of every paired ratio: the same engine, set up as inferq's worker sets it up, called
# directly. inferq over it is the cost of the queue alone; direct and openai are vLLM as it ships.
TARGETS = ("direct-inferq", "inferq", "direct", "openai")


def inferq(*args: str) -> None:
    cmd = inferq_argv(*args)
    print("$ inferq " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def online(
    model: str, levels: str, n: int, quick: bool, rounds: int = 1, waves: int = 8, warmup: int = 32
) -> dict[str, Any]:
    """Each target on the same prompts at each concurrency: n requests, or `waves` waves of the concurrency,
    after `warmup` requests at that concurrency; with rounds, the targets take turns and each figure is the
    median round's."""
    out = RESULTS / f"online-{model}.json"
    inferq("bench", "online", "--target", ",".join(TARGETS), "--local", "--model", model, "--concurrency", levels,
           "-n", str(n), "--waves", "2" if quick else str(waves), "--warmup", "8" if quick else str(warmup),
           "--rounds", "1" if quick else str(rounds), "--json", str(out))  # fmt: skip
    return json.loads(out.read_text())


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tput, ttft) = plt.subplots(1, 2, figsize=(10, 4))
    for target in TARGETS:
        rows = [r for r in report["results"] if r["target"] == target]
        xs = [r["concurrency"] for r in rows]
        tput.plot(xs, [r["output_throughput"] for r in rows], marker="o", label=target)
        ttft.plot(xs, [r["ttft_ms"]["p50"] for r in rows], marker="o", label=target)
    for ax, title, unit in ((tput, "output tokens/s", "tok/s"), (ttft, "TTFT p50", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(unit)
        ax.set_title(f"{title}, {report['model']}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def by(report: dict[str, Any], target: str, concurrency: int) -> dict[str, Any] | None:
    return next((r for r in report["results"] if r["target"] == target and r["concurrency"] == concurrency), None)


def pair(report: dict[str, Any], target: str, concurrency: int) -> dict[str, Any] | None:
    """`target` / direct-inferq at this concurrency, round by round (in each round the targets ran one after
    another)."""
    load = f"concurrency {concurrency}"
    return next((p for p in report["paired"] if p["load"] == load and p["target"] == target), None)


def paired_over(report: dict[str, Any], target: str, other: str, concurrency: int) -> float:
    """The median of the rounds' own `target` / `other` ratios (both runs of a round against the same base)."""
    a, b = pair(report, target, concurrency), pair(report, other, concurrency)
    if not (a and b):
        return 0.0
    ratios = sorted(x / y for x, y in zip(a["ratios"], b["ratios"], strict=True))
    return ratios[(len(ratios) - 1) // 2]


def online_md(report: dict[str, Any]) -> str:
    rounds = report.get("rounds", 1)
    how = f"median of {rounds} rounds, the targets taking turns" if rounds > 1 else "one round"
    if report.get("freeze_idle"):
        how += ", each alone on the machine"
    how += f"; {report.get('stream_interval', 1)} tokens per streamed event"
    lines = [
        f"**{report['model']}** ({how}). Output tok/s; *queue cost* is inferq over direct-inferq and *vs server* "
        "inferq over openai, each the median of the rounds' own ratios; TTFT and TPOT p50 in ms for "
        "direct-inferq / inferq / direct / openai.",
        "",
        "| concurrency | direct-inferq | inferq | queue cost | direct | openai | vs server | TTFT p50 | TPOT p50 "
        "| errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in sorted({r["concurrency"] for r in report["results"]}):
        runs = [by(report, t, c) for t in TARGETS]
        if not all(runs):
            continue
        tput = [f"{r['output_throughput']:,.0f}" for r in runs]  # type: ignore[index]
        queue_cost = pair(report, "inferq", c)
        ttft = " / ".join(f"{r['ttft_ms']['p50']:.0f}" for r in runs)  # type: ignore[index]
        tpot = " / ".join(f"{r['tpot_ms']['p50']:.1f}" for r in runs)  # type: ignore[index]
        errors = sum(r["errors"] for r in runs)  # type: ignore[index]
        lines.append(
            f"| {c} | {tput[0]} | {tput[1]} | {queue_cost['median'] if queue_cost else 0:.3f} | {tput[2]} "
            f"| {tput[3]} | {paired_over(report, 'inferq', 'openai', c):.3f} | {ttft} | {tpot} | {errors} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small runs (checks the harness, not for the record)")
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    q = args.quick
    reports = [online("tiny", "1,16" if q else "1,16,64,128", 32 if q else 256, q, rounds=3, waves=16)]
    if not q:
        # SmolLM2 steps are ~20x slower than tiny's, and this box's speed drifts by a third within minutes:
        # paired ratios (each round's targets back to back) carry the comparison. A small workload: 24
        # requests one at a time, 2 waves at 64 and 128, 8 warm-up requests. ~30 min with four targets.
        reports.append(online("smollm2", "1,64,128", 24, q, rounds=3, waves=2, warmup=8))
    for report in reports:
        plot(report, RESULTS / f"online-{report['model']}.png")
    inferq("bench", "bulk", "--model", "tiny", "--requests", "64" if q else "512", "--rounds", "1" if q else "3",
           "--json", str(RESULTS / "bulk.json"))  # fmt: skip
    inferq("bench", "queue", "--workers", "1,2" if q else "1,2,4,8", "--producers", "1,8" if q else "1,8,64",
           "--seconds", "1" if q else "5", "--json", str(RESULTS / "queue.json"))  # fmt: skip
    bulk = json.loads((RESULTS / "bulk.json").read_text())
    queue = json.loads((RESULTS / "queue.json").read_text())
    env = reports[0]["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    parts = [
        BEGIN,
        f"Generated by `make bench` on {started}: {env['machine']}, {env['cpus']} CPUs, Python {env['python']}, "
        f"{versions}. Raw figures: `benchmarks/results/*.json`.",
        "",
        f"### Online (`inferq bench online --target {','.join(TARGETS)} --local`)",
        "",
    ]
    for report in reports:
        parts += [
            online_md(report),
            "",
            f"![online {report['model']}](benchmarks/results/online-{report['model']}.png)",
            "",
        ]
    parts += ["### Bulk (`inferq bench bulk`)", "",
              "| round | run-batch s | inferq s | run-batch tok/s | inferq tok/s | ratio |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in bulk["rounds"]:
        rb, iq = row["vllm run-batch"], row["inferq bulk --local"]
        parts.append(f"| {row['round']} | {rb['wall_s']:.1f} | {iq['wall_s']:.1f} | {rb['tok_per_s']:.0f} "
                     f"| {iq['tok_per_s']:.0f} | {row['ratio']:.3f} |")  # fmt: skip
    parts += ["", f"Median ratio inferq / run-batch: **{bulk['median_ratio']:.3f}** ({bulk['requests']} chat lines, "
              f"{bulk['max_tokens']} tokens each, {bulk['model']}).", "", "### Queue alone (`inferq bench queue`)", "",
              f"Raw pipelined XADD on the same server: {queue['raw_xadd_per_s']:,.0f}/s. Stand-in engine, "
              f"{queue['tokens_per_request']} tokens per request at one per ms.", "",
              "| workers | producers | requests/s | added p50 ms | added p99 ms | Redis CPU % | errors |",
              "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in queue["rows"]:
        parts.append(f"| {r['workers']} | {r['producers']} | {r['requests_per_s']:,.0f} | {r['added_ms_p50']:.2f} "
                     f"| {r['added_ms_p99']:.2f} | {r['redis_cpu_pct']:.0f} | {r['errors']} |")  # fmt: skip
    parts.append(END)
    section = "\n".join(parts)
    (RESULTS / "summary.md").write_text(section + "\n")
    if q:
        print(section)
        return
    doc = ROOT / "BENCHMARKS.md"
    text = doc.read_text()
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n## Figures\n\n" + section + "\n"
    doc.write_text(text)
    print(f"BENCHMARKS.md updated; figures in {RESULTS}")


if __name__ == "__main__":
    main()
