"""Every Redis key and channel name inferq uses. Nothing else formats a key (DESIGN.md, "Data plane")."""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "workers"
LANES: tuple[str, ...] = ("high", "normal", "low")  # priority order: a worker fills free slots from the left


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

    def worker(self, name: str) -> str:
        return f"{self.prefix}:w:{name}"

    def workers_pattern(self) -> str:
        return f"{self.prefix}:w:*"

    def cancel(self) -> str:
        return f"{self.prefix}:cancel"

    def done(self, job: str) -> str:
        return f"{self.prefix}:done:{job}"

    def tenants(self, model: str) -> str:
        """Hash tenant -> that tenant's unfinished requests for the model (the per-tenant cap)."""
        return f"{self.prefix}:tenants:{model}"

    def queues_pattern(self) -> str:
        return f"{self.prefix}:q:*"

    def parse_queue(self, key: str) -> tuple[str, str] | None:
        """(model, lane) of a lane stream's key, or None if it is not one of ours."""
        head = f"{self.prefix}:q:"
        if not key.startswith(head):
            return None
        model, _, lane = key[len(head) :].rpartition(":")
        return (model, lane) if model and lane in LANES else None
