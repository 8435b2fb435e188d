"""`inferq bench bulk`: the same OpenAI Batch file through `vllm run-batch` and through
`inferq bulk --local`, each from a cold start (process launch to exit, engine load included), side by side.

run-batch: `python -m vllm.entrypoints.openai.run_batch -i IN -o OUT --model PATH --served-model-name M`
with the engine settings inferq uses (float32, eager, max_model_len, the same KV cache size). inferq:
`inferq bulk IN -o OUT --local -m M` against a fresh embedded valkey-server: it starts a worker, streams
the file through the queue and stops the worker. The two alternate which goes first over the rounds (a cold
start swings by seconds on a shared machine); the verdict is the median of the rounds' ratios.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from inferq.bench.direct import server_flags
from inferq.bench.server import temporary_server
from inferq.producer.local import in_own_group, inferq_argv, stop_group
from inferq.shared.errors import InferqError
from inferq.shared.settings import Settings

QUESTIONS = ["What is a queue?", "Name a city in France.", "Say hello.", "Count to five.", "What is Redis?"]
RUN_BATCH, INFERQ = "vllm run-batch", "inferq bulk --local"


def write_batch(path: Path, n: int, model: str, max_tokens: int) -> None:
    with open(path, "w") as fh:
        for i in range(n):
            body = {
                "model": model, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"}],
            }  # fmt: skip
            line = {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            fh.write(json.dumps(line) + "\n")


def output_tokens(path: Path) -> tuple[int, int]:
    """(completion tokens, lines with an error) of a run-batch-shaped output file."""
    tokens = errors = 0
    for line in path.read_text().splitlines():
        record = json.loads(line)
        body = (record.get("response") or {}).get("body")
        if record.get("error") or not body:
            errors += 1
        else:
            tokens += body["usage"]["completion_tokens"]
    return tokens, errors


async def timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Seconds from launching `cmd` to its exit. It leads a process group of its own, stopped on every way out
    (SIGTERM to it, up to a minute for `inferq bulk --local` to stop its worker, then SIGKILL to the group): a
    bench stopped by SIGTERM or Ctrl-C leaves no run-batch or engine core behind."""
    t0 = time.perf_counter()
    with open(log, "wb") as fh:  # noqa: ASYNC230 - the child's log
        proc = await asyncio.create_subprocess_exec(
            *in_own_group(cmd), env=env, stdout=fh, stderr=asyncio.subprocess.STDOUT
        )
    try:
        returncode = await proc.wait()
        wall = time.perf_counter() - t0
    finally:
        await stop_group(proc, grace_s=60)
    if returncode != 0:
        raise InferqError(f"{' '.join(cmd[:4])} ... exited {returncode}; its log: {log}")
    return wall


async def bench_bulk(
    settings: Settings, model_path: str, *, requests: int = 512, max_tokens: int = 32, rounds: int = 3
) -> dict[str, Any]:
    """Run both tools `rounds` times on one file; every run's wall time, tokens and the ratios."""
    work = Path(tempfile.mkdtemp(prefix="inferq-bench-bulk-"))
    batch = work / "batch.jsonl"
    write_batch(batch, requests, settings.model, max_tokens)
    kv_gib = max(1, round(settings.kv_cache_gib))  # run-batch takes whole GiB through the env variable
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    base_env["INFERQ_DATA_DIR"] = str(settings.data_dir)

    async def run_batch(n: int) -> tuple[float, Path]:
        out = work / f"runbatch-{n}.out.jsonl"
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(batch), "-o", str(out),
            "--model", model_path, "--served-model-name", settings.model, *server_flags(settings),
            "--max-model-len", str(settings.max_model_len), "--disable-log-stats",
        ]  # fmt: skip
        return await timed(cmd, {**base_env, "VLLM_CPU_KVCACHE_SPACE": str(kv_gib)}, out.with_suffix(".log")), out

    async def inferq_bulk(n: int) -> tuple[float, Path]:
        server = temporary_server()
        out = work / f"inferq-{n}.out.jsonl"
        env = {**base_env, "INFERQ_REDIS_URL": server.url, "INFERQ_KEY_PREFIX": "bulkbench"}
        env["INFERQ_KV_CACHE_GIB"] = str(kv_gib)
        env["INFERQ_ENGINE_SPIN_MS"] = f"{settings.engine_spin_ms:g}"  # inferq's own; run-batch's as vLLM ships
        env["INFERQ_ENGINE_MODEL_IN_CORE"] = str(settings.engine_model_in_core).lower()
        cmd = inferq_argv("bulk", str(batch), "-o", str(out), "--local", "-m", settings.model)
        try:
            return await timed(cmd, env, out.with_suffix(".log")), out
        finally:
            server.stop()

    runs: list[dict[str, tuple[float, Path]]] = [{} for _ in range(rounds)]
    for n in range(rounds):
        order = [(RUN_BATCH, run_batch), (INFERQ, inferq_bulk)]
        for name, fn in order if n % 2 == 0 else order[::-1]:
            runs[n][name] = await fn(n)
    rows = []
    for n, results in enumerate(runs):
        row: dict[str, Any] = {"round": n + 1}
        for name, (wall, out) in results.items():
            tokens, errors = output_tokens(out)
            row[name] = {"wall_s": wall, "output_tokens": tokens, "tok_per_s": tokens / wall, "errors": errors}
        row["ratio"] = row[INFERQ]["tok_per_s"] / row[RUN_BATCH]["tok_per_s"]
        rows.append(row)
    return {
        "model": settings.model, "requests": requests, "max_tokens": max_tokens, "files": str(work), "rounds": rows,
        "median_ratio": statistics.median(r["ratio"] for r in rows), "inferq_engine_spin_ms": settings.engine_spin_ms,
        "inferq_model_in_core": settings.engine_model_in_core,
    }  # fmt: skip
