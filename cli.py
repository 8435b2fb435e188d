"""inferq's command line: parses options and calls the libraries (producer/, worker/, shared/).

Exit codes: 0 ok, 1 the request failed, 2 usage error, 3 queue full, 4 timed out.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import click
import typer
from typer.core import TyperGroup

from inferq.shared import aio
from inferq.shared.errors import InferqError, QueueFull, RequestFailed, RequestNotFound, RequestTimeout

if TYPE_CHECKING:  # pydantic and the settings load on use: vLLM's spawned processes import this module too
    from inferq.shared.schemas import Result
    from inferq.shared.settings import Settings

EXIT_FAILED, EXIT_USAGE, EXIT_QUEUE_FULL, EXIT_TIMEOUT = 1, 2, 3, 4

app = typer.Typer(
    help="Queue-driven LLM inference: Redis Streams in, vLLM workers, tokens back over pub/sub.\n\n"
    "Quick start: `inferq worker --model tiny &` then `inferq submit --model tiny --prompt 'Hello'`. "
    "With no INFERQ_REDIS_URL every command uses an embedded valkey-server in INFERQ_DATA_DIR.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
redis_app = typer.Typer(help="The embedded Redis-compatible server (used when INFERQ_REDIS_URL is not set).")


class _DefaultRun(TyperGroup):
    """`inferq bulk IN.jsonl -o OUT.jsonl` runs `inferq bulk run ...`: a first word that is not a subcommand
    is the input file."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args.insert(0, "run")
        return super().resolve_command(ctx, args)


bulk_app = typer.Typer(
    cls=_DefaultRun,
    help="Offline jobs from JSONL files (simple lines or OpenAI Batch lines): `inferq bulk IN.jsonl -o OUT.jsonl`.",
)
dlq_app = typer.Typer(
    help="Dead letters: requests that failed for good (undecodable, refused by the engine, or delivered more "
    "than INFERQ_MAX_DELIVERIES times). Each keeps its original payload, the reason and the delivery count."
)
models_app = typer.Typer(help="Local models that need no model hub: tiny (tests) and smollm2 (SmolLM2-135M-Instruct).")
app.add_typer(redis_app, name="redis")
app.add_typer(models_app, name="models")
app.add_typer(dlq_app, name="dlq")
app.add_typer(bulk_app, name="bulk")
bench_app = typer.Typer(
    help="Benchmarks side by side, on this machine, in one run: inferq against vLLM called directly, vLLM's "
    "OpenAI server and `vllm run-batch`; and the queue alone. `make bench` runs them all and writes BENCHMARKS.md's "
    "figures and plot."
)
app.add_typer(bench_app, name="bench")

RedisUrl = Annotated[
    str | None, typer.Option("--redis-url", help="redis://, rediss:// or unix:// URL (env INFERQ_REDIS_URL)")
]
Model = Annotated[
    str | None, typer.Option("--model", "-m", help="tiny, smollm2, a local path or a hub id (env INFERQ_MODEL)")
]
StreamInterval = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="tokens per streamed event; the first token and the end go at once; 1: every token, at a cost in "
        "throughput (default 8)",
    ),
]


def _die(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _settings(**overrides: Any) -> Settings:
    from inferq.shared.settings import load_settings

    try:
        return load_settings(**overrides)
    except InferqError as exc:
        _die(str(exc), EXIT_USAGE)


def _run(coro: Any, *, sigterm_cancels: bool = True) -> Any:
    """Run a coroutine, turning inferq's errors into their exit codes and a one-line message."""
    try:
        return aio.run(coro, sigterm_cancels=sigterm_cancels)
    except QueueFull as exc:
        _die(str(exc), EXIT_QUEUE_FULL)
    except RequestTimeout as exc:
        _die(str(exc), EXIT_TIMEOUT)
    except (RequestFailed, RequestNotFound) as exc:
        _die(str(exc), EXIT_FAILED)
    except InferqError as exc:
        _die(str(exc), EXIT_USAGE if isinstance(exc, ValueError) else EXIT_FAILED)


# ---- submit / result ---------------------------------------------------------------------------------
@app.command()
def submit(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="the user message (or the raw prompt with --raw)")],
    system: Annotated[str | None, typer.Option(help="a system message to put before the prompt")] = None,
    model: Model = None,
    max_tokens: Annotated[int, typer.Option(help="most tokens to generate")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy, deterministic")] = 0.7,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="sampling seed, for repeatable answers")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable)")] = None,
    priority: Annotated[str, typer.Option(help="lane: high, normal or low")] = "normal",
    ttl: Annotated[
        float | None, typer.Option(help="seconds the request may wait and run; then it ends `expired`")
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="who the request is for (per-tenant caps apply)")] = None,
    wait: Annotated[
        float | None, typer.Option(help="if the queue is full, keep trying this many seconds (exit 3 after)")
    ] = None,
    raw: Annotated[bool, typer.Option("--raw", help="send PROMPT as-is, without the chat template")] = False,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="print the answer only when it is complete")] = False,
    stream_interval: Annotated[
        int | None,
        typer.Option(min=1, help="tokens per streamed event after the first (default: the worker's); 1: every token"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the final result as one JSON object")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the answer (exit 4 after)")] = 300.0,
    redis_url: RedisUrl = None,
) -> None:
    """Send one request through the queue and print the answer as it is generated.

    The text goes to stdout; timings and token counts to stderr. A worker for the model must be running
    (`inferq worker --model M`). Example: inferq submit -m smollm2 -p "What is the capital of France?"
    """
    from inferq.console.commands import submit_and_print

    settings = _settings(redis_url=redis_url, model=model)
    if raw and system:
        _die("--system needs the chat template; drop --raw", EXIT_USAGE)
    messages = (
        None
        if raw
        else [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": prompt}]
    )
    request = {
        "prompt": prompt if raw else None,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "stop": stop or [],
        "priority": priority,
        "ttl": ttl,
        "tenant": tenant,
        "wait": wait is not None,
        "wait_timeout": wait,
        "stream_interval": stream_interval,
    }
    result = _run(submit_and_print(settings, request, stream=not no_stream and not as_json, timeout=timeout))
    if as_json:
        typer.echo(json.dumps(result.model_dump(mode="json")))
    if result.status != "done":
        raise typer.Exit(EXIT_FAILED)


@app.command()
def result(
    request_id: Annotated[str, typer.Argument(help="the id printed by submit (or given as request_id)")],
    as_json: Annotated[bool, typer.Option("--json", help="print the whole record as JSON")] = False,
    redis_url: RedisUrl = None,
) -> None:
    """Show the stored result of a request: status, text, usage and timings."""
    from inferq.console.commands import fetch_result

    stored: Result = _run(fetch_result(_settings(redis_url=redis_url), request_id))
    if as_json:
        typer.echo(json.dumps(stored.model_dump(mode="json")))
    else:
        typer.echo(f"status: {stored.status}", err=True)
        if stored.error:
            typer.echo(f"error: {stored.error}", err=True)
        typer.echo(stored.text)


@app.command()
def cancel(
    request_id: Annotated[str, typer.Argument(help="the id printed by submit")],
    redis_url: RedisUrl = None,
) -> None:
    """Cancel a request. Queued: it ends `cancelled` and is never run. Running: its worker aborts it in the
    engine and it ends `cancelled` with the text so far. Prints the status after the call."""
    from inferq.console.commands import cancel_request

    typer.echo(_run(cancel_request(_settings(redis_url=redis_url), request_id)))


@app.command()
def status(
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="only this model (repeatable)")] = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="refresh every --interval seconds until Ctrl-C")] = False,
    interval: Annotated[float, typer.Option(help="seconds between refreshes with --watch")] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object (per refresh with --watch)")] = False,
    redis_url: RedisUrl = None,
) -> None:
    """Queues and workers per model and lane: length, lag (unread), pending (being run), oldest pending age,
    consumers and their idle time, dead letters, live workers with in-flight/slots/capacity and tokens/s,
    and the recent completion rate. What an operator or an autoscaler watches."""
    from inferq.console.commands import show_status

    _run(show_status(_settings(redis_url=redis_url), model or None, watch=watch, interval=interval, as_json=as_json))


# ---- bulk jobs -------------------------------------------------------------------------------------
@bulk_app.command("run")
def bulk_run(
    input_path: Annotated[Path, typer.Argument(help="JSONL input: simple lines or OpenAI Batch lines")],
    output: Annotated[Path, typer.Option("--output", "-o", help="JSONL output; re-run the same to resume")],
    model: Model = None,
    strict: Annotated[bool, typer.Option(help="refuse the whole file if any line is bad (lists them)")] = False,
    local: Annotated[
        bool, typer.Option("--local", help="start a worker for the job and stop it at the end (like vllm run-batch)")
    ] = False,
    engine: Annotated[str, typer.Option(help="with --local: vllm, or standin (a fixed-rate fake)")] = "vllm",
    redis_url: RedisUrl = None,
) -> None:
    """Run every line of INPUT through the queue and write one result line per input line to OUTPUT.

    Simple lines: {"custom_id", "prompt" | "messages", "max_tokens", ...}. OpenAI Batch lines: {"custom_id",
    "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}, answered in the
    shape of `vllm run-batch`. A bad line gets an error record and the rest runs (--strict: nothing runs).
    A full queue is waited out. Interrupted? Run the same command again: finished lines are not run again.
    Workers for the model must be running (`inferq worker --model M`), or use --local: it starts one (and,
    without INFERQ_REDIS_URL, the embedded Redis) for this job only.
    """
    from inferq.console.commands import run_bulk

    if engine not in ("vllm", "standin"):
        _die(f"unknown engine {engine!r}; use vllm or standin", EXIT_USAGE)
    settings = _settings(redis_url=redis_url, model=model)
    job, resumed = _run(
        run_bulk(settings, input_path, output, model=model, strict=strict, local_engine=engine if local else None)
    )
    again = f" ({resumed} were there from an earlier run)" if resumed else ""
    typer.echo(
        f"bulk job {job.id} {job.state}: {job.total} lines, {job.done} done, {job.failed} failed, "
        f"{job.invalid} invalid; {job.accounted} lines in {output}{again}",
        err=True,
    )
    if job.failed or job.invalid:
        raise typer.Exit(EXIT_FAILED)


@bulk_app.command("submit")
def bulk_submit(
    input_path: Annotated[Path, typer.Argument(help="JSONL input: simple lines or OpenAI Batch lines")],
    model: Model = None,
    redis_url: RedisUrl = None,
) -> None:
    """Start a detached job: the input is copied into Redis and the worker fleet runs it (any `inferq worker`,
    or `inferq bulk runner`). Prints the job id; follow it with `bulk status`, fetch it with `bulk download`.
    The job goes on if the process running it dies: another runner takes it over."""
    from inferq.console.commands import with_bulk_jobs

    settings = _settings(redis_url=redis_url, model=model)
    job = _run(with_bulk_jobs(settings, lambda jobs: jobs.submit(input_path, model=model)))
    typer.echo(f"bulk job {job.id}: {job.total} lines staged for model {job.model}", err=True)
    typer.echo(job.id)


@bulk_app.command("status")
def bulk_status(
    job_id: Annotated[str, typer.Argument(help="the id printed by `bulk submit`")],
    as_json: Annotated[bool, typer.Option("--json", help="the whole job record as JSON")] = False,
    redis_url: RedisUrl = None,
) -> None:
    """A job's state (validating, in_progress, finalizing, completed, failed, cancelling, cancelled), its
    counts, rate and ETA."""
    from inferq.console.commands import describe_job, with_bulk_jobs

    job = _run(with_bulk_jobs(_settings(redis_url=redis_url), lambda jobs: jobs.get(job_id)))
    typer.echo(json.dumps(job.to_dict()) if as_json else describe_job(job))


@bulk_app.command("list")
def bulk_list(
    limit: Annotated[int, typer.Option(help="at most this many, newest first")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per job")] = False,
    redis_url: RedisUrl = None,
) -> None:
    """Bulk jobs, newest first (ended ones are kept INFERQ_BULK_TTL_S seconds)."""
    from inferq.console.commands import describe_job, with_bulk_jobs

    for job in _run(with_bulk_jobs(_settings(redis_url=redis_url), lambda jobs: jobs.list(limit))):
        typer.echo(json.dumps(job.to_dict()) if as_json else describe_job(job))


@bulk_app.command("cancel")
def bulk_cancel(
    job_id: Annotated[str, typer.Argument(help="the id printed by `bulk submit` (or an attached job's id)")],
    redis_url: RedisUrl = None,
) -> None:
    """Stop a job: no more lines are queued, queued and running requests are cancelled; what finished is kept
    (`bulk download`). Prints the state after the call (cancelling, then cancelled once all is accounted for)."""
    from inferq.console.commands import with_bulk_jobs

    typer.echo(_run(with_bulk_jobs(_settings(redis_url=redis_url), lambda jobs: jobs.cancel(job_id))))


@bulk_app.command("download")
def bulk_download(
    job_id: Annotated[str, typer.Argument(help="the id printed by `bulk submit`")],
    output: Annotated[Path, typer.Option("--output", "-o", help="JSONL output; re-run to finish a partial one")],
    wait: Annotated[bool, typer.Option("--wait", help="wait for the job to end first")] = False,
    redis_url: RedisUrl = None,
) -> None:
    """Write a detached job's output: one line per input line, in the order they finished."""
    from inferq.console.commands import with_bulk_jobs

    job, lines = _run(
        with_bulk_jobs(_settings(redis_url=redis_url), lambda jobs: jobs.download(job_id, output, wait=wait))
    )
    typer.echo(f"bulk job {job.id} {job.state}: {lines} lines in {output}", err=True)


@bulk_app.command("runner")
def bulk_runner_command(redis_url: RedisUrl = None) -> None:
    """Run detached jobs only (no engine), until SIGTERM: for a fleet that keeps them off the GPU workers.
    Every `inferq worker` runs them too, unless started with --no-bulk-jobs."""
    from inferq.producer.bulk.detached import bulk_runner
    from inferq.worker.run import run_until_signalled

    settings = _settings(redis_url=redis_url)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise typer.Exit(_run(run_until_signalled(lambda: bulk_runner(settings)), sigterm_cancels=False))


# ---- dead letters -----------------------------------------------------------------------------------
@dlq_app.command("list")
def dlq_list(
    model: Model = None,
    count: Annotated[int, typer.Option(help="show at most this many, oldest first")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    redis_url: RedisUrl = None,
) -> None:
    """List the model's dead letters: id, request id, deliveries, reason."""
    from inferq.console.commands import with_dead_letters

    settings = _settings(redis_url=redis_url, model=model)
    letters = _run(with_dead_letters(settings, None, lambda d: d.list(count=count)))
    for letter in letters:
        row = letter.summary()
        if as_json:
            typer.echo(json.dumps(row))
        else:
            typer.echo(f"{row['id']}  {row['request_id'] or '-'}  deliveries={row['deliveries']}  {row['error']}")
    if not letters and not as_json:
        typer.echo(f"no dead letters for model {settings.model!r}", err=True)


@dlq_app.command("show")
def dlq_show(
    dead_letter_id: Annotated[str, typer.Argument(help="the id `inferq dlq list` printed")],
    model: Model = None,
    redis_url: RedisUrl = None,
) -> None:
    """Show one dead letter as JSON, with its original request (or, for poison, the raw payload size)."""
    from inferq.console.commands import with_dead_letters

    settings = _settings(redis_url=redis_url, model=model)
    letter = _run(with_dead_letters(settings, None, lambda d: d.show(dead_letter_id)))
    request = letter.request
    typer.echo(json.dumps({**letter.summary(), "request": request.payload() if request else None}, indent=2))


@dlq_app.command("retry")
def dlq_retry(
    dead_letter_ids: Annotated[list[str], typer.Argument(help="dead letter ids to enqueue again")],
    model: Model = None,
    redis_url: RedisUrl = None,
) -> None:
    """Enqueue the original requests again (same request ids; their failed results are replaced)."""
    from inferq.console.commands import with_dead_letters

    settings = _settings(redis_url=redis_url, model=model)

    async def retry_all(letters: Any) -> list[str]:
        return [await letters.retry(i) for i in dead_letter_ids]

    for request_id in _run(with_dead_letters(settings, None, retry_all)):
        typer.echo(f"re-enqueued {request_id}")


@dlq_app.command("purge")
def dlq_purge(
    model: Model = None,
    yes: Annotated[bool, typer.Option("--yes", help="really drop them (required)")] = False,
    redis_url: RedisUrl = None,
) -> None:
    """Drop every dead letter of the model. Their `failed` results stay readable until they expire."""
    from inferq.console.commands import with_dead_letters

    if not yes:
        _die("this drops every dead letter for good; add --yes to confirm", EXIT_USAGE)
    settings = _settings(redis_url=redis_url, model=model)
    dropped = _run(with_dead_letters(settings, None, lambda d: d.purge()))
    typer.echo(f"purged {dropped} dead letters of model {settings.model!r}")


# ---- worker -----------------------------------------------------------------------------------------
@app.command()
def worker(
    model: Model = None,
    max_inflight: Annotated[int | None, typer.Option(help="requests run at once")] = None,
    consumer: Annotated[str | None, typer.Option(help="consumer name in the group (default: host-pid-random)")] = None,
    engine: Annotated[str, typer.Option(help="vllm, or standin (a fixed-rate fake for queue tests)")] = "vllm",
    max_model_len: Annotated[int | None, typer.Option(help="context length")] = None,
    stream_interval: StreamInterval = None,
    bulk_jobs: Annotated[
        bool, typer.Option(help="also run steps of detached bulk jobs (`inferq bulk submit`), with no engine cost")
    ] = True,
    redis_url: RedisUrl = None,
) -> None:
    """Run a worker: join group `workers` on the model's streams and serve requests until SIGTERM.

    SIGTERM/Ctrl-C: stop reading and finish in-flight work (up to INFERQ_DRAIN_TIMEOUT_S); a second signal
    stops at once, leaving unfinished requests pending for other workers. Exits 1 if the engine dies.

    Each flag has an environment variable, which the flag overrides: INFERQ_MODEL, INFERQ_MAX_INFLIGHT,
    INFERQ_MAX_MODEL_LEN, INFERQ_STREAM_INTERVAL, INFERQ_REDIS_URL (README, "Configuration", lists them all).
    """
    from inferq.worker.models import resolve_model
    from inferq.worker.run import make_engine, serve

    if engine not in ("vllm", "standin"):
        _die(f"unknown engine {engine!r}; use vllm or standin", EXIT_USAGE)
    settings = _settings(
        redis_url=redis_url, model=model, max_inflight=max_inflight, max_model_len=max_model_len,
        stream_interval=stream_interval,
    )  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        path = (
            str(resolve_model(settings.model, settings.data_dir, log=lambda m: typer.echo(m, err=True)))
            if engine == "vllm"
            else settings.model
        )
    except InferqError as exc:
        _die(str(exc), EXIT_USAGE)
    alongside = None
    if bulk_jobs:
        from inferq.producer.bulk.detached import bulk_runner

        alongside = lambda: bulk_runner(settings, name=consumer)  # noqa: E731
    code = _run(
        serve(
            settings, make_engine(engine, path, settings), model=settings.model, consumer=consumer, alongside=alongside
        ),
        sigterm_cancels=False,  # serve() owns the worker's signals
    )
    # Everything is closed (Redis, engine). Tearing down torch and vLLM's modules at interpreter exit takes
    # seconds and cleans nothing more, so leave at once: `bulk --local` and supervisors wait on this exit.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---- benchmarks --------------------------------------------------------------------------------------
def _numbers(value: str, what: str) -> list[int]:
    try:
        numbers = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        _die(f"{what} must be comma-separated whole numbers, e.g. 1,16,64", EXIT_USAGE)
    if not numbers or min(numbers) < 1:
        _die(f"{what} must be at least 1", EXIT_USAGE)
    return numbers


@bench_app.command("online")
def bench_online_command(
    target: Annotated[
        str, typer.Option(help="comma-separated: inferq, direct (AsyncLLM in this process), openai")
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
    json_out: Annotated[Path | None, typer.Option("--json", help="write every figure here as JSON")] = None,
    redis_url: RedisUrl = None,
) -> None:
    """Throughput and latency of one workload on each target, like `vllm bench serve`: request and token
    throughput; TTFT, TPOT, ITL and end-to-end latency (mean, p50, p90, p99); errors. Prints the targets
    side by side. inferq needs running workers for the model, or --local; openai needs --url, or --local."""
    from inferq.bench.online import bench_online, dataset_prompts, fixed_prompts, inferq_target, openai_target, run_size
    from inferq.bench.stats import describe_environment, engine_setup, table

    targets = [t.strip() for t in target.split(",") if t.strip()]
    unknown = sorted(set(targets) - {"inferq", "direct", "openai"})
    if unknown:
        _die(f"unknown target(s) {', '.join(unknown)}; use inferq, direct, openai", EXIT_USAGE)
    if "openai" in targets and not (url or local):
        _die("--target openai needs --url of a running server, or --local to start one", EXIT_USAGE)
    levels = _numbers(concurrency, "--concurrency")
    settings = _settings(redis_url=redis_url, model=model, max_inflight=max(levels), stream_interval=stream_interval)
    name = settings.model
    path = "" if ("direct" not in targets and "openai" not in targets and engine != "vllm") else _model_path(settings)
    total = max(run_size(num_requests, waves, c) for c in levels) + warmup
    prompts = dataset_prompts(dataset, total, output_len) if dataset else fixed_prompts(total, prompt_len, output_len)
    factories = {
        "inferq": lambda: inferq_target(
            settings, name, local_engine=engine if local else None, max_inflight=max(levels)
        ),
        "openai": lambda: openai_target(
            None if local else url, name, path, max_num_seqs=max(levels), max_model_len=settings.max_model_len,
            kv_gib=max(1, round(settings.kv_cache_gib)), stream_interval=settings.stream_interval,
        ),
    }  # fmt: skip
    if "direct" in targets:
        from inferq.bench.direct import direct_sender

        factories["direct"] = lambda: direct_sender(path, settings)
    report = _run(
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
    # direct and openai run vLLM as it ships (the ceiling); inferq's workers with their own engine settings,
    # known only for the worker --local starts (INFERQ_ENGINE_SPIN_MS, INFERQ_ENGINE_MODEL_IN_CORE).
    tuned = local and engine == "vllm"
    report["inferq_engine_spin_ms"] = settings.engine_spin_ms if tuned else None
    report["inferq_model_in_core"] = settings.engine_model_in_core if tuned else None
    where = describe_environment(report["environment"])
    ours = f"inferq's worker: {engine_setup(report)}; vLLM as it ships elsewhere; " if tuned else ""
    typer.echo(f"model {name}, {settings.stream_interval} tokens per streamed event; {ours}on {where}")
    typer.echo(table(report["results"]))
    for row in report["paired"] if rounds > 1 else ():
        each = " / ".join(f"{x:.2f}" for x in row["ratios"])
        typer.echo(f"{row['target']} / {row['base']}, {row['load']}: {each} by round, median {row['median']:.3f}")
    if json_out:
        json_out.write_text(json.dumps(report, indent=1))
    if any(r["errors"] for r in report["results"]):
        raise typer.Exit(EXIT_FAILED)


@bench_app.command("bulk")
def bench_bulk_command(
    model: Model = None,
    requests: Annotated[int, typer.Option(help="OpenAI Batch chat lines in the file")] = 512,
    max_tokens: Annotated[int, typer.Option(help="max_tokens per line (greedy)")] = 32,
    rounds: Annotated[
        int, typer.Option(help="rounds, alternating which tool goes first; the verdict is the median")
    ] = 3,
    json_out: Annotated[Path | None, typer.Option("--json", help="write every figure here as JSON")] = None,
) -> None:
    """The same OpenAI Batch file through `vllm run-batch` and `inferq bulk --local`, each from a cold start
    (launch to exit, engine load included): wall time, tokens/s and the ratio inferq / run-batch."""
    from inferq.bench.bulk import bench_bulk, bulk_table

    settings = _settings(model=model)
    report = _run(bench_bulk(settings, _model_path(settings), requests=requests, max_tokens=max_tokens, rounds=rounds))
    typer.echo(bulk_table(report))
    if json_out:
        json_out.write_text(json.dumps(report, indent=1))


@bench_app.command("queue")
def bench_queue_command(
    workers: Annotated[str, typer.Option(help="stand-in worker counts to measure, comma-separated")] = "1,2,4,8",
    producers: Annotated[str, typer.Option(help="closed-loop producer counts, comma-separated")] = "1,8,64",
    seconds: Annotated[float, typer.Option(help="seconds per (workers, producers) cell")] = 5.0,
    max_tokens: Annotated[int, typer.Option(help="tokens per request (the stand-in makes one per ms)")] = 16,
    json_out: Annotated[Path | None, typer.Option("--json", help="write every figure here as JSON")] = None,
) -> None:
    """The queue alone, on a fresh embedded server with stand-in engines: requests/s end to end, the latency
    added outside the engine (p50/p99) and Redis CPU, by workers and producers; and raw XADD/s, the limit."""
    from inferq.bench.queue import bench_queue, queue_table

    report = _run(
        bench_queue(
            _settings(), workers=_numbers(workers, "--workers"), producers=_numbers(producers, "--producers"),
            seconds=seconds, max_tokens=max_tokens,
            on_row=lambda r: typer.echo(f"{r['workers']} workers, {r['producers']} producers: "
                                        f"{r['requests_per_s']:.0f} requests/s", err=True),
        )
    )  # fmt: skip
    typer.echo(queue_table(report))
    if json_out:
        json_out.write_text(json.dumps(report, indent=1))
    if any(r["errors"] for r in report["rows"]):
        raise typer.Exit(EXIT_FAILED)


def _model_path(settings: Settings) -> str:
    from inferq.worker.models import resolve_model

    try:
        return str(resolve_model(settings.model, settings.data_dir, log=lambda m: typer.echo(m, err=True)))
    except InferqError as exc:
        _die(str(exc), EXIT_USAGE)


# ---- embedded redis ---------------------------------------------------------------------------------
@redis_app.command("start")
def redis_start() -> None:
    """Start the embedded server (no-op if it runs already)."""
    from inferq.shared.connection import embedded_server

    server = embedded_server(_settings())
    try:
        started = server.start()
    except InferqError as exc:
        _die(str(exc), EXIT_FAILED)
    typer.echo(f"{'started' if started else 'already running'}: {server.url} (data in {server.dir})")


@redis_app.command("stop")
def redis_stop() -> None:
    """Stop the embedded server (its AOF is flushed first)."""
    from inferq.shared.connection import embedded_server

    server = embedded_server(_settings())
    typer.echo("stopped" if server.stop() else "not running")


@redis_app.command("status")
def redis_status() -> None:
    """Say whether the embedded server runs, where, and with which pid. Exit 1 if it does not."""
    from inferq.shared.connection import embedded_server

    server = embedded_server(_settings())
    if server.ping():
        typer.echo(f"running: {server.url} pid {server.pid()} (data in {server.dir})")
    else:
        typer.echo(f"not running (would listen on {server.url}, data in {server.dir})")
        raise typer.Exit(1)


# ---- models -----------------------------------------------------------------------------------------
@models_app.command("prepare")
def models_prepare(
    name: Annotated[str, typer.Argument(help="tiny or smollm2")],
) -> None:
    """Build a local model into INFERQ_DATA_DIR/models (idempotent; fast when already there)."""
    from inferq.worker.models import KNOWN_MODELS, prepare_model

    if name not in KNOWN_MODELS:
        _die(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}", EXIT_USAGE)
    settings = _settings()
    t0 = time.monotonic()
    try:
        path = prepare_model(name, settings.data_dir, log=lambda m: typer.echo(m, err=True))
    except InferqError as exc:
        _die(str(exc), EXIT_FAILED)
    typer.echo(f"{name}: {path} ({time.monotonic() - t0:.1f}s)")


@models_app.command("list")
def models_list() -> None:
    """List the models inferq can build locally and whether they are prepared."""
    from inferq.worker.models import KNOWN_MODELS, model_dir

    settings = _settings()
    for name, about in KNOWN_MODELS.items():
        ready = (model_dir(settings.data_dir, name) / ".complete").exists()
        typer.echo(f"{name:10} {'ready   ' if ready else 'missing '} {about}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # vLLM's engine core is spawned: this guard keeps the child from re-running the CLI
    sys.exit(app())
