"""OpenAI's Batch API over inferq's detached bulk jobs (docs/CONTRACTS.md, "Gateway"): upload a JSONL file
of requests, create a batch from it, follow it, cancel it, read its output and error files. The job runs on
the workers like any `inferq bulk submit` job; a batch's output and error files are read from the job's
reply stream when asked for (ids `file-out-JOB` and `file-err-JOB`), not stored twice."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web

from inferq.gateway.context import CALLER, GATEWAY, Gateway, read_json
from inferq.gateway.errors import HttpError
from inferq.gateway.files import Files, file_object
from inferq.producer.bulk.detached import BulkJobs
from inferq.producer.bulk.output import to_output
from inferq.producer.bulk.state import ENDED, BulkStore, JobRecord
from inferq.shared.codec import text
from inferq.shared.connection import pipeline
from inferq.shared.errors import RequestNotFound

OUTPUT, ERRORS = "file-out-", "file-err-"
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
_LISTED = 100


def owner_of(request: web.Request) -> str:
    return request[CALLER].tenant or ""


def _gateway(request: web.Request) -> Gateway:
    return request.app[GATEWAY]


def _files(gateway: Gateway) -> Files:
    assert gateway.files is not None  # set when the gateway starts
    return gateway.files


# ---- files ------------------------------------------------------------------------------------------------
async def upload_file(request: web.Request) -> web.Response:
    """POST /v1/files (multipart: `purpose` and `file`), as the openai SDK's files.create sends it."""
    gateway = _gateway(request)
    limit = gateway.settings.gateway_max_file_bytes
    purpose, filename, data = None, "upload.jsonl", None
    async for part in await request.multipart():
        if not isinstance(part, BodyPartReader):
            continue
        if part.name == "purpose":
            purpose = (await part.text()).strip()
        elif part.name == "file":
            filename = part.filename or filename
            data = await _read_limited(part, limit)
    if purpose != "batch":
        raise HttpError(400, "purpose must be batch: files are for the Batch API", param="purpose")
    if data is None:
        raise HttpError(400, "no file: send it as the multipart field `file`", param="file")
    return web.json_response(await _files(gateway).create(owner_of(request), filename, purpose, data))


async def _read_limited(part: BodyPartReader, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := await part.read_chunk():
        size += len(chunk)
        if size > limit:
            raise HttpError(413, f"the file is over the limit of {limit:,} bytes (INFERQ_GATEWAY_MAX_FILE_BYTES)")
        chunks.append(chunk)
    return b"".join(chunks)


async def list_files(request: web.Request) -> web.Response:
    files = await _files(_gateway(request)).list(owner_of(request))
    return web.json_response({"object": "list", "data": files, "has_more": False})


async def read_file(request: web.Request) -> web.Response:
    file_id = request.match_info["file_id"]
    if file_id.startswith((OUTPUT, ERRORS)):
        job, _ = await _own_batch(request, file_id.split("-", 2)[2])
        data = await _render(_gateway(request), job, errors=file_id.startswith(ERRORS))
        created = int(job.finished_at or job.created_at)
        meta = {"filename": f"{file_id}.jsonl", "purpose": "batch_output", "bytes": str(len(data)),
                "created_at": str(created)}  # fmt: skip
        return web.json_response(file_object(file_id, meta, _gateway(request).settings.gateway_file_ttl_s))
    found = await _files(_gateway(request)).get(owner_of(request), file_id)
    if found is None:
        raise HttpError(404, f"no file {file_id!r} of this API key", "not_found")
    return web.json_response(found)


async def file_content(request: web.Request) -> web.Response:
    file_id, gateway = request.match_info["file_id"], _gateway(request)
    if file_id.startswith((OUTPUT, ERRORS)):
        job, _ = await _own_batch(request, file_id.split("-", 2)[2])
        data = await _render(gateway, job, errors=file_id.startswith(ERRORS))
    else:
        found = await _files(gateway).content(owner_of(request), file_id)
        if found is None:
            raise HttpError(404, f"no file {file_id!r} of this API key", "not_found")
        data = found
    return web.Response(body=data, content_type="application/jsonl")


async def delete_file(request: web.Request) -> web.Response:
    file_id = request.match_info["file_id"]
    if not await _files(_gateway(request)).delete(owner_of(request), file_id):
        raise HttpError(404, f"no file {file_id!r} of this API key", "not_found")
    return web.json_response({"id": file_id, "object": "file", "deleted": True})


# ---- batches ----------------------------------------------------------------------------------------------
async def create_batch(request: web.Request) -> web.Response:
    gateway, owner = _gateway(request), owner_of(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise HttpError(400, "the request body must be a JSON object")
    file_id, endpoint = body.get("input_file_id"), body.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise HttpError(400, f"endpoint must be one of {', '.join(ENDPOINTS)}", param="endpoint")
    if body.get("completion_window", "24h") != "24h":
        raise HttpError(400, "completion_window must be 24h", param="completion_window")
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict) or len(metadata) > 16:
        raise HttpError(400, "metadata is an object of at most 16 pairs", param="metadata")
    data = await _files(gateway).content(owner, file_id) if isinstance(file_id, str) else None
    if data is None:
        missing = f"no file {file_id!r} of this API key: upload it with POST /v1/files"
        raise HttpError(400, missing, param="input_file_id")
    with tempfile.TemporaryDirectory(prefix="inferq-batch-") as folder:  # the job stages it in Redis at once
        path = Path(folder) / "input.jsonl"
        path.write_bytes(data)
        job = await BulkJobs(gateway.client).submit(path)
    keys, ttl = gateway.client.keys, 2 * gateway.settings.bulk_ttl_s
    meta = {"owner": owner, "input_file_id": file_id, "endpoint": endpoint, "created_at": repr(time.time()),
            "metadata": json.dumps(metadata)}  # fmt: skip
    async with pipeline(gateway.client.redis, atomic=True) as pipe:
        pipe.hset(keys.batch(job.id), mapping=meta)
        pipe.expire(keys.batch(job.id), ttl)
        pipe.zadd(keys.batches(owner), {job.id: time.time()})
        pipe.zremrangebyscore(keys.batches(owner), "-inf", time.time() - ttl)
        pipe.expire(keys.batches(owner), ttl)
        await pipe.execute()
    return web.json_response(_batch_object(job, meta))


async def read_batch(request: web.Request) -> web.Response:
    job, meta = await _own_batch(request, _job_id(request))
    return web.json_response(_batch_object(job, meta))


async def cancel_batch(request: web.Request) -> web.Response:
    job, meta = await _own_batch(request, _job_id(request))
    jobs = BulkJobs(_gateway(request).client)
    await jobs.cancel(job.id)
    return web.json_response(_batch_object(await jobs.get(job.id), meta))  # its state after the cancel


async def list_batches(request: web.Request) -> web.Response:
    gateway, owner = _gateway(request), owner_of(request)
    ids = [text(j) for j in await gateway.client.redis.zrevrange(gateway.client.keys.batches(owner), 0, _LISTED - 1)]
    data = []
    for job_id in ids:
        try:
            data.append(_batch_object(*await _own_batch(request, job_id)))
        except HttpError:
            continue  # ended long ago: its record expired
    return web.json_response({"object": "list", "data": data, "has_more": False})


def _job_id(request: web.Request) -> str:
    return request.match_info["batch_id"].removeprefix("batch_")


async def _meta(request: web.Request, job_id: str) -> dict[str, str]:
    gateway = _gateway(request)
    raw = await gateway.client.redis.hgetall(gateway.client.keys.batch(job_id))
    return {text(k): text(v) for k, v in raw.items()}


async def _own_batch(request: web.Request, job_id: str) -> tuple[JobRecord, dict[str, str]]:
    """The caller's batch: its job and the Batch API's record of it; 404 for another key's."""
    meta = await _meta(request, job_id)
    if meta.get("owner") != owner_of(request):
        raise HttpError(404, f"no batch {job_id!r} of this API key", "not_found")
    try:
        return await BulkJobs(_gateway(request).client).get(job_id), meta
    except RequestNotFound:
        raise HttpError(404, f"batch {job_id!r} has expired", "not_found") from None


# A bulk job's states are OpenAI's batch statuses by design (producer/bulk/state.py).
_STATUS = frozenset({"validating", "in_progress", "finalizing", "cancelling", "cancelled", "completed", "failed"})


def _batch_object(job: JobRecord, meta: dict[str, str]) -> dict[str, Any]:
    ended, finished = job.state in ENDED, int(job.finished_at) or None
    failed = job.failed + job.invalid
    return {
        "id": f"batch_{job.id}", "object": "batch", "endpoint": meta.get("endpoint"), "errors": None,
        "input_file_id": meta.get("input_file_id"), "completion_window": "24h",
        "status": job.state if job.state in _STATUS else "failed",
        "output_file_id": f"{OUTPUT}{job.id}" if ended and job.done else None,
        "error_file_id": f"{ERRORS}{job.id}" if ended and failed else None,
        "created_at": int(float(meta.get("created_at", job.created_at))),
        "in_progress_at": int(job.started_at) or None, "expires_at": None, "finalizing_at": None,
        "completed_at": finished if job.state == "completed" else None,
        "failed_at": finished if job.state == "failed" else None, "expired_at": None,
        "cancelling_at": None, "cancelled_at": finished if job.state == "cancelled" else None,
        "request_counts": {"total": job.total, "completed": job.done, "failed": failed},
        "metadata": json.loads(meta.get("metadata") or "{}"),
    }  # fmt: skip


async def _render(gateway: Gateway, job: JobRecord, *, errors: bool) -> bytes:
    """The job's output lines (`errors`: the failed and invalid ones; else the answered ones), from its reply
    stream, in the order they ended."""
    if job.state not in ENDED:
        raise HttpError(400, f"batch {job.id} has not ended: its files appear when it has", "not_ready")
    store = BulkStore(gateway.client.redis, gateway.client.keys, gateway.settings.bulk_ttl_s)
    lines, after = [], "0-0"
    while records := await store.records(job.id, after):
        for entry_id, record in records:
            after = entry_id
            line = to_output(record, job.tag_defaults)
            if (line.get("error") is not None) == errors:
                lines.append(json.dumps(line, ensure_ascii=False))
    return "".join(f"{line}\n" for line in lines).encode()
