"""Memory of the bulk commands against the length of the input: the peak RSS of `inferq bulk` (attached),
`inferq bulk submit` and `inferq bulk download` for files of growing size. Flat memory means the same peak
whatever the line count: nothing per line is held in the process.

    python benchmarks/bulk_memory.py --lines 1000,10000,100000

Workers are stand-in engines (a deterministic fake: this measures the producer side, not the model), on a
fresh embedded valkey-server. Peak RSS is the process's VmHWM from /proc, read until it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import time
from pathlib import Path

from common import spawn_worker, temp_server

from inferq.producer.local import inferq_argv


def write_input(path: Path, n: int) -> None:
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"custom_id": f"line-{i:07d}", "prompt": f"question number {i}", "max_tokens": 4}))
            fh.write("\n")


def peak_rss(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float, str]:
    """(wall s, peak RSS MiB, stdout) of one command run to its end."""
    t0 = time.perf_counter()
    peak = 0
    with open(log, "ab") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err)
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
            except (FileNotFoundError, ProcessLookupError):
                break
            time.sleep(0.05)
        out = proc.stdout.read().decode() if proc.stdout else ""
        proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:5])} exited {proc.returncode}; see {log}")
    return time.perf_counter() - t0, peak / 1024, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", default="1000,10000,100000", help="comma-separated input sizes")
    p.add_argument("--workers", type=int, default=2, help="stand-in workers")
    args = p.parse_args()
    server, data = temp_server()
    prefix = "bulkmem"
    env = {**os.environ, "INFERQ_REDIS_URL": server.url, "INFERQ_KEY_PREFIX": prefix}
    log = data / "bench.log"
    standin = ["--engine", "standin", "--model", "fake", "--max-inflight", "512"]
    workers = [spawn_worker(server.url, prefix, f"w{i}", standin, log) for i in range(args.workers)]
    cli = inferq_argv("bulk")
    rows = []
    try:
        for n in (int(x) for x in args.lines.split(",")):
            src, out, dl = data / f"in-{n}.jsonl", data / f"out-{n}.jsonl", data / f"dl-{n}.jsonl"
            write_input(src, n)
            attached = peak_rss([*cli, str(src), "-o", str(out), "-m", "fake"], env, log)
            assert sum(1 for _ in open(out)) == n, f"attached output of {n} lines is short"
            submit = peak_rss([*cli, "submit", str(src), "-m", "fake"], env, log)
            job = submit[2].strip()
            download = peak_rss([*cli, "download", job, "-o", str(dl), "--wait"], env, log)
            assert sum(1 for _ in open(dl)) == n, f"download of {n} lines is short"
            rows.append((n, attached, submit, download))
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            w.wait(timeout=60)
        server.stop()

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; files in {data}")
    print(f"{args.workers} stand-in workers, 4 tokens per line; peak RSS (VmHWM) of each command, MiB")
    head = ("lines", "bulk (attached) s", "MiB", "submit s", "MiB", "download --wait s", "MiB")
    print("{:>9} | {:>18} {:>7} | {:>9} {:>7} | {:>18} {:>7}".format(*head))
    for n, (aw, am, _), (sw, sm, _), (dw, dm, _) in rows:
        print(f"{n:>9} | {aw:>18.1f} {am:>7.1f} | {sw:>9.1f} {sm:>7.1f} | {dw:>18.1f} {dm:>7.1f}")


if __name__ == "__main__":
    main()
