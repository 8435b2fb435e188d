"""How a wave of requests goes through the engine, for inferq and for vLLM's OpenAI server: when each
request's first token came (the prefill cohorts: the engine step that finished a request's prompt), how long
the wave took to get every first token (the prefill phase), the decode steps after it, and the tail (first to
last request done).

`inferq bench online` at a fixed concurrency sends a wave of requests at once, and with fixed output lengths
they end together, so the next wave starts together too. Where the two targets differ at high concurrency,
this shows in which phase. Both targets are started as `--local` starts them, stay up, and take turns:

    python benchmarks/wave_timeline.py --model smollm2 --concurrency 128 --rounds 8

With `--waves 2` each run is a closed loop of two waves, as in `make bench`: every finished request is
replaced at once, so the later cohorts show how each target hands the refill to the engine (the prefill
phase and the decode steps are then measured to the last first token of the run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics

from inferq.bench.direct import server_flags
from inferq.bench.online import SETTLE_S, Send, fixed_prompts, inferq_target, openai_target, run_load
from inferq.bench.stats import Timing
from inferq.shared import aio
from inferq.shared.settings import load_settings
from inferq.worker.models import resolve_model

COHORT_GAP_S = 0.05  # first tokens closer than this came out of the same engine step


def phases(timings: list[Timing], start: float, output_len: int) -> dict[str, object]:
    firsts = sorted((t.first or t.done or start) - start for t in timings)
    cohorts: list[list[float]] = []
    for f in firsts:
        if cohorts and f - cohorts[-1][-1] <= COHORT_GAP_S:
            cohorts[-1].append(f)
        else:
            cohorts.append([f])
    dones = [(t.done or start) - start for t in timings]
    prefill = firsts[-1]
    return {
        "cohorts": " + ".join(f"{len(c)}@{c[0]:.1f}s" for c in cohorts),
        "prefill_s": prefill,
        "decode_step_ms": (max(dones) - prefill) / max(output_len - 1, 1) * 1000,
        "tail_s": max(dones) - min(dones),
        "ttft_mean_s": statistics.fmean((t.first or start) - t.sent for t in timings),
    }


async def main(args: argparse.Namespace) -> None:
    settings = load_settings(model=args.model, max_inflight=args.concurrency)
    path = str(resolve_model(settings.model, settings.data_dir, log=print))
    prompts = fixed_prompts(args.waves * args.concurrency + args.warmup, args.prompt_len, args.output_len)
    measured, warmup = prompts[args.warmup :], prompts[: args.warmup]
    async with contextlib.AsyncExitStack() as stack:
        dump = stack.enter_context(open(args.dump, "w")) if args.dump else None  # noqa: ASYNC230 - a small local file
        targets: dict[str, Send] = {
            "inferq": await stack.enter_async_context(
                inferq_target(settings, settings.model, local_engine="vllm", max_inflight=args.concurrency)
            ),
            "openai": await stack.enter_async_context(
                openai_target(
                    None, settings.model, path, max_num_seqs=args.concurrency, max_model_len=settings.max_model_len,
                    kv_gib=max(1, round(settings.kv_cache_gib)), stream_interval=settings.stream_interval,
                    engine_flags=server_flags(settings),
                )
            ),
        }  # fmt: skip
        for send in targets.values():
            await run_load(warmup, send, concurrency=args.concurrency)
        print(f"model {settings.model}, {args.waves} wave(s) of {args.concurrency} requests a run in a closed loop, "
              f"{args.output_len} tokens each")  # fmt: skip
        print(f"{'round':<6}{'target':<8}{'tok/s':>7}{'prefill s':>11}{'decode ms/step':>16}{'tail s':>8}"
              f"{'TTFT mean s':>13}  first-token cohorts (requests@time)")  # fmt: skip
        rates: dict[str, list[float]] = {name: [] for name in targets}
        for round_no in range(1, args.rounds + 1):
            order = list(targets) if round_no % 2 else list(reversed(targets))
            for name in order:
                await asyncio.sleep(SETTLE_S)
                timings, wall = await run_load(measured, targets[name], concurrency=args.concurrency)
                start = min(t.sent for t in timings)
                rate = sum(t.output_tokens for t in timings) / wall
                rates[name].append(rate)
                p = phases(timings, start, args.output_len)
                if dump:  # one line a request, times in seconds from the run's first send
                    for t in timings:
                        at = [round(x - start, 4) if x is not None else None for x in (t.sent, t.first, t.done)]
                        dump.write(json.dumps({"round": round_no, "target": name, "sent_first_done": at}) + "\n")
                print(f"{round_no:<6}{name:<8}{rate:>7.0f}{p['prefill_s']:>11.2f}{p['decode_step_ms']:>16.0f}"
                      f"{p['tail_s']:>8.2f}{p['ttft_mean_s']:>13.2f}  {p['cohorts']}")  # fmt: skip
        ratios = [i / o for i, o in zip(rates["inferq"], rates["openai"], strict=True)]
        print(f"inferq / openai by round: {' / '.join(f'{r:.2f}' for r in ratios)}; "
              f"median {statistics.median(ratios):.3f}")  # fmt: skip


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--waves", type=int, default=1, help="requests a run: this many times the concurrency")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=16, help="words per prompt, as `inferq bench online`")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--dump", help="write every request's send, first-token and done times to this JSONL file")
    aio.run(main(p.parse_args()))
