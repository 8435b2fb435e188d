"""Every Redis key and channel name inferq uses. Nothing else formats a key (docs/CONTRACTS.md, "Keys").

Keys that a script touches together end in the same hash tag, `:{TAG}`, so that each script touches one slot
and runs on Redis Cluster. The tag is a shard's (`shard_tag`): a model's lanes are split into `shards` shard
streams (INFERQ_SHARDS, 1 by default), and a request lives, with its result, in the shard its id names
(`Keys.shard_of`); a bulk job's requests, record and reply stream in the shard its job id names. Keys no script
shares with a request (the bulk-job index, files, batches, heartbeats) carry no tag.
"""

from __future__ import annotations

import functools
import itertools
import re
import zlib
from dataclasses import dataclass
from typing import Protocol

from redis.crc import key_slot

from inferq.shared.codec import text

GROUP = "workers"
LANES: tuple[str, ...] = ("high", "normal", "low")  # priority order: a worker fills free slots from the left
# A model's name is part of its queues' key names: no ':' (it would read as another lane), no space, no glob.
MODEL_NAME = r"^[A-Za-z0-9._/@+\-]+$"
MODEL_NAME_MAX = 200
# A client id (the end of its reply channel's name) or a bulk job id (the end of its reply stream's name).
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
TENANT_NAME = _NAME.pattern  # a tenant a client can be bound to (INFERQ_TENANT): no ':' (it ends the scope)
_CHANNEL = re.compile(rf"(?:{_NAME.pattern}:)?{_NAME.pattern}")
_BULK_ID = re.compile(rf"bulk-({_NAME.pattern})-([0-9]+)-([A-Za-z0-9_]+)")
_TAGGED = re.compile(r"(.*):\{([0-9.]+)\}")
SLOTS = 16384  # Redis Cluster's hash slots
MAX_SHARDS = 1024


def group_counts(groups: object, length: int | None = None) -> tuple[int, int | None] | None:
    """(pending, lag) of the workers' group from one lane stream's XINFO GROUPS; None if it has no such group.
    Redis cannot tell the lag after an entry the group never read was deleted: then it is the stream's
    `length` less the pending entries, or None without a length."""
    for group in groups if isinstance(groups, list) else []:
        if text(group["name"]) == GROUP:
            pending, lag = int(group["pending"]), group.get("lag")
            if lag is None:
                return pending, None if length is None else max(length - pending, 0)
            return pending, int(lag)
    return None


def bulk_request_id(job: str, epoch: int, line_digest: str) -> str:
    """The id of a bulk job's request: a reply stream `{p}:done:{job}` takes only ids that start `bulk-{job}-`."""
    return f"bulk-{job}-{epoch}-{line_digest}"


def bulk_job_of(request_id: str) -> str | None:
    """The job whose request `request_id` is (`bulk_request_id`'s form), or None."""
    match = _BULK_ID.fullmatch(request_id)
    return match.group(1) if match else None


@functools.cache
def shard_tag(shard: int, shards: int) -> str:
    """The hash tag of shard `shard` of `shards`: a short name whose slot lies in the shard's even share of
    the 16384 slots. A cluster whose slots are split evenly over its masters (as `redis-cli --cluster create`
    and `valkey-cli` split them) then holds the shards on its masters in turn."""
    low, high = shard * SLOTS // shards, (shard + 1) * SLOTS // shards
    for j in itertools.count():
        name = str(shard) if j == 0 else f"{shard}.{j}"
        if low <= key_slot(name.encode()) < high:
            return name
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Keys:
    prefix: str = "inferq"
    shards: int = 1  # INFERQ_SHARDS: the same on every producer and worker of a deployment

    def __post_init__(self) -> None:
        if not 1 <= self.shards <= MAX_SHARDS:
            raise ValueError(f"shards={self.shards} must be between 1 and {MAX_SHARDS}")

    # ---- shards --------------------------------------------------------------------------------------
    def _tag(self, shard: int) -> str:
        return "{" + shard_tag(shard, self.shards) + "}"

    def _of_name(self, name: str) -> int:
        return zlib.crc32(name.encode()) % self.shards

    def shard_of(self, request_id: str) -> int:
        """The shard a request lives in: its bulk job's (so a job's reply stream and results share a slot), or
        its id's own."""
        if self.shards == 1:
            return 0
        job = bulk_job_of(request_id)
        return self._of_name(job) if job is not None else self._of_name(request_id)

    def job_shard(self, job: str) -> int:
        return self._of_name(job)

    def shard_of_key(self, key: str) -> int | None:
        """The shard whose tag `key` ends in, or None (untagged, or another shard count's tag)."""
        match = _TAGGED.fullmatch(key)
        if match is None:
            return None
        shard = int(match.group(2).partition(".")[0])
        return shard if shard < self.shards and shard_tag(shard, self.shards) == match.group(2) else None

    # ---- queues and results ------------------------------------------------------------------------
    def queue(self, model: str, lane: str = "normal", shard: int = 0) -> str:
        if lane not in LANES:
            raise ValueError(f"unknown lane {lane!r}; use one of {', '.join(LANES)}")
        return f"{self.prefix}:q:{model}:{lane}:{self._tag(shard)}"

    def queues(self, model: str, shard: int = 0) -> list[str]:
        """One shard's lane streams of the model, highest priority first."""
        return [self.queue(model, lane, shard) for lane in LANES]

    def all_queues(self, model: str) -> list[list[str]]:
        """Every shard's lane streams of the model, by shard."""
        return [self.queues(model, shard) for shard in range(self.shards)]

    def result(self, request_id: str) -> str:
        return f"{self.prefix}:r:{request_id}:{self._tag(self.shard_of(request_id))}"

    def results_pattern(self, scope: str) -> str:
        """A glob of the result keys whose request ids start `scope` (a tenant's `TENANT:`)."""
        return f"{self.prefix}:r:{scope}*"

    def tokens(self, client_id: str) -> str:
        return f"{self.prefix}:t:{client_id}"

    def dlq(self, model: str, shard: int = 0) -> str:
        return f"{self.prefix}:dlq:{model}:{self._tag(shard)}"

    def dlq_dropped(self, model: str, shard: int = 0) -> str:
        """String counter: dead letters dropped from the shard's DLQ, the oldest first, past its bound."""
        return f"{self.prefix}:dlq:{model}:dropped:{self._tag(shard)}"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:w:{name}"

    def workers_pattern(self) -> str:
        return f"{self.prefix}:w:*"

    def workers_index(self) -> str:
        """Sorted set worker -> when its heartbeat key expires: who is alive, found without a SCAN over every key
        (`inferq status` stays fast with a million results stored)."""
        return f"{self.prefix}:workers"

    def models_index(self) -> str:
        """Sorted set model -> when a request for it was last admitted or one of its workers last beat."""
        return f"{self.prefix}:models"

    def cancel(self) -> str:
        return f"{self.prefix}:cancel"

    def done(self, job: str) -> str:
        """Stream: a bulk job's reply stream (one record per line), in the job's shard."""
        return f"{self.prefix}:done:{job}:{self._tag(self.job_shard(job))}"

    def bulk(self, job: str) -> str:
        """Hash: one bulk job's record (state, counts, where its feed and tally stand)."""
        return f"{self.prefix}:bulk:{job}:{self._tag(self.job_shard(job))}"

    def bulk_ids(self, job: str) -> str:
        """Hash custom_id digest -> first line number: duplicate detection without holding ids in memory. While
        the line is queued, also its run and entry ('<line> <epoch> <entry id> <lane stream>': bulk_line)."""
        return f"{self.prefix}:bulk:{job}:ids:{self._tag(self.job_shard(job))}"

    def bulk_line(self, request_id: str) -> tuple[str, str] | None:
        """Where a bulk line's queued state is kept, for a request id of `bulk_request_id`'s form: its job's id
        hash, and the line's reference there for the scripts, '<custom_id digest> <epoch>' (its field, and the
        run of the job it is of). None for any other id. A line the runner admits has no result hash until a
        worker starts it (docs/CONTRACTS.md, "Bulk jobs")."""
        match = _BULK_ID.fullmatch(request_id)
        return None if match is None else (self.bulk_ids(match.group(1)), f"{match.group(3)} {match.group(2)}")

    def bulk_input(self, job: str) -> str:
        """Hash chunk number -> input lines: a detached job's staged input, readable by any runner."""
        return f"{self.prefix}:bulk:{job}:input:{self._tag(self.job_shard(job))}"

    def bulk_lease(self, job: str) -> str:
        """String with a TTL: the runner that feeds and tallies the job now (one at a time)."""
        return f"{self.prefix}:bulk:{job}:lease:{self._tag(self.job_shard(job))}"

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

    def tenants(self, model: str, shard: int = 0) -> str:
        """Hash tenant -> that tenant's unfinished requests for the model in the shard (the per-tenant cap)."""
        return f"{self.prefix}:tenants:{model}:{self._tag(shard)}"

    def tenants_pattern(self) -> str:
        return f"{self.prefix}:tenants:*"

    def refusals_pattern(self) -> str:
        return f"{self.prefix}:refused:*"

    def refusals(self, model: str, shard: int = 0) -> str:
        """Hash `LANE:REASON` -> submits the admission refused in the shard (reasons queue_full, lag_cap,
        tenant_cap): a few fields per model, read by the workers' metrics."""
        return f"{self.prefix}:refused:{model}:{self._tag(shard)}"

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
        """The job whose reply stream `name` is (`done(job)`), or None if it is not one."""
        head = f"{self.prefix}:done:"
        job = name[len(head) :].rpartition(":")[0]
        return job if name.startswith(head) and _NAME.fullmatch(job) and name == self.done(job) else None

    def job_reply_stream(self, request_id: str) -> str | None:
        """The reply stream of the job whose request `request_id` is (`bulk_request_id`'s form), or None: where a
        bulk line's record goes when its queue entry names none (the runner's leave it out: ~50 bytes a line)."""
        job = bulk_job_of(request_id)
        return None if job is None else self.done(job)

    def is_reply_stream_of(self, name: str, request_id: str) -> bool:
        """Whether `name` is a bulk job's reply stream under this prefix that request `request_id` may write
        to: that job's own requests only (`bulk_request_id`), so no request can add a record to another job
        (and the request's result and the stream share the job's slot)."""
        job = self.reply_stream_job(name)
        return job is not None and bulk_job_of(request_id) == job

    def queues_pattern(self) -> str:
        return f"{self.prefix}:q:*"

    @classmethod
    def of(cls, settings: _HasKeys) -> Keys:
        return cls(settings.key_prefix, settings.shards)


class _HasKeys(Protocol):
    key_prefix: str
    shards: int
