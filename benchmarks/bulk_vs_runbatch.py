"""The same OpenAI Batch file through `vllm run-batch` and through `inferq bulk --local`, each from a cold
start (process launch to exit, engine load included), side by side.

    python benchmarks/bulk_vs_runbatch.py --model tiny --requests 512 --max-tokens 32 --rounds 3

run-batch: `python -m vllm.entrypoints.openai.run_batch -i IN -o OUT --model PATH --served-model-name M`
with the engine settings inferq uses (float32, eager, max_model_len 2048, same KV cache size).
inferq: `inferq bulk IN -o OUT --local -m M` against a fresh embedded valkey-server: it starts a worker,
streams the file through the queue and stops the worker. Both read the same file (chat lines, greedy).
Prints wall times, output tokens/s and the ratio (issue 5's bar: inferq at least as fast, ratio >= 1.0).
The two alternate which goes first for `--rounds` rounds (a cold start swings by seconds on a shared VM);
the verdict is the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, temp_server  # first: it puts the repo root on sys.path

from shared.settings import load_settings
from worker.models import resolve_model

QUESTIONS = ["What is a queue?", "Name a city in France.", "Say hello.", "Count to five.", "What is Redis?"]


def write_input(path: Path, n: int, model: str, max_tokens: int) -> None:
    with open(path, "w") as fh:
        for i in range(n):
            body = {
                "model": model, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"}],
            }  # fmt: skip
            line = {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            fh.write(json.dumps(line) + "\n")


def completion_tokens(path: Path) -> tuple[int, int]:
    """(output tokens, lines with an error) of a run-batch-shaped output file."""
    tokens = errors = 0
    for line in path.read_text().splitlines():
        record = json.loads(line)
        body = (record.get("response") or {}).get("body")
        if record.get("error") or not body:
            errors += 1
        else:
            tokens += body["usage"]["completion_tokens"]
    return tokens, errors


def timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} exited {proc.returncode}; see {log}")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny or smollm2 (both have a chat template)")
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="rounds, alternating which tool goes first")
    args = p.parse_args()
    settings = load_settings(model=args.model)
    path = str(resolve_model(args.model, settings.data_dir))
    work = Path(tempfile.mkdtemp(prefix="inferq-bulk-bench-"))
    batch = work / "batch.jsonl"
    write_input(batch, args.requests, args.model, args.max_tokens)
    kv_gib = max(1, round(settings.kv_cache_gib))  # run-batch takes whole GiB through the env variable
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}

    def run_batch(n: int) -> tuple[float, Path]:
        out = work / f"runbatch-{n}.out.jsonl"
        wall = timed(
            [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(batch), "-o", str(out),
             "--model", path, "--served-model-name", args.model, "--dtype", "float32", "--enforce-eager",
             "--max-model-len", str(settings.max_model_len), "--disable-log-stats"],
            {**base_env, "VLLM_CPU_KVCACHE_SPACE": str(kv_gib)}, work / f"runbatch-{n}.log",
        )  # fmt: skip
        return wall, out

    def inferq_bulk(n: int) -> tuple[float, Path]:
        server, _ = temp_server()
        out = work / f"inferq-{n}.out.jsonl"
        try:
            wall = timed(
                [sys.executable, str(ROOT / "cli.py"), "bulk", str(batch), "-o", str(out), "--local",
                 "-m", args.model],
                {**base_env, "INFERQ_REDIS_URL": server.url, "INFERQ_KEY_PREFIX": "bulkbench",
                 "INFERQ_KV_CACHE_GIB": str(kv_gib)},
                work / f"inferq-{n}.log",
            )  # fmt: skip
        finally:
            server.stop()
        return wall, out

    rows = []
    for n in range(args.rounds):
        # Alternate the order: whatever the VM does to the first or second cold start hits both alike.
        order = [("vllm run-batch", run_batch), ("inferq bulk --local", inferq_bulk)]
        results = dict((name, fn(n)) for name, fn in (order if n % 2 == 0 else order[::-1]))
        rows.append(results)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; files in {work}")
    print(f"model {args.model}, {args.requests} chat requests, max_tokens {args.max_tokens}, greedy, cold starts")
    print(f"{'round':<6}{'target':<26}{'wall s':>8}{'out tokens':>12}{'tok/s':>9}{'errors':>8}{'ratio':>8}")
    ratios = []
    for n, results in enumerate(rows):
        rates = {}
        for name, (wall, out) in results.items():
            tokens, errors = completion_tokens(out)
            rates[name] = tokens / wall
            ratio = ""
            if name.startswith("inferq"):
                ratios.append(rates[name] / rates["vllm run-batch"])
                ratio = f"{ratios[-1]:.3f}"
            print(f"{n + 1:<6}{name:<26}{wall:>8.1f}{tokens:>12}{tokens / wall:>9.0f}{errors:>8}{ratio:>8}")
    print(f"ratio inferq / run-batch (tok/s, wall included), median of {len(ratios)}: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
