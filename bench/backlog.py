"""`inferq bench backlog`: a million-request bulk job admitted all at once, held with no worker running, then
drained by stand-in workers (issue 28, item 4), with what each phase took and what each process held.

1. An OpenAI Batch file of N short chat lines (`max_tokens` 4 by default) for a stand-in model.
2. A fresh embedded server, with the caps raised so the whole job fits at once: `INFERQ_BULK_WINDOW` of N,
   `INFERQ_MAX_QUEUE_LEN` of N per shard (a job's requests all live in its shard, and each shard holds its
   share of the cap). No lag or tenant cap is on by default; a queued request waits up to
   `INFERQ_MAX_QUEUED_S` (7 days) and its result outlives that, so nothing expires during the run.
3. The job is submitted detached by default (`inferq bulk submit`, then `inferq bulk runner` feeds it): a
   million lines run for hours on a real model, and a user would not hold a terminal open for that. A
   detached job outlives the shell that submitted it, any runner of the fleet takes it over if the one
   running it dies, `inferq bulk status` follows it from anywhere, and the Batch API runs jobs this way.
   What it costs is its input staged in Redis until the job ends, which this bench shows. `--mode attached`
   runs `inferq bulk IN -o OUT` instead, whose input stays on disk (and the only way on a Redis Cluster).
4. Held: once the job record says its feed is done, and before any worker starts, Redis's used memory
   against the empty server's, per queued request, and where it goes (MEMORY USAGE of each kind of key:
   the lane stream, the job's id hash, its staged input and reply stream whole; the result hashes, which a
   line has once a worker started it, from an even sample).
5. Drain: W stand-in workers (`INFERQ_STANDIN_STEP_MS=0`: the queue's own speed) until the job has
   completed; then the output file (`inferq bulk download` for a detached job), checked: every custom_id
   exactly once, none with an error.

Throughout, what `inferq status` runs (`client.stats()`) is timed every 2 s, by phase, as one operator
watching `inferq status --watch` would run it. Every process of the job runs as a user would start it; its
peak RSS is its own (wait4's ru_maxrss, or VmHWM for the server, which is not this process's child), and
Redis's peak used memory is INFO's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from inferq.bench.bulk import write_batch
from inferq.bench.server import temporary_server
from inferq.bench.stats import environment, spread
from inferq.producer.bulk.attached import job_id as attached_job_id
from inferq.producer.bulk.running import request_id
from inferq.producer.bulk.state import ENDED, JobRecord
from inferq.producer.client import InferenceClient
from inferq.producer.local import inferq_argv, worker_argv, worker_env
from inferq.shared.embedded import EmbeddedServer
from inferq.shared.errors import InferqError
from inferq.shared.keys import Keys
from inferq.shared.settings import Settings, load_settings

MODEL = "backlog"
PREFIX = "backlog"
DETACHED, ATTACHED = "detached", "attached"
_POLL_S = 0.2  # how often the bench looks at the job's record and the lane while it waits on a phase
_PROGRESS_S = 30.0  # a progress line on stderr this often in a long phase
_RESULT_SAMPLE = 1000  # result hashes whose MEMORY USAGE stands for all of them


class Child:
    """A process of the job (`inferq ...`) in a session of its own, reaped by wait4 so its peak RSS is known."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path, *, capture: bool = False) -> None:
        self.name, self.log = name, log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE if capture else out, stderr=out, start_new_session=True
            )
        self.started = time.perf_counter()
        self.wall_s = 0.0
        self.peak_rss_kib = 0
        self.returncode: int | None = None
        self.stdout = b""
        loop = asyncio.get_running_loop()
        self.reaped: asyncio.Future[int] = loop.create_future()
        # A thread of its own, not the loop's executor (a few threads on a small machine, and these block for
        # the child's whole life). Popen.poll()/wait() would reap the child with waitpid and lose its rusage.
        threading.Thread(target=self._reap, args=(loop,), daemon=True, name=f"inferq-bench-{name}").start()

    def _reap(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.popen.stdout is not None:
            self.stdout = self.popen.stdout.read()
        _, status, usage = os.wait4(self.popen.pid, 0)
        self.wall_s = time.perf_counter() - self.started
        self.peak_rss_kib = usage.ru_maxrss
        self.returncode = self.popen.returncode = os.waitstatus_to_exitcode(status)
        code = self.returncode

        def settle() -> None:
            if not self.reaped.done():
                self.reaped.set_result(code)

        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            loop.call_soon_threadsafe(settle)

    @property
    def running(self) -> bool:
        return not self.reaped.done()

    async def finished(self) -> None:
        """Until it exits; raises if it failed."""
        if await asyncio.shield(self.reaped) != 0:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise InferqError(f"{self.name} exited with {self.returncode}; the processes' log ({self.log}):\n{tail}")

    async def stop(self, grace_s: float = 120.0) -> None:
        """SIGTERM (a worker drains, a runner gives its step back), then SIGKILL to its session if it lingers."""
        if not self.running:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.reaped), grace_s)
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)  # the group keeps its id while any member lives
            await asyncio.shield(self.reaped)


class StatusClock:
    """Times `client.stats()` (what `inferq status` runs) over and over, each call filed under the phase it
    started in; every phase also gets one call as it begins. A call still running at the end is waited for:
    cutting it off would drop the slowest calls most often."""

    def __init__(self, client: InferenceClient, interval_s: float) -> None:
        self.client, self.interval_s = client, interval_s
        self.phase = ""
        self.samples: dict[str, list[float]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def enter(self, phase: str) -> None:
        self.phase = phase
        await self.sample()

    async def sample(self) -> None:
        phase, t0 = self.phase, time.perf_counter()
        await self.client.stats()
        self.samples.setdefault(phase, []).append(time.perf_counter() - t0)

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)
            if not self._stopping.is_set():
                await self.sample()

    def start(self) -> None:
        if self.interval_s > 0:  # else only the one call as each phase begins
            self._task = asyncio.create_task(self._loop(), name="inferq-bench-status")

    async def stop(self, *, cancel: bool = False) -> None:
        """No more calls; the one running now is waited for (or, with `cancel`, on a way out, cut off)."""
        self._stopping.set()
        if self._task:
            if cancel:
                self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def report(self) -> dict[str, dict[str, float]]:
        out = {}
        for phase, values in self.samples.items():
            s = spread(values)
            out[phase] = {"calls": len(values), "p50_ms": s["p50"], "p99_ms": s["p99"], "max_ms": 1000 * max(values)}
        return out


def vm_hwm_kib(pid: int | None) -> int:
    """A live process's peak RSS so far (VmHWM), in KiB; 0 if it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


async def _memory(client: InferenceClient) -> dict[str, int]:
    info = await client.redis.info("memory")
    return {k: int(info[k]) for k in ("used_memory", "used_memory_rss", "used_memory_peak", "used_memory_dataset")}


async def _freed(client: InferenceClient) -> None:
    """Until Redis's background thread has freed what was deleted (a big key's DEL frees it later, with
    lazyfree-lazy-user-del, valkey's default): used_memory counts it until then."""
    while int((await client.redis.info("memory")).get("lazyfree_pending_objects", 0)):  # noqa: ASYNC110
        await asyncio.sleep(_POLL_S)


def _lanes(keys: Keys) -> list[str]:
    """The model's normal lane, every shard's stream of it (a job's requests are all in its job's shard)."""
    return [keys.queue(MODEL, "normal", shard) for shard in range(keys.shards)]


async def _queued(client: InferenceClient) -> int:
    return sum([int(await client.redis.xlen(stream)) for stream in _lanes(client.keys)])


async def _usage(client: InferenceClient, key: str) -> int:
    """MEMORY USAGE of one key, counted whole (SAMPLES 0), 0 if it does not exist."""
    return int(await client.redis.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0") or 0)


async def breakdown(client: InferenceClient, job: JobRecord, lines: int) -> dict[str, dict[str, float]]:
    """Bytes by kind of the job's keys: each single key whole, the result hashes from an even sample of
    lines, scaled up. Kinds with no key now are left out."""
    keys = client.keys
    out: dict[str, dict[str, float]] = {}
    lanes = [await _usage(client, stream) for stream in _lanes(keys)]
    if any(lanes):
        out["lane stream"] = {"keys": sum(1 for used in lanes if used), "bytes": sum(lanes)}
    single = {
        "job's id hash (digests, entries)": keys.bulk_ids(job.id),
        "staged input": keys.bulk_input(job.id),
        "reply stream": keys.done(job.id),
        "job record": keys.bulk(job.id),
    }
    for kind, key in single.items():
        used = await _usage(client, key)
        if used:
            out[kind] = {"keys": 1, "bytes": used}
    step = max(lines // _RESULT_SAMPLE, 1)
    sample = [keys.result(request_id(job, f"req-{i}")) for i in range(0, lines, step)]
    async with client.redis.pipeline(transaction=False) as pipe:
        for key in sample:
            pipe.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0")
        sizes = [int(x or 0) for x in await pipe.execute()]
    present = sum(1 for size in sizes if size)  # a queued line has none (its entry is in the id hash)
    if present:
        share = present / len(sizes)
        out["result hashes"] = {"keys": round(share * lines), "bytes": round(sum(sizes) / len(sizes) * lines)}
    for v in out.values():
        v["per_request"] = v["bytes"] / max(lines, 1)
    return out


def check_output(path: Path, lines: int) -> dict[str, int]:
    """Every custom_id `req-0` .. `req-{N-1}` exactly once, none with an error; nothing else."""
    seen = bytearray(lines)
    out = {"output_lines": 0, "missing": 0, "duplicated": 0, "failed": 0, "unknown": 0}
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            out["output_lines"] += 1
            record = json.loads(raw)
            custom_id = str(record.get("custom_id", ""))
            number = custom_id.removeprefix("req-")
            if not number.isdigit() or int(number) >= lines:
                out["unknown"] += 1
                continue
            if seen[int(number)]:
                out["duplicated"] += 1
            seen[int(number)] = 1
            response = record.get("response") or {}
            if record.get("error") is not None or response.get("status_code") != 200:
                out["failed"] += 1
    out["missing"] = lines - sum(seen)
    return out


async def bench_backlog(
    base: Settings,
    *,
    lines: int = 1_000_000,
    workers: int = 2,
    mode: str = DETACHED,
    max_tokens: int = 4,
    max_inflight: int = 256,
    status_every_s: float = 2.0,
    keep_files: bool = False,
    say: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """The whole run (module docstring); the report's `check` says whether every line was answered once."""
    work = Path(tempfile.mkdtemp(prefix="inferq-bench-backlog-"))
    batch, output = work / "batch.jsonl", work / "output.jsonl"
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    write_batch(batch, lines, MODEL, max_tokens)
    phases["write input"] = time.perf_counter() - t0
    say(f"wrote {lines:,} lines ({batch.stat().st_size / 2**20:.0f} MiB) in {phases['write input']:.1f} s")

    server = temporary_server()
    # A job's requests all live in its shard, and each shard holds its share of a lane's cap.
    caps = {"bulk_window": max(lines, 1), "max_queue_len": max(lines, 100_000) * base.shards}
    settings = load_settings(
        redis_url=server.url, key_prefix=PREFIX, model=MODEL, data_dir=base.data_dir, shards=base.shards, **caps
    )
    env = worker_env(
        settings, INFERQ_MODEL=MODEL, INFERQ_BULK_WINDOW=str(caps["bulk_window"]),
        INFERQ_MAX_QUEUE_LEN=str(caps["max_queue_len"]), INFERQ_STANDIN_STEP_MS="0",
    )  # fmt: skip
    children: list[Child] = []
    try:
        async with InferenceClient(settings) as client:
            report = await _run(
                client, server, env, work, batch, output, children, phases,
                lines=lines, workers=workers, mode=mode, max_inflight=max_inflight, status_every_s=status_every_s,
                say=say,
            )  # fmt: skip
    finally:
        for child in children:
            await child.stop(grace_s=5)
        server.stop()
        shutil.rmtree(server.dir.parent, ignore_errors=True)  # its AOF: gigabytes at a million
    report["peak_rss_mib"] = {c.name: c.peak_rss_kib / 1024 for c in children} | report["peak_rss_mib"]
    report["peak_rss_mib"]["bench (this process)"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report["process_wall_s"] = {c.name: c.wall_s for c in children}
    report.update(lines=lines, workers=workers, mode=mode, max_tokens=max_tokens, max_inflight=max_inflight)
    report.update(settings={**caps, "shards": base.shards}, environment=environment())
    report["files"] = str(work) if keep_files else None
    if not keep_files:
        shutil.rmtree(work, ignore_errors=True)
    return report


async def _run(
    client: InferenceClient,
    server: EmbeddedServer,
    env: dict[str, str],
    work: Path,
    batch: Path,
    output: Path,
    children: list[Child],
    phases: dict[str, float],
    *,
    lines: int,
    workers: int,
    mode: str,
    max_inflight: int,
    status_every_s: float,
    say: Callable[[str], None],
) -> dict[str, Any]:
    log = work / "processes.log"

    def spawn(name: str, cmd: list[str], capture: bool = False) -> Child:
        children.append(Child(name, cmd, env, log, capture=capture))
        return children[-1]

    empty = await _memory(client)
    status = StatusClock(client, status_every_s)
    status.start()
    try:
        # ---- admission -------------------------------------------------------------------------------------
        t0 = time.perf_counter()
        if mode == DETACHED:
            submit = spawn("bulk submit", inferq_argv("bulk", "submit", str(batch), "-m", MODEL), capture=True)
            await status.enter("staging")
            await submit.finished()
            job_id = submit.stdout.decode().strip()
            phases["stage input (bulk submit)"] = time.perf_counter() - t0
            say(f"staged: job {job_id} in {phases['stage input (bulk submit)']:.1f} s")
            t0 = time.perf_counter()
            feeder = spawn("bulk runner", inferq_argv("bulk", "runner"))
        else:
            job_id = attached_job_id(batch, output, MODEL)
            feeder = spawn("bulk (attached)", inferq_argv("bulk", str(batch), "-o", str(output), "-m", MODEL))
        await status.enter("admitting")
        job = await _wait_job(client, job_id, [feeder], lambda j: bool(j.feed_done), "admitting", lines, say)
        phases["admit every line"] = time.perf_counter() - t0
        say(f"admitted: {job.submitted:,} requests in {phases['admit every line']:.1f} s")

        # ---- held ------------------------------------------------------------------------------------------
        await status.enter("held")
        queued = await _queued(client)
        held = await _memory(client)
        kinds = await breakdown(client, job, lines)
        added = held["used_memory"] - empty["used_memory"]
        held_report = {
            "queued": queued, "keys": int(await client.redis.dbsize()), "empty_used_memory": empty["used_memory"],
            **held, "added_bytes": added, "bytes_per_request": added / max(lines, 1), "by_kind": kinds,
            "other_bytes": added - sum(v["bytes"] for v in kinds.values()),
        }  # fmt: skip
        for _ in range(4):
            await status.sample()  # the idle figure: nothing else runs now
        say(f"held: {queued:,} queued, Redis used memory {held['used_memory'] / 2**20:.0f} MiB "
            f"({added / max(lines, 1):.0f} bytes per request)")  # fmt: skip

        # ---- drain -----------------------------------------------------------------------------------------
        t0 = time.perf_counter()
        standin = ("--engine", "standin", "--model", MODEL, "--no-bulk-jobs", "--max-inflight", str(max_inflight))
        pool = [spawn(f"worker {i + 1}", worker_argv(f"backlog-w{i + 1}", *standin)) for i in range(workers)]
        await status.enter("draining")

        async def lane_empty() -> float:
            while await _queued(client):  # noqa: ASYNC110 - only Redis knows
                await asyncio.sleep(_POLL_S)
            return time.perf_counter() - t0

        watch = asyncio.create_task(lane_empty())
        try:
            job = await _wait_job(client, job_id, [feeder, *pool], lambda j: j.state in ENDED, "draining", lines, say)
            drained = time.perf_counter() - t0
            # Every reply-stream record is written with its entry's XDEL: by the job's end the lane was empty, even
            # if the bench's look at it came a poll later.
            phases["workers answer every request"] = min(await watch, drained)
            phases["drain (workers start to job completed)"] = drained
        finally:
            watch.cancel()
        await _freed(client)  # the job's end deleted its input and id hash: Redis frees them in the background
        end = {**await _memory(client), "by_kind": await breakdown(client, job, lines)}
        say(f"completed: {job.done:,} done, {job.failed:,} failed in "
            f"{phases['drain (workers start to job completed)']:.1f} s")  # fmt: skip

        # ---- output ----------------------------------------------------------------------------------------
        t0 = time.perf_counter()
        if mode == DETACHED:
            download = spawn("bulk download", inferq_argv("bulk", "download", job_id, "-o", str(output)))
            await status.enter("download")
            await download.finished()
            phases["download output"] = time.perf_counter() - t0
        else:
            await feeder.finished()  # it wrote the output as records came and exits once all are in
            phases["attached command exits"] = time.perf_counter() - t0
        await status.stop()
    finally:
        await status.stop(cancel=True)  # on a way out: at once
    t0 = time.perf_counter()
    check = await asyncio.to_thread(check_output, output, lines)
    phases["check output"] = time.perf_counter() - t0
    persistence = await client.redis.info("persistence")
    last = await _memory(client)
    redis_hwm = vm_hwm_kib(server.pid())
    for child in children:
        await child.stop()
    return {
        "job": job.to_dict(), "phases_s": phases, "held": held_report,
        "admission_per_s": lines / phases["admit every line"],
        "drain_per_s": lines / phases["drain (workers start to job completed)"],
        "after_drain": end, "redis_peak_used_memory": last["used_memory_peak"],
        "aof_rewrites": int(persistence.get("aof_rewrites", 0)), "status": status.report(), "check": check,
        "peak_rss_mib": {"redis-server": redis_hwm / 1024},
    }  # fmt: skip


async def _wait_job(
    client: InferenceClient,
    job_id: str,
    processes: list[Child],
    until: Callable[[JobRecord], bool],
    what: str,
    lines: int,
    say: Callable[[str], None],
) -> JobRecord:
    """Until the job's record satisfies `until`; raises if one of `processes` exits meanwhile."""
    next_note = time.monotonic() + _PROGRESS_S
    while True:
        job = await client.redis.hgetall(client.keys.bulk(job_id))
        record = JobRecord.from_hash(job_id, job) if job else None
        if record is not None and until(record):
            return record
        for child in processes:
            if not child.running:
                await child.finished()  # raises with its log if it failed
                if record is None or not until(record):
                    raise InferqError(f"{child.name} exited while {what}, the job not there yet: {record}")
        if time.monotonic() > next_note and record is not None:
            say(f"{what}: fed {record.fed:,}, answered {record.accounted:,} of {lines:,}")
            next_note += _PROGRESS_S
        await asyncio.sleep(_POLL_S)


def backlog_table(report: dict[str, Any]) -> str:
    held, check = report["held"], report["check"]
    mib = 2**20
    lines = [
        f"{report['lines']:,} OpenAI Batch lines ({report['mode']}), {report['workers']} stand-in worker(s) of "
        f"{report['max_inflight']} slots at no engine cost, {report['max_tokens']} tokens a line",
        "",
        f"{'phase':<42}{'s':>9}",
        *(f"{name:<42}{seconds:>9.1f}" for name, seconds in report["phases_s"].items()),
        f"admission {report['admission_per_s']:,.0f} requests/s, drain {report['drain_per_s']:,.0f} requests/s",
        "",
        f"held: {held['queued']:,} queued, {held['keys']:,} keys; Redis used memory {held['used_memory'] / mib:.1f} "
        f"MiB ({held['empty_used_memory'] / mib:.1f} empty), RSS {held['used_memory_rss'] / mib:.1f} MiB; "
        f"{held['bytes_per_request']:.0f} bytes per queued request",
        f"{'where it goes':<36}{'keys':>10}{'MiB':>9}{'bytes/request':>15}",
        *(
            f"{kind:<36}{v['keys']:>10,}{v['bytes'] / mib:>9.1f}{v['per_request']:>15.0f}"
            for kind, v in sorted(held["by_kind"].items(), key=lambda kv: -kv[1]["bytes"])
        ),
        f"{'other (key table, expiry, buffers)':<36}{'':>10}{held['other_bytes'] / mib:>9.1f}"
        f"{held['other_bytes'] / max(report['lines'], 1):>15.0f}",
        f"after the drain (the job completed, its output kept for download): used memory "
        f"{report['after_drain']['used_memory'] / mib:.1f} MiB; Redis peak used memory "
        f"{report['redis_peak_used_memory'] / mib:.1f} MiB",
        *(
            f"{kind:<36}{v['keys']:>10,}{v['bytes'] / mib:>9.1f}{v['per_request']:>15.0f}"
            for kind, v in sorted(report["after_drain"]["by_kind"].items(), key=lambda kv: -kv[1]["bytes"])
        ),
        "",
        f"{'inferq status (client.stats()) while':<38}{'calls':>7}{'p50 ms':>9}{'max ms':>9}",
        *(f"{phase:<38}{s['calls']:>7}{s['p50_ms']:>9.1f}{s['max_ms']:>9.1f}" for phase, s in report["status"].items()),
        "",
        f"{'peak RSS':<38}{'MiB':>9}",
        *(f"{name:<38}{v:>9.1f}" for name, v in report["peak_rss_mib"].items()),
        "",
        f"output: {check['output_lines']:,} lines; missing {check['missing']}, duplicated {check['duplicated']}, "
        f"failed {check['failed']}, unknown {check['unknown']}",
    ]
    return "\n".join(lines)


def answered_once(report: dict[str, Any]) -> bool:
    check = report["check"]
    return check["output_lines"] == report["lines"] and not any(
        check[k] for k in ("missing", "duplicated", "failed", "unknown")
    )
