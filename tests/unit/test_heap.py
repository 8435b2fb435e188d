"""A serving process's garbage collector once it has started (shared/heap.py), in a process of its own: the
settings are the whole interpreter's."""

from __future__ import annotations

import json
import subprocess
import sys

from inferq.shared.heap import YOUNG_THRESHOLD

_PROBE = """
import gc, json
from inferq.shared.heap import settle_heap
before = gc.get_threshold()
settle_heap("probe")
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": gc.get_freeze_count()}))
"""


def test_settling_freezes_what_starting_made_and_collects_the_young_generation_less_often() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(out.stdout)
    assert seen["before"] == [700, 10, 10]  # Python's defaults, which the serving processes leave
    assert seen["after"] == [YOUNG_THRESHOLD, 10, 10]  # the older generations keep their ratios
    assert seen["frozen"] > 1_000  # the interpreter's and inferq's modules, at least
