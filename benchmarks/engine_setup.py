"""vLLM as it ships against vLLM as inferq's worker sets it up (the model in the engine core, the spin window),
in this process and without the queue: TTFT and TPOT of one request at a time, side by side. The two setups
take turns, each round starting its engine afresh, so a slow minute of a shared machine lands on both.

    python benchmarks/engine_setup.py --model smollm2 --rounds 3 --requests 16

It tells an engine cost from a queue cost: `inferq bench online` measures both together, and
benchmarks/ttft_breakdown.py what the queue adds to one request.
"""

from __future__ import annotations

import argparse
import statistics

from inferq.bench.direct import direct_sender
from inferq.bench.online import fixed_prompts, measure
from inferq.shared import aio
from inferq.shared.settings import load_settings
from inferq.worker.models import resolve_model

SETUPS = {"shipped": "vLLM as it ships", "inferq": "as inferq sets it up"}


async def one_round(args: argparse.Namespace, setup: str) -> tuple[float, float]:
    """Start the engine, warm it up, run the requests one at a time; (TTFT p50, TPOT p50) in ms."""
    settings = load_settings(model=args.model, max_inflight=8)
    path = str(resolve_model(args.model, settings.data_dir))
    prompts = fixed_prompts(args.warmup + args.requests, 16, args.output_len)
    async with direct_sender(path, settings, as_shipped=setup == "shipped") as send:
        result = await measure(setup, send, prompts[args.warmup :], prompts[: args.warmup], concurrency=1, rate=None)
    return result["ttft_ms"]["p50"], result["tpot_ms"]["p50"]


async def main(args: argparse.Namespace) -> None:
    results: dict[str, list[tuple[float, float]]] = {setup: [] for setup in SETUPS}
    for round_no in range(args.rounds):
        order = list(SETUPS) if round_no % 2 == 0 else list(reversed(SETUPS))
        for setup in order:
            results[setup].append(await one_round(args, setup))
            print(f"round {round_no + 1}, {SETUPS[setup]}: TTFT p50 %.1f ms, TPOT p50 %.2f ms" % results[setup][-1])
    print(f"model {args.model}, {args.requests} requests one at a time, {args.output_len} tokens, greedy; "
          f"median of {args.rounds} rounds")  # fmt: skip
    print(f"{'':<24}{'TTFT p50 ms':>12}{'TPOT p50 ms':>13}")
    for setup, rounds in results.items():
        ttft, tpot = (statistics.median(r[k] for r in rounds) for k in (0, 1))
        print(f"{SETUPS[setup]:<24}{ttft:>12.1f}{tpot:>13.2f}")


if __name__ == "__main__":  # vLLM spawns its engine core, which imports this module again
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=32)
    aio.run(main(parser.parse_args()))
