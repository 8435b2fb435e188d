"""The shape of what installs: one namespace, `inferq`; a client that loads no engine; layers that do not
reach into each other (shared knows neither side, the producer never imports the worker or vLLM, nothing
in the product imports the benchmark harness)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

# The repository's folders and the packages they install as (pyproject.toml maps them).
FOLDERS = {
    "inferq": "inferq",
    "shared": "inferq.shared",
    "producer": "inferq.producer",
    "worker": "inferq.worker",
    "console": "inferq.console",
    "gateway": "inferq.gateway",
    "bench": "inferq.bench",
}
# What each layer may not import (prefixes of module names).
FORBIDDEN = {
    "shared": (
        "inferq.producer",
        "inferq.worker",
        "inferq.console",
        "inferq.gateway",
        "inferq.bench",
        "inferq.cli",
        "vllm",
        "torch",
    ),
    "producer": (
        "inferq.worker",
        "inferq.console",
        "inferq.gateway",
        "inferq.bench",
        "inferq.cli",
        "vllm",
        "torch",
        "typer",
        "rich",
    ),
    "worker": ("inferq.console", "inferq.bench", "inferq.cli", "inferq.gateway"),
    "console": ("inferq.bench",),
    # A client like any other: never the worker or an engine.
    "gateway": ("inferq.worker", "inferq.console", "inferq.bench", "inferq.cli", "vllm", "torch", "typer", "rich"),
}


def test_importing_the_client_loads_no_engine_and_no_terminal_library(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from inferq import InferenceClient, SyncInferenceClient, InferqError\n"
        "assert InferenceClient.__module__ == 'inferq.producer.client', InferenceClient.__module__\n"
        "print(sorted(m for m in ('vllm', 'torch', 'typer', 'rich', 'click') if m in sys.modules))\n"
    )
    # Outside the checkout, as a service that installed inferq would run it.
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_wheel_installs_only_the_inferq_namespace(tmp_path: Path) -> None:
    # Built from a copy of the checkout's files: setuptools builds inside the source tree, and an earlier
    # build's leftovers there would end up in the wheel.
    source = tmp_path / "src"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True
    )
    for name in listed.stdout.split():
        if (ROOT / name).is_symlink() or (ROOT / name).exists():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name, follow_symlinks=False)
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path)]
    subprocess.run([*pip, str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("inferq-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"inferq", wheel.name.split("-py3")[0] + ".dist-info"}
    # Every module, script and marker of every mapped folder is in it, under its namespaced name (a
    # sub-package left out of pyproject.toml's list would be missing here).
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".lua", ".typed") and "__pycache__" not in path.parts:
                inside = path.relative_to(ROOT / folder).as_posix()
                assert f"{package.replace('.', '/')}/{inside}" in names, f"{folder}/{inside} is not in the wheel"
    assert "inferq/cli.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "inferq = inferq.cli:app" in text
    assert "inferq.worker.vllm_spin:apply" in text


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layers_do_not_reach_into_each_other(folder: str) -> None:
    wrong = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for name in sorted(imports_of(path))
        if name.startswith(FORBIDDEN[folder])
    ]
    assert wrong == []


def test_no_benchmark_code_in_the_product_packages() -> None:
    product = [ROOT / "shared", ROOT / "producer", ROOT / "worker", ROOT / "console", ROOT / "gateway"]
    assert [p for folder in product for p in folder.rglob("*bench*")] == []


def test_nothing_imports_the_old_top_level_names() -> None:
    """Inside the checkout `import producer` would also resolve, to a second copy of the module: every import
    goes through the namespace."""
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    sources = [ROOT / name for name in listed.stdout.split()]
    old = ("shared", "producer", "worker", "cli", "console", "gateway", "bench")
    wrong = [f"{p.relative_to(ROOT)}: {n}" for p in sources for n in imports_of(p) if n.split(".")[0] in old]
    assert wrong == []
