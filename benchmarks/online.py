"""Online throughput: the same requests on vLLM AsyncLLM called directly, and through inferq's queue.

    python benchmarks/online.py --model tiny --concurrency 128 --requests 512

Both runs use the same engine settings (worker/vllm_engine.py), the same prompts, greedy decoding (so
both produce the same tokens) and the same concurrency; the queue run streams every token back over
Redis pub/sub to a client in this process, as an online caller would. Prints both figures and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable

from common import one_worker

from inferq.bench.direct import direct_sender
from inferq.bench.stats import Prompt, Timing
from inferq.shared import aio
from inferq.shared.settings import load_settings
from inferq.worker.models import resolve_model

WORDS = "the queue holds requests until a worker is free and then runs them through the model".split()


def prompts(n: int, length: int) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(length)) + f" {i}" for i in range(n)]


async def drive(n: int, concurrency: int, one: Callable[[int], Awaitable[int]]) -> tuple[float, int]:
    """Run `one(i)` for i < n with at most `concurrency` at once; returns (seconds, tokens generated)."""
    sem = asyncio.Semaphore(concurrency)

    async def guarded(i: int) -> int:
        async with sem:
            return await one(i)

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(guarded(i) for i in range(n))))
    return time.perf_counter() - t0, tokens


async def run_direct(args: argparse.Namespace, model_path: str, texts: list[str]) -> tuple[float, int]:
    settings = load_settings(model=args.model, max_inflight=args.concurrency)
    async with direct_sender(model_path, settings, as_shipped=args.direct_engine == "shipped") as send:

        async def one(i: int) -> int:
            timing = Timing(sent=time.perf_counter())
            await send(Prompt(texts[i], args.max_tokens), timing)
            return timing.output_tokens

        await drive(args.warmup, args.concurrency, one)
        return await drive(args.requests, args.concurrency, one)


async def run_queue(args: argparse.Namespace, texts: list[str]) -> tuple[float, int]:
    async with one_worker("bench", args.model, ["--max-inflight", str(args.concurrency)]) as client:

        async def one(i: int) -> int:
            handle = await client.submit(prompt=texts[i], max_tokens=args.max_tokens, temperature=0)
            n = sum([len(e.token_ids) async for e in handle.tokens()])
            if handle.gap:  # events were missed: count from the stored result
                n = (await handle.result()).usage.completion_tokens
            return n

        await drive(args.warmup, args.concurrency, one)
        return await drive(args.requests, args.concurrency, one)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--warmup", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--targets", default="direct,inferq", help="which of direct,inferq to run")
    p.add_argument("--rounds", type=int, default=2, help="alternate the targets this many times; report the median")
    p.add_argument(
        "--direct-engine",
        choices=("shipped", "inferq"),
        default="shipped",
        help="direct's vLLM as it ships (the ceiling of `inferq bench online`), or set up as inferq's worker sets "
        "it up (INFERQ_ENGINE_MODEL_IN_CORE, INFERQ_ENGINE_SPIN_MS): then the ratio is what the queue alone costs",
    )
    args = p.parse_args()
    model_path = str(resolve_model(args.model, load_settings().data_dir))
    texts = prompts(args.requests + args.warmup, args.prompt_len)

    targets = args.targets.split(",")
    runs: dict[str, list[tuple[float, int]]] = {"direct": [], "inferq": []}
    for _ in range(args.rounds):  # alternating, so drift on a shared machine hits both targets alike
        if "direct" in targets:
            runs["direct"].append(aio.run(run_direct(args, model_path, texts)))
        if "inferq" in targets:
            runs["inferq"].append(aio.run(run_queue(args, texts)))
    rates = {k: sorted(tok / s for s, tok in v) for k, v in runs.items() if v}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"model {args.model}, {args.requests} requests, concurrency {args.concurrency}, "
          f"prompt ~{args.prompt_len} words, max_tokens {args.max_tokens}, greedy; direct's vLLM: "
          f"{'as it ships' if args.direct_engine == 'shipped' else 'as inferq sets it up'}")  # fmt: skip
    print(f"{'target':<24}{'median tok/s':>14}  all rounds (output tok/s)")
    names = {"direct": "direct AsyncLLM", "inferq": "inferq (Redis queue)"}
    for key, values in rates.items():
        print(f"{names[key]:<24}{statistics.median(values):>14.0f}  {', '.join(f'{v:.0f}' for v in values)}")
    if len(rates) == 2:
        ratio = statistics.median(rates["inferq"]) / statistics.median(rates["direct"])
        print(f"ratio inferq / direct (median output tok/s): {ratio:.3f}")
        paired = [(ti / si) / (td / sd) for (sd, td), (si, ti) in zip(runs["direct"], runs["inferq"], strict=True)]
        each = " / ".join(f"{r:.2f}" for r in paired)
        print(f"paired, round by round: {each}; median {statistics.median(paired):.3f}")


if __name__ == "__main__":  # vLLM spawns its engine core: keep the child from re-running this
    main()
