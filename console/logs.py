"""How the long-running commands log (INFERQ_LOG_FORMAT, `--log-format`): text lines for a terminal, or one
JSON object per line for a log pipeline, vLLM's own lines (in each of its processes) included.

A JSON line has `ts` (ISO 8601, UTC), `level`, `logger`, `message`, the process id, and for a request's own
lines (INFERQ_LOG_REQUESTS) its fields: request_id, model, lane, worker, status, token counts and timings in
seconds (queued_s, ttft_s from admission, run_s, total_s).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_VLLM_CONFIG = "VLLM_LOGGING_CONFIG_PATH"


class JsonFormatter(logging.Formatter):
    """One JSON object per record; a request's fields (`extra={"inferq": {...}}`) at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        process = getattr(record, "vllm_process_name", None)  # vLLM's name for its process (EngineCore, ...)
        if process:
            line["process"] = process
        fields = getattr(record, "inferq", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def log_to_stderr(log_format: str, data_dir: Path | None = None) -> None:
    """Set up this process's logging; with `json` and a `data_dir`, also the vLLM processes it starts."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    if log_format == "json" and data_dir is not None and _VLLM_CONFIG not in os.environ:
        os.environ[_VLLM_CONFIG] = str(_vllm_config(data_dir))


def _vllm_config(data_dir: Path) -> Path:
    """A logging config for vLLM (it reads VLLM_LOGGING_CONFIG_PATH in every process it starts): its `vllm`
    logger and the root logger through JsonFormatter, to stderr. Progress bars (tqdm, as weights load) are
    not log records and stay as they are."""
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {"json": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "loggers": {"vllm": {"handlers": ["json"], "level": os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper(),
                             "propagate": False}},
        # What torch and transformers log in vLLM's processes goes to the root logger: JSON too. In the worker's
        # own process this is the handler log_to_stderr set already, set again as vLLM loads.
        "root": {"handlers": ["json"], "level": "INFO"},
    }  # fmt: skip
    path = data_dir / "vllm-logging.json"
    data_dir.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f"{path.name}.{os.getpid()}")  # whole or not at all: workers may start together
    staged.write_text(json.dumps(config))
    staged.replace(path)
    return path
