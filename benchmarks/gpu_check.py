"""The GPU check: the online bench on an NVIDIA GPU, vLLM's CUDA build, a model given by path.

    pip install -e '.[gpu,bench,dev]'
    python benchmarks/gpu_check.py --model /models/Qwen2.5-1.5B-Instruct

Runs `inferq bench online` with three targets side by side, each starting its own engine on the GPU in turn:
`direct` (vLLM's AsyncLLM in the bench's process, as it ships), `inferq` (a local worker with
INFERQ_ENGINE_PROFILE=auto, which on a GPU is vLLM as it ships: CUDA graphs, compilation, its own processes),
and `openai` (vLLM's OpenAI server, as it ships). Prints the table and writes it as JSON under
benchmarks/results/. BENCHMARKS.md says where it has run and where it has not yet.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def refuse(why: str) -> None:
    print(f"error: {why}", file=sys.stderr)
    raise SystemExit(2)


def check_machine() -> str:
    """The GPU's name; refuses (exit 2, one line) without an NVIDIA GPU or a CUDA build of vLLM."""
    if shutil.which("nvidia-smi") is None:
        refuse("no NVIDIA GPU here (nvidia-smi not found): this check runs on a GPU machine")
    try:
        import torch
        from vllm.platforms import current_platform
    except ImportError as missing:
        refuse(f"{missing.name} is not installed: pip install -e '.[gpu,bench,dev]'")
    if not torch.cuda.is_available() or not current_platform.is_cuda():
        refuse("torch sees no CUDA device, or this vLLM is not its CUDA build: pip install -e '.[gpu,bench,dev]'")
    return str(torch.cuda.get_device_name(0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model folder (config.json, weights, tokenizer)")
    p.add_argument("--concurrency", default="1,64,256", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=1024, help="requests per concurrency level and target")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens of each request (greedy)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of every target, interleaved")
    args = p.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        refuse(f"{args.model} is not a model folder (no config.json); give the path of one")
    gpu = check_machine()
    name = Path(args.model).name
    out = ROOT / "benchmarks" / "results" / f"gpu-{name}-{datetime.date.today().isoformat()}.json"
    cmd = [
        sys.executable, "-m", "inferq.cli", "bench", "online", "--target", "direct,inferq,openai", "--local",
        "--model", str(Path(args.model).resolve()), "--concurrency", args.concurrency,
        "--num-requests", str(args.requests), "--output-len", str(args.output_len), "--rounds", str(args.rounds),
        "--json", str(out),
    ]  # fmt: skip
    env = {**os.environ, "INFERQ_ENGINE_PROFILE": "auto"}
    print(f"on {gpu}: {' '.join(cmd)}", flush=True)
    raise SystemExit(subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode)


if __name__ == "__main__":
    main()
