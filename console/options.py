"""Options that several commands take, each spelled and explained once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RedisUrl = Annotated[
    str | None, typer.Option("--redis-url", help="redis://, rediss:// or unix:// URL (env INFERQ_REDIS_URL)")
]
Model = Annotated[
    str | None, typer.Option("--model", "-m", help="tiny, smollm2, a local path or a hub id (env INFERQ_MODEL)")
]
StreamInterval = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="tokens per streamed event; the first token and the end go at once; 1: every token, at a cost in "
        "throughput (default 8)",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="print JSON instead of text")]
JsonOut = Annotated[Path | None, typer.Option("--json", help="write every figure here as JSON")]
Engine = Annotated[str, typer.Option(help="vllm, or standin (a fixed-rate fake for queue tests)")]
