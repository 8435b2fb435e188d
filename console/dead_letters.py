"""`inferq dlq` at the terminal: dead letters listed, shown, retried and purged."""

from __future__ import annotations

import json
import sys

from inferq.producer.client import InferenceClient
from inferq.shared.settings import Settings


async def list_letters(settings: Settings, *, count: int, as_json: bool) -> None:
    """One line per dead letter, oldest first: id, request id, deliveries, reason (or one JSON object each)."""
    async with InferenceClient(settings) as client:
        letters = await client.dead_letters().list(count=count)
    for letter in letters:
        row = letter.summary()
        if as_json:
            print(json.dumps(row))
        else:
            print(f"{row['id']}  {row['request_id'] or '-'}  deliveries={row['deliveries']}  {row['error']}")
    if not letters and not as_json:
        print(f"no dead letters for model {settings.model!r}", file=sys.stderr)


async def show_letter(settings: Settings, dead_letter_id: str) -> None:
    """One dead letter as JSON, with its original request (or, for poison, the raw payload's size)."""
    async with InferenceClient(settings) as client:
        letter = await client.dead_letters().show(dead_letter_id)
    request = letter.request.payload() if letter.request else None
    print(json.dumps({**letter.summary(), "request": request}, indent=2))


async def retry_letters(settings: Settings, dead_letter_ids: list[str]) -> None:
    async with InferenceClient(settings) as client:
        letters = client.dead_letters()
        for letter_id in dead_letter_ids:
            print(f"re-enqueued {await letters.retry(letter_id)}")


async def purge_letters(settings: Settings) -> None:
    async with InferenceClient(settings) as client:
        dropped = await client.dead_letters().purge()
    print(f"purged {dropped} dead letters of model {settings.model!r}")
