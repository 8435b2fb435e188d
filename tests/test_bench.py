"""The benchmark harness (`inferq bench online|bulk|queue|capacity|backlog`) on small runs: every request accounted
for, the figures it reports consistent with what was sent. No test asserts a speed."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from inferq.producer.local import inferq_argv
from inferq.shared.settings import Settings
from tests.conftest import MODELS_DIR, ROOT, drained


async def bench(settings: Settings, tmp_path: Path, *args: str, timeout: float = 600) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    env = {
        **os.environ, "INFERQ_REDIS_URL": settings.redis_url or "", "INFERQ_KEY_PREFIX": settings.key_prefix,
        "INFERQ_DATA_DIR": str(MODELS_DIR), "INFERQ_KV_CACHE_GIB": "0.25",
    }  # fmt: skip
    proc = await asyncio.to_thread(
        subprocess.run,
        inferq_argv("bench", *args, "--json", str(out)),
        env=env, capture_output=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()[-3000:] + proc.stdout.decode()[-2000:]
    report = json.loads(out.read_text())
    report["stdout"] = proc.stdout.decode()
    return report


async def test_online_counts_every_request_and_token(settings: Settings, redis: Redis, tmp_path: Path) -> None:
    report = await bench(
        settings, tmp_path, "online", "--target", "inferq", "--local", "--engine", "standin", "--model", "fake",
        "-n", "12", "--warmup", "2", "--concurrency", "1,3", "--output-len", "5",
    )  # fmt: skip
    assert [r["concurrency"] for r in report["results"]] == [1, 3]
    for r in report["results"]:
        assert (r["target"], r["requests"], r["completed"], r["errors"]) == ("inferq", 12, 12, 0)
        assert r["output_tokens"] == 12 * 5  # the stand-in makes exactly max_tokens tokens
        assert 0 < r["ttft_ms"]["p50"] <= r["e2e_ms"]["p50"] <= r["e2e_ms"]["p99"]
        assert r["tpot_ms"]["mean"] > 0 and r["itl_ms"]["p90"] >= r["itl_ms"]["p50"] > 0
    assert report["environment"]["cpus"] == os.cpu_count() and "TTFT p50 ms" in report["stdout"]
    assert await drained(redis, settings, "fake") == (0, 0)


async def test_online_rounds_report_the_median_round(settings: Settings, redis: Redis, tmp_path: Path) -> None:
    report = await bench(
        settings, tmp_path, "online", "--target", "inferq", "--local", "--engine", "standin", "--model", "fake",
        "-n", "6", "--warmup", "1", "--concurrency", "1,2", "--output-len", "3", "--rounds", "3",
    )  # fmt: skip
    assert report["rounds"] == 3
    assert [(r["round"], r["concurrency"]) for r in report["runs"]] == [(n, c) for n in (1, 2, 3) for c in (1, 2)]
    assert all((r["completed"], r["output_tokens"]) == (6, 18) for r in report["runs"])
    assert [r["concurrency"] for r in report["results"]] == [1, 2]
    for median in report["results"]:
        rounds = [r["output_throughput"] for r in report["runs"] if r["concurrency"] == median["concurrency"]]
        assert median["rounds_output_throughput"] == rounds
        assert median["output_throughput"] == sorted(rounds)[1]
    assert await drained(redis, settings, "fake") == (0, 0)


async def test_online_four_targets_on_vllm(redis_server: Any, tmp_path: Path) -> None:
    settings = Settings(redis_url=redis_server.url, key_prefix="bench-vllm", model="tiny", data_dir=MODELS_DIR)
    names = ["direct-inferq", "inferq", "direct", "openai"]
    report = await bench(
        settings, tmp_path, "online", "--target", ",".join(names), "--local", "--model", "tiny",
        "-n", "8", "--warmup", "2", "--concurrency", "2,4", "--output-len", "6", "--rounds", "2",
        "--stream-interval", "3",
    )  # fmt: skip
    assert report["stream_interval"] == 3 and "3 tokens per streamed event" in report["stdout"]
    assert "inferq's engine setup: the model in vLLM's engine core" in report["stdout"]
    # All stay up; at each load they take turns, the order rotating by one from load to load and round to
    # round, so that each target runs in every place.
    assert [(r["round"], r["concurrency"], r["target"]) for r in report["runs"]] == [
        (n, c, t) for n, c, shift in ((1, 2, 0), (1, 4, 1), (2, 2, 1), (2, 4, 2))
        for t in names[shift:] + names[:shift]
    ]  # fmt: skip
    assert len(report["results"]) == 8
    for r in report["runs"]:
        assert (r["requests"], r["completed"], r["errors"]) == (8, 8, 0)
        assert 0 < r["output_tokens"] <= 8 * 6
    # Greedy: the queue returns exactly the tokens AsyncLLM makes directly, set up the same way or as it ships,
    # in events of the same interval: the first token alone, then up to 3 at a time, so at most 3 events for
    # each of the 8 requests of 6 tokens (1 per token without the interval: up to 6). Not always the same
    # number: when a reader falls behind, vLLM merges two outputs into one, in the worker and in the bench's
    # process alike.
    by_target = {r["target"]: r for r in report["results"] if r["concurrency"] == 4}
    assert by_target["inferq"]["output_tokens"] == by_target["direct-inferq"]["output_tokens"]
    assert by_target["inferq"]["output_tokens"] == by_target["direct"]["output_tokens"]
    for target in ("inferq", "direct-inferq"):
        assert 8 <= by_target[target]["output_chunks"] <= 8 * 3, (target, by_target[target]["output_chunks"])
    # Each other target against the first listed, round by round: the ratios of the runs, and their median.
    tput = {(r["round"], r["concurrency"], r["target"]): r["output_throughput"] for r in report["runs"]}
    assert [(p["load"], p["target"], p["base"]) for p in report["paired"]] == [
        (f"concurrency {c}", t, "direct-inferq") for c in (2, 4) for t in names[1:]
    ]
    for p in report["paired"]:
        c = int(p["load"].split()[-1])
        assert p["ratios"] == [tput[(n, c, p["target"])] / tput[(n, c, "direct-inferq")] for n in (1, 2)]
        assert p["median"] == min(p["ratios"])
        assert f"{p['target']} / direct-inferq, {p['load']}: " in report["stdout"]


async def test_queue_bench_reports_each_cell(settings: Settings, tmp_path: Path) -> None:
    report = await bench(settings, tmp_path, "queue", "--workers", "1", "--producers", "1,4", "--seconds", "1")
    assert report["raw_xadd_per_s"] > 0
    assert [(r["workers"], r["producers"]) for r in report["rows"]] == [(1, 1), (1, 4)]
    for r in report["rows"]:
        assert r["completed"] > 0 and r["errors"] == 0 and r["added_ms_p99"] >= r["added_ms_p50"] > 0


async def test_capacity_bench_counts_every_request_and_what_redis_did(settings: Settings, tmp_path: Path) -> None:
    args = ["--producer-procs", "2", "--closed", "4", "--rates", "200,400", "--seconds", "1", "--rounds", "2"]
    report = await bench(settings, tmp_path, "capacity", *args)
    assert report["raw_xadd_per_s"] > 0 and report["saturated_at_offered_per_s"] is None
    assert [(r["mode"], r["load"]) for r in report["rows"]] == [("closed", 4), ("open", 100), ("open", 200)]
    # Each cell ran once a round, each round on a server of its own; a cell shows its median round.
    assert len(report["runs"]) == 2 and all(len(run["rows"]) == 3 for run in report["runs"])
    for i, r in enumerate(report["rows"]):
        assert r["rounds_requests_per_s"] == [run["rows"][i]["requests_per_s"] for run in report["runs"]]
        assert r["requests_per_s"] == min(r["rounds_requests_per_s"])  # of two, the lower
    for r in report["rows"]:
        assert r["completed"] > 0 and r["errors"] == 0 and r["p99_ms"] >= r["p50_ms"] > 0
        # Each request costs Redis at least its admission, start, end and result read; each a round trip or part of one.
        assert r["commands_per_request"] >= 4 and 0 < r["round_trips_per_request"] <= r["commands_per_request"]
        # Every kind of process did work for the requests (a worker runs them, producers send them, Redis holds them).
        assert set(r["cpu_us_per_request"]) == {"workers", "producers", "redis"}
        assert all(us > 0 for us in r["cpu_us_per_request"].values())
        # Redis's time by command, most first: the scripts (admission, start, finish) among it.
        spent = list(r["redis_us_per_request"].values())
        assert r["redis_us_per_request"]["evalsha"] > 0 and spent == sorted(spent, reverse=True)
    for r in report["rows"][1:]:  # the open loop ran at its offered rate
        assert r["completed"] >= 0.9 * r["offered_per_s"] * report["seconds_per_cell"]


async def test_bulk_bench_runs_both_tools_on_one_file(settings: Settings, tmp_path: Path) -> None:
    report = await bench(
        settings, tmp_path, "bulk", "--model", "tiny", "--requests", "6", "--max-tokens", "4", "--rounds", "1"
    )
    (row,) = report["rounds"]
    for tool in ("vllm run-batch", "inferq bulk --local"):
        assert row[tool]["errors"] == 0 and 0 < row[tool]["output_tokens"] <= 6 * 4
    assert row["inferq bulk --local"]["output_tokens"] == row["vllm run-batch"]["output_tokens"]
    assert row["ratio"] > 0 and report["median_ratio"] == row["ratio"]


@pytest.mark.parametrize("mode", ["detached", "attached"])
async def test_backlog_bench_holds_the_whole_job_then_answers_every_line_once(
    settings: Settings, tmp_path: Path, mode: str
) -> None:
    n = 1500
    report = await bench(settings, tmp_path, "backlog", "--lines", str(n), "--mode", mode, "--status-every", "0.2")
    assert report["check"] == {"output_lines": n, "missing": 0, "duplicated": 0, "failed": 0, "unknown": 0}
    assert (report["job"]["state"], report["job"]["done"], report["job"]["failed"]) == ("completed", n, 0)
    held = report["held"]
    assert held["queued"] == n  # every line admitted before any worker started
    assert held["used_memory"] > held["empty_used_memory"] and held["bytes_per_request"] > 0
    kinds = held["by_kind"]
    assert "result hashes" not in kinds  # a queued bulk line has none: its entry is in the job's id hash
    assert report["after_drain"]["by_kind"]["result hashes"]["keys"] == n  # each line has one once it ran
    assert {"lane stream", "job's id hash (digests, entries)"} <= set(kinds)
    assert ("staged input" in kinds) == (mode == "detached")  # an attached job's input stays on disk
    assert sum(v["bytes"] for v in kinds.values()) + held["other_bytes"] == held["added_bytes"]
    assert report["redis_peak_used_memory"] >= held["used_memory"]
    phases = report["phases_s"]
    assert phases["admit every line"] > 0 and report["admission_per_s"] > 0 and report["drain_per_s"] > 0
    assert 0 < phases["workers answer every request"] <= phases["drain (workers start to job completed)"]
    # Every phase timed `inferq status` at least once as it began.
    assert {"admitting", "held", "draining"} <= set(report["status"])
    for s in report["status"].values():
        assert s["calls"] >= 1 and s["max_ms"] >= s["p50_ms"] > 0
    feeders = ["bulk submit", "bulk runner", "bulk download"] if mode == "detached" else ["bulk (attached)"]
    names = {*feeders, "worker 1", "worker 2", "redis-server", "bench (this process)"}
    assert set(report["peak_rss_mib"]) == names and min(report["peak_rss_mib"].values()) > 0
    assert f"output: {n:,} lines; missing 0, duplicated 0, failed 0" in report["stdout"]


def test_backlog_check_finds_missing_duplicated_failed_and_unknown_lines(tmp_path: Path) -> None:
    from inferq.bench.backlog import answered_once, check_output

    ok = {"response": {"status_code": 200}, "error": None}
    records = [
        {"custom_id": "req-0", **ok}, {"custom_id": "req-1", **ok}, {"custom_id": "req-1", **ok},
        {"custom_id": "req-2", "response": {"status_code": 500}, "error": {"message": "boom"}},
        {"custom_id": "other", **ok},
    ]  # fmt: skip
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    check = check_output(out, 4)
    assert check == {"output_lines": 5, "missing": 1, "duplicated": 1, "failed": 1, "unknown": 1}
    assert not answered_once({"lines": 4, "check": check})
    out.write_text("".join(json.dumps({"custom_id": f"req-{i}", **ok}) + "\n" for i in range(4)))
    assert answered_once({"lines": 4, "check": check_output(out, 4)})


def test_the_gpu_check_says_in_one_line_what_it_needs(tmp_path: Path) -> None:
    """benchmarks/gpu_check.py runs only on an NVIDIA GPU with vLLM's CUDA build; elsewhere one line, exit 2."""
    script = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")]
    no_model = subprocess.run([*script, "--model", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert no_model.returncode == 2 and "is not a model folder" in no_model.stderr, no_model.stderr
    if shutil.which("nvidia-smi") is not None:
        return  # a GPU machine: the check itself is what runs there
    (tmp_path / "config.json").write_text("{}")
    here = subprocess.run([*script, "--model", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert (here.returncode, here.stderr.strip()) == (
        2,
        "error: no NVIDIA GPU here (nvidia-smi not found): this check runs on a GPU machine",
    ), here.stderr
