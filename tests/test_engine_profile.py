"""INFERQ_ENGINE_PROFILE: what each profile asks of vLLM (worker/engine_profile.py), the config vLLM makes of
it, and the version guard around vLLM's private names (worker/vllm_private.py).

That a running worker gets the set-up its profile names is checked on vLLM itself: `cpu-shared` (auto on this
CPU box) on the tiny worker of test_vllm.py (model in the engine core, busy-wait plugin, session nice), `vllm` in
test_vllm.py's profile test (vLLM's own model process, its metrics)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from inferq.shared.errors import ConfigError
from inferq.shared.settings import Settings, load_settings
from inferq.worker import vllm_private
from inferq.worker.engine_profile import engine_setup
from tests.conftest import MODELS_DIR


def setup_of(on_cpu: bool, tested: bool = True, metrics: bool = False, **settings: Any) -> Any:
    cfg = Settings(model="tiny", max_inflight=32, **settings)
    return engine_setup(cfg, "/models/tiny", on_cpu=on_cpu, tested=lambda: tested, serves_metrics=metrics)


def test_auto_is_cpu_shared_on_a_cpu_and_vllm_as_it_ships_elsewhere() -> None:
    cpu = setup_of(on_cpu=True)
    assert cpu.profile == "cpu-shared"
    assert cpu.args == {
        "model": "/models/tiny", "served_model_name": "tiny", "max_model_len": 2048, "max_num_seqs": 32,
        "dtype": "float32", "kv_cache_memory_bytes": 2 * 2**30, "enforce_eager": True, "disable_log_stats": True,
    }  # fmt: skip
    assert (cpu.spin_s, cpu.model_in_core, cpu.nice, cpu.cache_envs, cpu.quiet_vllm_metrics) == (
        0.002, True, 5, True, True,
    )  # fmt: skip
    gpu = setup_of(on_cpu=False)
    assert gpu.profile == "vllm"
    # Nothing of the CPU tuning: no eager mode (CUDA graphs and compile on), vLLM's stats, processes, busy-wait.
    assert gpu.args == {"model": "/models/tiny", "served_model_name": "tiny", "max_model_len": 2048, "max_num_seqs": 32}
    assert (gpu.spin_s, gpu.model_in_core, gpu.nice, gpu.cache_envs, gpu.quiet_vllm_metrics) == (
        None, False, 0, False, False,
    )  # fmt: skip


def test_each_profile_can_be_chosen_anywhere_and_engine_args_win() -> None:
    shipped = setup_of(on_cpu=True, engine_profile="vllm")
    assert "enforce_eager" not in shipped.args and shipped.args["dtype"] == "float32"  # the worker's CPU default
    assert (shipped.spin_s, shipped.model_in_core, shipped.nice) == (None, False, 0)
    shared = setup_of(on_cpu=False, engine_profile="cpu-shared", engine_args={"enforce_eager": False, "dtype": "half"})
    assert shared.args["enforce_eager"] is False and shared.args["dtype"] == "half"
    assert shared.spin_s == 0.002 and shared.nice == 5


def test_a_worker_that_serves_metrics_keeps_vllms_own() -> None:
    assert not setup_of(on_cpu=True, metrics=True).quiet_vllm_metrics
    assert setup_of(on_cpu=True, metrics=False).quiet_vllm_metrics


def test_on_an_untested_vllm_the_private_tuning_turns_itself_off() -> None:
    setup = setup_of(on_cpu=True, tested=False)
    assert setup.profile == "cpu-shared" and setup.args["enforce_eager"] is True  # public arguments stay
    private = (setup.spin_s, setup.model_in_core, setup.cache_envs, setup.quiet_vllm_metrics)
    assert private == (None, False, False, False)
    asked: list[bool] = []
    engine_setup(Settings(), "/m", on_cpu=False, tested=lambda: asked.append(True) or True, serves_metrics=False)
    assert asked == []  # the vllm profile never asks, so never warns


def test_the_version_guard_warns_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import vllm

    assert vllm.__version__.startswith(vllm_private.TESTED + ".")  # this machine's vLLM is the tested one
    vllm_private.tested.cache_clear()
    monkeypatch.setattr(vllm, "__version__", "0.99.1")
    try:
        with caplog.at_level(logging.WARNING, logger="inferq.engine"):
            assert not vllm_private.tested() and not vllm_private.tested()
        warnings = [r.getMessage() for r in caplog.records if "not the release" in r.getMessage()]
        assert len(warnings) == 1 and "vLLM 0.99.1" in warnings[0] and "runs as it ships" in warnings[0]
    finally:
        vllm_private.tested.cache_clear()
    monkeypatch.undo()
    assert vllm_private.tested()


def test_the_gpu_extra_pins_the_tested_release() -> None:
    import tomllib

    from tests.conftest import ROOT

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    major, minor = map(int, vllm_private.TESTED.split("."))
    assert f"vllm>={major}.{minor},<{major}.{minor + 1}" in extras["gpu"]


@pytest.mark.parametrize("profile", ["vllm", "cpu-shared"])
def test_vllm_makes_the_engine_config_each_profile_names(profile: str) -> None:
    from vllm.config import CompilationMode
    from vllm.engine.arg_utils import AsyncEngineArgs

    from inferq.worker.models import prepare_model

    path = str(prepare_model("tiny", MODELS_DIR))
    setup = engine_setup(
        Settings(model="tiny", engine_profile=profile, max_model_len=256), path, on_cpu=True,
        tested=vllm_private.tested, serves_metrics=False,
    )  # fmt: skip
    config = AsyncEngineArgs(**setup.args).create_engine_config()
    assert config.model_config.served_model_name == "tiny"
    assert config.scheduler_config.max_num_seqs == 256
    compiled = config.compilation_config.mode != CompilationMode.NONE
    expected = (True, False) if profile == "cpu-shared" else (False, True)
    assert (config.model_config.enforce_eager, compiled) == expected


def test_an_unknown_profile_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERQ_ENGINE_PROFILE", "gpu-turbo")
    with pytest.raises(ConfigError, match=r"INFERQ_ENGINE_PROFILE: Input should be 'auto', 'vllm' or 'cpu-shared'"):
        load_settings()
