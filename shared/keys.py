"""Every Redis key and channel name inferq uses. Nothing else formats a key (docs/CONTRACTS.md, "Keys")."""

from __future__ import annotations

import re
from dataclasses import dataclass

GROUP = "workers"
LANES: tuple[str, ...] = ("high", "normal", "low")  # priority order: a worker fills free slots from the left
# A model's name is part of its queues' key names: no ':' (it would read as another lane), no space, no glob.
MODEL_NAME = r"^[A-Za-z0-9._/@+\-]+$"
MODEL_NAME_MAX = 200
# A client id (the end of its reply channel's name) or a bulk job id (the end of its reply stream's name).
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
TENANT_NAME = _NAME.pattern  # a tenant a client can be bound to (INFERQ_TENANT): no ':' (it ends the scope)
_CHANNEL = re.compile(rf"(?:{_NAME.pattern}:)?{_NAME.pattern}")


def bulk_request_id(job: str, epoch: int, line_digest: str) -> str:
    """The id of a bulk job's request: a reply stream `{p}:done:{job}` takes only ids that start `bulk-{job}-`."""
    return f"bulk-{job}-{epoch}-{line_digest}"


@dataclass(frozen=True)
class Keys:
    prefix: str = "inferq"

    def queue(self, model: str, lane: str = "normal") -> str:
        if lane not in LANES:
            raise ValueError(f"unknown lane {lane!r}; use one of {', '.join(LANES)}")
        return f"{self.prefix}:q:{model}:{lane}"

    def queues(self, model: str) -> list[str]:
        """The model's lane streams, highest priority first."""
        return [self.queue(model, lane) for lane in LANES]

    def result(self, request_id: str) -> str:
        return f"{self.prefix}:r:{request_id}"

    def tokens(self, client_id: str) -> str:
        return f"{self.prefix}:t:{client_id}"

    def dlq(self, model: str) -> str:
        return f"{self.prefix}:dlq:{model}"

    def dlq_dropped(self, model: str) -> str:
        """String counter: dead letters dropped from the model's DLQ, the oldest first, past its bound."""
        return f"{self.prefix}:dlq:{model}:dropped"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:w:{name}"

    def workers_pattern(self) -> str:
        return f"{self.prefix}:w:*"

    def cancel(self) -> str:
        return f"{self.prefix}:cancel"

    def done(self, job: str) -> str:
        return f"{self.prefix}:done:{job}"

    def bulk(self, job: str) -> str:
        """Hash: one bulk job's record (state, counts, where its feed and tally stand)."""
        return f"{self.prefix}:bulk:{job}"

    def bulk_ids(self, job: str) -> str:
        """Hash custom_id digest -> first line number: duplicate detection without holding ids in memory."""
        return f"{self.prefix}:bulk:{job}:ids"

    def bulk_input(self, job: str) -> str:
        """Hash chunk number -> input lines: a detached job's staged input, readable by any runner."""
        return f"{self.prefix}:bulk:{job}:input"

    def bulk_lease(self, job: str) -> str:
        """String with a TTL: the runner that feeds and tallies the job now (one at a time)."""
        return f"{self.prefix}:bulk:{job}:lease"

    def bulk_jobs(self) -> str:
        """Sorted set job -> creation time: `inferq bulk list`."""
        return f"{self.prefix}:bulks"

    def file(self, file_id: str) -> str:
        """Hash: one file uploaded to the gateway (owner, filename, purpose, bytes, created_at, data)."""
        return f"{self.prefix}:file:{file_id}"

    def files(self, owner: str) -> str:
        """Sorted set file id -> created: one tenant's files, for GET /v1/files."""
        return f"{self.prefix}:files:{owner}"

    def batch(self, job: str) -> str:
        """Hash: what the gateway's Batch API knows of a bulk job beyond its record (owner, input file, endpoint,
        window, metadata)."""
        return f"{self.prefix}:batch:{job}"

    def batches(self, owner: str) -> str:
        """Sorted set job -> created: one tenant's batches, for GET /v1/batches."""
        return f"{self.prefix}:batches:{owner}"

    def arq_queue(self) -> str:
        """Sorted set: arq's queue of bulk-job steps (its health-check key is this name + `:health-check`)."""
        return f"{self.prefix}:arq"

    def arq_own(self, arq_key: str) -> str:
        """One of arq's own keys (`arq:job:ID`, `arq:result:ID`, `arq:retry:ID`, `arq:in-progress:ID`,
        `arq:abort`), moved under the prefix (producer/bulk/arq_keys.py)."""
        return f"{self.prefix}:arq:{arq_key.removeprefix('arq:')}"

    def arq_step(self, job: str, step: int) -> str:
        return f"{self.prefix}:bulk:{job}:step:{step}"

    def tenants(self, model: str) -> str:
        """Hash tenant -> that tenant's unfinished requests for the model (the per-tenant cap)."""
        return f"{self.prefix}:tenants:{model}"

    def refusals(self, model: str) -> str:
        """Hash `LANE:REASON` -> submits the admission refused (reasons queue_full, lag_cap, tenant_cap): a few
        fields per model, read by the workers' metrics."""
        return f"{self.prefix}:refused:{model}"

    @staticmethod
    def tenant_scoped(tenant: str, name: str) -> str:
        """A request id or client id of a tenant-bound client (`INFERQ_TENANT`): `{tenant}:{name}`, so that one
        ACL pattern per tenant covers its results and reply channels (shared/roles.py)."""
        return f"{tenant}:{name}"

    def is_reply_channel(self, name: str) -> bool:
        """Whether `name` is a client's token channel under this prefix, `{p}:t:CLIENT` or a tenant-bound
        client's `{p}:t:TENANT:CLIENT`: the only places token events go."""
        head = f"{self.prefix}:t:"
        return name.startswith(head) and bool(_CHANNEL.fullmatch(name[len(head) :]))

    def reply_stream_job(self, name: str) -> str | None:
        """The job whose reply stream `name` is (`{p}:done:{job}`), or None if it is not one."""
        head = f"{self.prefix}:done:"
        job = name[len(head) :]
        return job if name.startswith(head) and _NAME.fullmatch(job) else None

    def is_reply_stream_of(self, name: str, request_id: str) -> bool:
        """Whether `name` is a bulk job's reply stream under this prefix that request `request_id` may write
        to: that job's own requests only (`bulk_request_id`), so no request can add a record to another job."""
        job = self.reply_stream_job(name)
        return job is not None and request_id.startswith(f"bulk-{job}-")

    def queues_pattern(self) -> str:
        return f"{self.prefix}:q:*"

    def parse_queue(self, key: str) -> tuple[str, str] | None:
        """(model, lane) of a lane stream's key, or None if it is not one of ours."""
        head = f"{self.prefix}:q:"
        if not key.startswith(head):
            return None
        model, _, lane = key[len(head) :].rpartition(":")
        return (model, lane) if model and lane in LANES else None
