"""The deployment file is valid (checked with docker-compose where it is installed; no engine needed)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import ROOT


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_compose_file_is_accepted() -> None:
    out = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "appendonly" in out.stdout and "INFERQ_REDIS_URL: redis://redis:6379/0" in out.stdout
    assert "capabilities:\n            - gpu" in out.stdout or "- gpu" in out.stdout
