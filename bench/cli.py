"""`inferq bench`: the commands of the benchmark harness. `inferq.cli` adds them as its `bench` group when the
harness's dependencies (the `bench` extra) are installed, and says how to get them when they are not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import psutil  # noqa: F401 - the bench extra's: importing this module is how the CLI knows it is installed
import typer

from inferq.console import base
from inferq.console.options import JsonOut, Model, RedisUrl, StreamInterval

TARGETS = ("inferq", "direct", "direct-inferq", "openai")
app = typer.Typer(
    help="Benchmarks side by side, on this machine, in one run: inferq against vLLM called directly, vLLM's "
    "OpenAI server and `vllm run-batch`; and the queue alone. `make bench` runs them all and writes BENCHMARKS.md's "
    "figures and plot."
)


def numbers(value: str, what: str) -> list[int]:
    try:
        numbers = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        base.die(f"{what} must be comma-separated whole numbers, e.g. 1,16,64")
    if not numbers or min(numbers) < 1:
        base.die(f"{what} must be at least 1")
    return numbers


@app.command("online")
def bench_online_command(
    target: Annotated[
        str,
        typer.Option(
            help="comma-separated: inferq; direct (AsyncLLM in this process, as vLLM ships); direct-inferq (the "
            "same, set up exactly as inferq's worker sets up its engine: the queue's cost alone is inferq over "
            "it); openai (vLLM's OpenAI server). Ratios are given over the first listed"
        ),
    ] = "inferq",
    model: Model = None,
    concurrency: Annotated[str, typer.Option(help="requests in flight at once; a list runs each in turn")] = "64",
    request_rate: Annotated[
        float | None, typer.Option(help="start requests at Poisson times at this rate per second (concurrency caps it)")
    ] = None,
    num_requests: Annotated[int, typer.Option("--num-requests", "-n", help="measured requests per run")] = 256,
    waves: Annotated[
        int, typer.Option(help="at least this many times the concurrency in requests per run (0: just -n)")
    ] = 0,
    warmup: Annotated[int, typer.Option(help="requests sent first and not measured")] = 16,
    rounds: Annotated[
        int,
        typer.Option(
            min=1,
            help="run everything this many times, the targets taking turns at each load; each figure is the "
            "median round's, and each target's output tok/s over the first target's is also given per round",
        ),
    ] = 1,
    freeze_idle: Annotated[
        bool,
        typer.Option(
            help="stop (SIGSTOP) the processes of the targets whose turn it is not, so each runs alone on the "
            "machine (only targets this command started: --local, direct); else idle engines still take CPU",
        ),
    ] = True,
    prompt_len: Annotated[int, typer.Option(help="words per generated prompt")] = 16,
    output_len: Annotated[
        int, typer.Option(help="max_tokens per request (greedy, so every target makes the same)")
    ] = 32,
    dataset: Annotated[
        Path | None, typer.Option(help='JSONL of {"prompt", "max_tokens"?} instead of generated prompts')
    ] = None,
    local: Annotated[
        bool, typer.Option(help="inferq: start a worker for the bench; openai: start vLLM's server")
    ] = False,
    engine: Annotated[str, typer.Option(help="with --local, inferq's worker engine: vllm, or standin")] = "vllm",
    url: Annotated[str | None, typer.Option(help="the OpenAI server's base URL (without --local)")] = None,
    stream_interval: StreamInterval = None,
    json_out: JsonOut = None,
    redis_url: RedisUrl = None,
) -> None:
    """Throughput and latency of one workload on each target, like `vllm bench serve`: request and token
    throughput; TTFT, TPOT, ITL and end-to-end latency (mean, p50, p90, p99); errors. Prints the targets
    side by side. inferq needs running workers for the model, or --local; openai needs --url, or --local."""
    from inferq.bench.direct import server_flags
    from inferq.bench.online import bench_online, dataset_prompts, fixed_prompts, inferq_target, openai_target, run_size
    from inferq.bench.tables import describe_environment, engine_setup, table

    targets = [t.strip() for t in target.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        base.die(f"unknown target(s) {', '.join(unknown)}; use {', '.join(TARGETS)}")
    if "openai" in targets and not (url or local):
        base.die("--target openai needs --url of a running server, or --local to start one")
    levels = numbers(concurrency, "--concurrency")
    settings = base.settings(
        redis_url=redis_url, model=model, max_inflight=max(levels), stream_interval=stream_interval
    )
    name = settings.model
    path = "" if set(targets) == {"inferq"} and engine != "vllm" else base.model_path(settings)
    total = max(run_size(num_requests, waves, c) for c in levels) + warmup
    prompts = dataset_prompts(dataset, total, output_len) if dataset else fixed_prompts(total, prompt_len, output_len)
    factories = {
        "inferq": lambda: inferq_target(
            settings, name, local_engine=engine if local else None, max_inflight=max(levels)
        ),
        "openai": lambda: openai_target(
            None if local else url, name, path, max_num_seqs=max(levels), max_model_len=settings.max_model_len,
            kv_gib=max(1, round(settings.kv_cache_gib)), stream_interval=settings.stream_interval,
            engine_flags=server_flags(settings),
        ),
    }  # fmt: skip
    if {"direct", "direct-inferq"} & set(targets):
        from inferq.bench.direct import direct_sender

        factories["direct"] = lambda: direct_sender(path, settings, as_shipped=True)
        factories["direct-inferq"] = lambda: direct_sender(path, settings, as_shipped=False)
    report = base.run(
        bench_online(
            {t: factories[t] for t in targets}, prompts[warmup:], prompts[:warmup], model=name,
            concurrencies=list(levels), rate=request_rate, num_requests=num_requests, waves=waves, rounds=rounds,
            freeze_idle=freeze_idle, on_result=lambda r: typer.echo(
                f"round {r['round']}, {r['target']}, {r['load']}: {r['output_throughput']:.0f} output tok/s", err=True
            ),
        )
    )  # fmt: skip
    # Every target streams the same way; without --local, only if the running workers (or the server at --url)
    # were started with the same interval.
    report["stream_interval"] = settings.stream_interval
    # direct and openai run vLLM as it ships; inferq's workers and direct-inferq with inferq's engine settings,
    # known for the worker only when --local starts it (INFERQ_ENGINE_SPIN_MS, INFERQ_ENGINE_MODEL_IN_CORE).
    tuned = (local and engine == "vllm") or "direct-inferq" in targets
    report["inferq_engine_spin_ms"] = settings.engine_spin_ms if tuned else None
    report["inferq_model_in_core"] = settings.engine_model_in_core if tuned else None
    where = describe_environment(report["environment"])
    ours = f"inferq's engine setup: {engine_setup(report)}; vLLM as it ships elsewhere; " if tuned else ""
    typer.echo(f"model {name}, {settings.stream_interval} tokens per streamed event; {ours}on {where}")
    typer.echo(table(report["results"]))
    for row in report["paired"] if rounds > 1 else ():
        each = " / ".join(f"{x:.2f}" for x in row["ratios"])
        typer.echo(f"{row['target']} / {row['base']}, {row['load']}: {each} by round, median {row['median']:.3f}")
    if json_out:
        json_out.write_text(json.dumps(report, indent=1))
    if any(r["errors"] for r in report["results"]):
        raise typer.Exit(base.EXIT_FAILED)


@app.command("bulk")
def bench_bulk_command(
    model: Model = None,
    requests: Annotated[int, typer.Option(help="OpenAI Batch chat lines in the file")] = 512,
    max_tokens: Annotated[int, typer.Option(help="max_tokens per line (greedy)")] = 32,
    rounds: Annotated[
        int, typer.Option(help="rounds, alternating which tool goes first; the verdict is the median")
    ] = 3,
    json_out: JsonOut = None,
) -> None:
    """The same OpenAI Batch file through `vllm run-batch` and `inferq bulk --local`, each from a cold start
    (launch to exit, engine load included): wall time, tokens/s and the ratio inferq / run-batch."""
    from inferq.bench.bulk import bench_bulk
    from inferq.bench.tables import bulk_table

    settings = base.settings(model=model)
    report = base.run(
        bench_bulk(settings, base.model_path(settings), requests=requests, max_tokens=max_tokens, rounds=rounds)
    )
    typer.echo(bulk_table(report))
    if json_out:
        json_out.write_text(json.dumps(report, indent=1))


@app.command("capacity")
def bench_capacity_command(
    workers: Annotated[int, typer.Option(help="stand-in workers (an engine that costs nothing)")] = 1,
    producer_procs: Annotated[int, typer.Option(help="producer processes, each an InferenceClient")] = 2,
    closed: Annotated[str, typer.Option(help="closed loop: callers per producer process, comma-separated")] = "8,64",
    rates: Annotated[
        str, typer.Option(help="open loop: offered requests/s in all, rising, comma-separated; stops once behind")
    ] = "1000,2000,4000,6000,8000,10000,12000",
    seconds: Annotated[float, typer.Option(help="seconds per cell")] = 5.0,
    rounds: Annotated[
        int,
        typer.Option(
            min=1,
            help="run every cell this many times, each round on a fresh server; a cell shows "
            "its median round, with every round's requests/s (a shared box's speed varies)",
        ),
    ] = 1,
    json_out: JsonOut = None,
) -> None:
    """How many requests/s the queue carries end to end through one Redis, and where it saturates: closed loop
    with many callers, open loop at rising rates, stand-in workers at no engine cost; latency p50/p99, Redis
    CPU, Redis commands and round trips per request, beside raw pipelined XADD on the same server."""
    from inferq.bench.capacity import bench_capacity, capacity_table

    report = base.run(
        bench_capacity(
            base.settings(), workers=workers, producer_procs=producer_procs,
            closed=numbers(closed, "--closed"), rates=[float(r) for r in numbers(rates, "--rates")], seconds=seconds,
            rounds=rounds, on_row=lambda r: typer.echo(f"{r['mode']} {r['load']:g} x {r['producer_procs']}: "
                                        f"{r['requests_per_s']:.0f} requests/s", err=True),
        )
    )  # fmt: skip
    _report(capacity_table(report), report, json_out)


@app.command("backlog")
def bench_backlog_command(
    lines: Annotated[int, typer.Option(min=1, help="OpenAI Batch lines in the job")] = 1_000_000,
    workers: Annotated[
        int, typer.Option(min=1, help="stand-in workers that drain it (an engine that costs nothing)")
    ] = 2,
    mode: Annotated[
        str, typer.Option(help="detached (bulk submit, then bulk runner feeds it) or attached (bulk IN -o OUT)")
    ] = "detached",
    max_tokens: Annotated[int, typer.Option(min=1, help="max_tokens per line (the stand-in makes exactly that)")] = 4,
    max_inflight: Annotated[int, typer.Option(min=1, help="each worker's slots")] = 256,
    status_every: Annotated[
        float, typer.Option(help="seconds between timed `inferq status` calls (`inferq status --watch`'s default)")
    ] = 2.0,
    keep_files: Annotated[bool, typer.Option(help="keep the input and output files (their folder is printed)")] = False,
    json_out: JsonOut = None,
) -> None:
    """A bulk job of --lines admitted whole with no worker running, held (Redis memory, per request and by
    kind of key), then drained by stand-in workers: time of each phase, `inferq status` latency throughout,
    peak RSS of every process and Redis's peak memory. Exits 1 unless every line is answered exactly once."""
    from inferq.bench.backlog import ATTACHED, DETACHED, answered_once, backlog_table, bench_backlog

    base.one_of(mode, (DETACHED, ATTACHED), "mode")
    report = base.run(
        bench_backlog(
            base.settings(), lines=lines, workers=workers, mode=mode, max_tokens=max_tokens,
            max_inflight=max_inflight, status_every_s=status_every, keep_files=keep_files,
            say=lambda line: typer.echo(line, err=True),
        )
    )  # fmt: skip
    typer.echo(backlog_table(report))
    if report["files"]:
        typer.echo(f"files: {report['files']}")
    if json_out:
        json_out.write_text(json.dumps(report, indent=1))
    if not answered_once(report):
        raise typer.Exit(base.EXIT_FAILED)


@app.command("queue")
def bench_queue_command(
    workers: Annotated[str, typer.Option(help="stand-in worker counts to measure, comma-separated")] = "1,2,4,8",
    producers: Annotated[str, typer.Option(help="closed-loop producer counts, comma-separated")] = "1,8,64",
    seconds: Annotated[float, typer.Option(help="seconds per (workers, producers) cell")] = 5.0,
    max_tokens: Annotated[int, typer.Option(help="tokens per request (the stand-in makes one per ms)")] = 16,
    json_out: JsonOut = None,
) -> None:
    """The queue alone, on a fresh embedded server with stand-in engines: requests/s end to end, the latency
    added outside the engine (p50/p99) and Redis CPU, by workers and producers; and raw XADD/s, the limit."""
    from inferq.bench.queue import bench_queue
    from inferq.bench.tables import queue_table

    report = base.run(
        bench_queue(
            base.settings(), workers=numbers(workers, "--workers"), producers=numbers(producers, "--producers"),
            seconds=seconds, max_tokens=max_tokens,
            on_row=lambda r: typer.echo(f"{r['workers']} workers, {r['producers']} producers: "
                                        f"{r['requests_per_s']:.0f} requests/s", err=True),
        )
    )  # fmt: skip
    _report(queue_table(report), report, json_out)


def _report(table: str, report: dict[str, Any], json_out: Path | None) -> None:
    """Print a queue bench's table, write its JSON if asked; exit 1 if any request failed."""
    typer.echo(table)
    if json_out:
        json_out.write_text(json.dumps(report, indent=1))
    if any(r["errors"] for r in report["rows"]):
        raise typer.Exit(base.EXIT_FAILED)
