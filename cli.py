"""inferq's command line: parses options and calls the libraries; what it prints is in inferq.console.

Installed as `inferq.cli` (the `inferq` console script). Exit codes: 0 ok, 1 the request failed, 2 usage
error, 3 queue full, 4 timed out, 5 Redis unreachable, 6 Redis refused the user (credentials or role).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from inferq import console
from inferq.console import base
from inferq.console.base import EXIT_FAILED, die, run, say
from inferq.console.options import AsJson, Engine, Model, RedisUrl, StreamInterval

app = typer.Typer(
    help="Queue-driven LLM inference: Redis Streams in, vLLM workers, tokens back over pub/sub.\n\n"
    "Quick start: `inferq worker --model tiny &` then `inferq submit --model tiny --prompt 'Hello'`. "
    "With no INFERQ_REDIS_URL every command uses an embedded valkey-server in INFERQ_DATA_DIR.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


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
redis_app = typer.Typer(help="The embedded Redis-compatible server (used when INFERQ_REDIS_URL is not set).")
models_app = typer.Typer(help="Local models that need no model hub: tiny (tests) and smollm2 (SmolLM2-135M-Instruct).")
for group, name in ((bulk_app, "bulk"), (dlq_app, "dlq"), (redis_app, "redis"), (models_app, "models")):
    app.add_typer(group, name=name)
try:
    from inferq.bench.cli import app as bench_app

    app.add_typer(bench_app, name="bench")
except ImportError as missing:  # the harness's own dependencies come with the `bench` extra
    base.missing_extra(app, "bench", missing.name)
JobId = Annotated[str, typer.Argument(help="the id printed by `bulk submit` (or an attached job's id)")]


# ---- one request -------------------------------------------------------------------------------------
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
    ttl: Annotated[float | None, typer.Option(help="seconds the request may wait and run; then `expired`")] = None,
    tenant: Annotated[str | None, typer.Option(help="who the request is for (per-tenant caps apply)")] = None,
    wait: Annotated[
        float | None, typer.Option(help="if the queue is full, keep trying this many seconds (exit 3 after)")
    ] = None,
    raw: Annotated[bool, typer.Option("--raw", help="send PROMPT as-is, without the chat template")] = False,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="print the answer only when it is complete")] = False,
    stream_interval: StreamInterval = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the final result as one JSON object")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the answer (exit 4 after)")] = 300.0,
    redis_url: RedisUrl = None,
) -> None:
    """Send one request through the queue and print the answer as it is generated.

    The text goes to stdout; timings and token counts to stderr. A worker for the model must be running
    (`inferq worker --model M`). Example: inferq submit -m smollm2 -p "What is the capital of France?"
    """
    if raw and system:
        die("--system needs the chat template; drop --raw")
    request = dict(
        console.requests.chat(prompt, system, raw), max_tokens=max_tokens, temperature=temperature, top_p=top_p,
        seed=seed, stop=stop or [], priority=priority, ttl=ttl, tenant=tenant, wait=wait is not None,
        wait_timeout=wait, stream_interval=stream_interval,
    )  # fmt: skip
    settings = base.settings(redis_url=redis_url, model=model)
    result = run(
        console.requests.submit_and_print(settings, request, stream=not no_stream, as_json=as_json, timeout=timeout)
    )
    if result.status != "done":
        raise typer.Exit(EXIT_FAILED)


@app.command()
def result(
    request_id: Annotated[str, typer.Argument(help="the id printed by submit (or given as request_id)")],
    as_json: Annotated[bool, typer.Option("--json", help="print the whole record as JSON")] = False,
    redis_url: RedisUrl = None,
) -> None:
    """Show the stored result of a request: status, text, usage and timings."""
    run(console.requests.print_result(base.settings(redis_url=redis_url), request_id, as_json=as_json))


@app.command()
def cancel(
    request_id: Annotated[str, typer.Argument(help="the id printed by submit")], redis_url: RedisUrl = None
) -> None:
    """Cancel a request. Queued: it ends `cancelled` and is never run. Running: its worker aborts it in the
    engine and it ends `cancelled` with the text so far. Prints the status after the call."""
    typer.echo(run(console.requests.cancel_request(base.settings(redis_url=redis_url), request_id)))


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
    run(
        console.status.show_status(
            base.settings(redis_url=redis_url), model or None, watch=watch, interval=interval, as_json=as_json
        )
    )


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
    local_engine = base.one_of(engine, ("vllm", "standin"), "engine") if local else None
    settings = base.settings(redis_url=redis_url, model=model)
    job, resumed = run(
        console.bulk.run_bulk(settings, input_path, output, model=model, strict=strict, local_engine=local_engine)
    )
    again = f" ({resumed} were there from an earlier run)" if resumed else ""
    say(
        f"bulk job {job.id} {job.state}: {job.total} lines, {job.done} done, {job.failed} failed, "
        f"{job.invalid} invalid; {job.accounted} lines in {output}{again}"
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
    run(console.bulk.submit_job(base.settings(redis_url=redis_url, model=model), input_path, model))


@bulk_app.command("status")
def bulk_status(job_id: JobId, as_json: AsJson = False, redis_url: RedisUrl = None) -> None:
    """A job's state (validating, in_progress, finalizing, completed, failed, cancelling, cancelled), its
    counts, rate and ETA."""
    run(console.bulk.show_jobs(base.settings(redis_url=redis_url), job_id, as_json=as_json))


@bulk_app.command("list")
def bulk_list(
    limit: Annotated[int, typer.Option(help="at most this many, newest first")] = 50,
    as_json: AsJson = False,
    redis_url: RedisUrl = None,
) -> None:
    """Bulk jobs, newest first (ended ones are kept INFERQ_BULK_TTL_S seconds)."""
    run(console.bulk.show_jobs(base.settings(redis_url=redis_url), None, limit=limit, as_json=as_json))


@bulk_app.command("cancel")
def bulk_cancel(job_id: JobId, redis_url: RedisUrl = None) -> None:
    """Stop a job: no more lines are queued, queued and running requests are cancelled; what finished is kept
    (`bulk download`). Prints the state after the call (cancelling, then cancelled once all is accounted for)."""
    run(console.bulk.cancel_job(base.settings(redis_url=redis_url), job_id))


@bulk_app.command("download")
def bulk_download(
    job_id: JobId,
    output: Annotated[Path, typer.Option("--output", "-o", help="JSONL output; re-run to finish a partial one")],
    wait: Annotated[bool, typer.Option("--wait", help="wait for the job to end first")] = False,
    redis_url: RedisUrl = None,
) -> None:
    """Write a detached job's output: one line per input line, in the order they finished."""
    run(console.bulk.download_job(base.settings(redis_url=redis_url), job_id, output, wait=wait))


@bulk_app.command("runner")
def bulk_runner_command(redis_url: RedisUrl = None) -> None:
    """Run detached jobs only (no engine), until SIGTERM: for a fleet that keeps them off the GPU workers.
    Every `inferq worker` runs them too, unless started with --no-bulk-jobs."""
    raise typer.Exit(console.serve.run_bulk_runner(base.settings(redis_url=redis_url)))


# ---- dead letters -----------------------------------------------------------------------------------
@dlq_app.command("list")
def dlq_list(
    model: Model = None,
    count: Annotated[int, typer.Option(help="show at most this many, oldest first")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    redis_url: RedisUrl = None,
) -> None:
    """List the model's dead letters: id, request id, deliveries, reason."""
    run(
        console.dead_letters.list_letters(base.settings(redis_url=redis_url, model=model), count=count, as_json=as_json)
    )


@dlq_app.command("show")
def dlq_show(
    dead_letter_id: Annotated[str, typer.Argument(help="the id `inferq dlq list` printed")],
    model: Model = None,
    redis_url: RedisUrl = None,
) -> None:
    """Show one dead letter as JSON, with its original request (or, for poison, the raw payload size)."""
    run(console.dead_letters.show_letter(base.settings(redis_url=redis_url, model=model), dead_letter_id))


@dlq_app.command("retry")
def dlq_retry(
    dead_letter_ids: Annotated[list[str], typer.Argument(help="dead letter ids to enqueue again")],
    model: Model = None,
    redis_url: RedisUrl = None,
) -> None:
    """Enqueue the original requests again (same request ids; their failed results are replaced)."""
    run(console.dead_letters.retry_letters(base.settings(redis_url=redis_url, model=model), dead_letter_ids))


@dlq_app.command("purge")
def dlq_purge(
    model: Model = None,
    yes: Annotated[bool, typer.Option("--yes", help="really drop them (required)")] = False,
    redis_url: RedisUrl = None,
) -> None:
    """Drop every dead letter of the model. Their `failed` results stay readable until they expire."""
    if not yes:
        die("this drops every dead letter for good; add --yes to confirm")
    run(console.dead_letters.purge_letters(base.settings(redis_url=redis_url, model=model)))


# ---- worker -----------------------------------------------------------------------------------------
@app.command()
def worker(
    model: Model = None,
    max_inflight: Annotated[int | None, typer.Option(help="requests run at once")] = None,
    consumer: Annotated[str | None, typer.Option(help="consumer name in the group (default: host-pid-random)")] = None,
    engine: Engine = "vllm",
    max_model_len: Annotated[int | None, typer.Option(help="context length")] = None,
    stream_interval: StreamInterval = None,
    engine_arg: Annotated[
        list[str] | None,
        typer.Option(
            help="a vLLM engine argument NAME=VALUE (repeatable; VALUE as JSON if it parses): any field of vLLM's "
            "AsyncEngineArgs, e.g. max_num_seqs=64, gpu_memory_utilization=0.85, tensor_parallel_size=2 (see "
            "https://docs.vllm.ai/en/latest/configuration/engine_args.html); over INFERQ_ENGINE_ARGS and the "
            "worker's own defaults",
        ),
    ] = None,
    engine_profile: Annotated[
        str | None,
        typer.Option(
            help="auto (default): cpu-shared on a CPU, vllm elsewhere | vllm: vLLM as it ships (CUDA graphs, its "
            "stats and metrics) | cpu-shared: tuned for a CPU box shared with Redis and clients"
        ),
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="serve Prometheus /metrics (vllm:* and inferq_*) and /ready on this port")
    ] = None,
    metrics_host: Annotated[str | None, typer.Option(help="address for --metrics-port (default 127.0.0.1)")] = None,
    log_format: Annotated[str | None, typer.Option(help="text (default) or json: one object per line")] = None,
    log_requests: Annotated[
        bool | None, typer.Option("--log-requests/--no-log-requests", help="a log line for each request that ends")
    ] = None,
    bulk_jobs: Annotated[
        bool, typer.Option(help="also run steps of detached bulk jobs (`inferq bulk submit`), with no engine cost")
    ] = True,
    redis_url: RedisUrl = None,
) -> None:
    """Run a worker: join group `workers` on the model's streams and serve requests until SIGTERM.

    SIGTERM/Ctrl-C: stop reading and finish in-flight work (up to INFERQ_DRAIN_TIMEOUT_S); a second signal
    stops at once, leaving unfinished requests pending for other workers. Exits 1 if the engine dies.

    Each flag has an environment variable, which the flag overrides: INFERQ_MODEL, INFERQ_MAX_INFLIGHT,
    INFERQ_MAX_MODEL_LEN, INFERQ_STREAM_INTERVAL, INFERQ_ENGINE_PROFILE, INFERQ_METRICS_PORT, INFERQ_METRICS_HOST,
    INFERQ_LOG_FORMAT, INFERQ_LOG_REQUESTS, INFERQ_REDIS_URL (README, "Configuration", lists them all).
    Metrics, readiness and log fields: docs/METRICS.md.
    """
    base.one_of(engine, ("vllm", "standin"), "engine")
    settings = base.settings(
        redis_url=redis_url, model=model, max_inflight=max_inflight, max_model_len=max_model_len,
        stream_interval=stream_interval, engine_profile=engine_profile, metrics_port=metrics_port,
        metrics_host=metrics_host, log_format=log_format, log_requests=log_requests,
    )  # fmt: skip
    if engine_arg:
        settings = settings.model_copy(update={"engine_args": {**settings.engine_args, **base.pairs(engine_arg)}})
    console.serve.run_worker(settings, engine=engine, consumer=consumer, bulk_jobs=bulk_jobs)


# ---- gateway ----------------------------------------------------------------------------------------
@app.command()
def gateway(
    host: Annotated[str, typer.Option(help="address to listen on (without API keys: loopback only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    redis_url: RedisUrl = None,
) -> None:
    """Serve the OpenAI-compatible HTTP API over the queue until SIGTERM: POST /v1/chat/completions and
    /v1/completions (stream: true for Server-Sent Events), GET /v1/models (models with live workers), GET /health.

    Callers send `Authorization: Bearer KEY`; keys map to tenants in INFERQ_API_KEYS ('{"KEY": "TENANT"}') or
    INFERQ_API_KEYS_FILE. With no keys, anyone who can reach it may use it, so it listens on loopback only.

    Example: curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json'
    -d '{"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}'
    """
    console.serve.run_gateway(base.settings(redis_url=redis_url), host, port)


# ---- embedded redis ---------------------------------------------------------------------------------
@redis_app.command("start")
def redis_start() -> None:
    """Start the embedded server (no-op if it runs already)."""
    console.local.redis_start(base.settings())


@redis_app.command("stop")
def redis_stop() -> None:
    """Stop the embedded server (its AOF is flushed first)."""
    console.local.redis_stop(base.settings())


@redis_app.command("status")
def redis_status() -> None:
    """Say whether the embedded server runs, where, and with which pid. Exit 1 if it does not."""
    console.local.redis_status(base.settings())


@redis_app.command("acl")
def redis_acl(
    role: Annotated[str, typer.Argument(help="worker, producer (one tenant's submits and results) or ops")],
    user: Annotated[str, typer.Option(help="the Redis user name")],
    tenant: Annotated[str | None, typer.Option(help="the producer's tenant (its INFERQ_TENANT)")] = None,
    password_env: Annotated[str, typer.Option(help="variable that holds the user's password")] = "INFERQ_ACL_PASSWORD",
) -> None:
    """Print the ACL-file line of a Redis user for one inferq role under INFERQ_KEY_PREFIX (docs/CONTRACTS.md,
    "Roles"). Load it with `aclfile` in redis.conf; the password goes in as its SHA-256.

    Example: INFERQ_ACL_PASSWORD=... inferq redis acl producer --user acme --tenant acme >> users.acl"""
    console.local.redis_acl(base.settings(), role, user, tenant, password_env)


# ---- models -----------------------------------------------------------------------------------------
@models_app.command("prepare")
def models_prepare(name: Annotated[str, typer.Argument(help="tiny or smollm2")]) -> None:
    """Build a local model into INFERQ_DATA_DIR/models (idempotent; fast when already there)."""
    console.local.models_prepare(base.settings(), name)


@models_app.command("list")
def models_list() -> None:
    """List the models inferq can build locally and whether they are prepared."""
    console.local.models_list(base.settings())


if __name__ == "__main__":  # vLLM's engine core is spawned: this guard keeps the child from re-running the CLI
    sys.exit(app())
