"""worker/cpu_share.py: a worker that leads its own session lowers its session's scheduling group, and
nothing else does (a worker started from a terminal must not renice the user's shell)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_in_child(autogroup: Path, nice: int, *, own_session: bool) -> str:
    code = (
        "import pathlib, sys; from worker.cpu_share import yield_to_neighbours; "
        f"print(yield_to_neighbours({nice}, pathlib.Path(sys.argv[1])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(autogroup)],
        cwd=ROOT, capture_output=True, text=True, check=True, start_new_session=own_session,
    )  # fmt: skip
    return out.stdout.strip()


@pytest.mark.parametrize(("nice", "own_session", "applied"), [(5, True, True), (5, False, False), (0, True, False)])
def test_only_a_session_leader_sets_its_group_nice(tmp_path: Path, nice: int, own_session: bool, applied: bool) -> None:
    autogroup = tmp_path / "autogroup"
    autogroup.write_text("/autogroup-1 nice 0\n")
    assert run_in_child(autogroup, nice, own_session=own_session) == str(applied)
    assert autogroup.read_text() == (str(nice) if applied else "/autogroup-1 nice 0\n")


def test_no_autogroup_file_is_not_an_error(tmp_path: Path) -> None:
    assert run_in_child(tmp_path / "missing", 5, own_session=True) == "False"
