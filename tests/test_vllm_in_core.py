"""INFERQ_ENGINE_MODEL_IN_CORE: how worker/vllm_private.py changes a real vLLM config for the engine core it spawns.

That a running worker's engine core then runs the model, with no model process, is checked on the tiny worker in
test_vllm.py; that it answers word for word as vLLM as it ships, on SmolLM2 in test_smollm2.py."""

from __future__ import annotations

import logging
import os
from typing import Any

import pytest

from inferq.worker.vllm_private import model_in_core
from tests.conftest import MODELS_DIR

OPENMP = ("OMP_NUM_THREADS", "OMP_PLACES", "OMP_PROC_BIND", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")


def tiny_config() -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    from inferq.worker.models import prepare_model

    args = AsyncEngineArgs(model=str(prepare_model("tiny", MODELS_DIR)), enforce_eager=True, max_model_len=256)
    return args.create_engine_config()


def test_the_core_runs_the_model_with_the_openmp_threads_of_a_model_process() -> None:
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    config = tiny_config()
    assert config.parallel_config.distributed_executor_backend == "mp"  # vLLM's choice on CPU
    model_process = OMPProcessManager(config)  # what vLLM gives its model process, rank 0
    before = {k: os.environ.get(k) for k in OPENMP}
    with model_in_core(config) as moved:
        assert moved
        assert config.parallel_config.distributed_executor_backend == "uni"
        threads = os.environ["OMP_NUM_THREADS"]
        if not model_process.skip_setup:
            assert threads == str(len(model_process.cpu_lists[0])), model_process.cpu_lists
    assert {k: os.environ.get(k) for k in OPENMP} == before  # nothing started later inherits it


def test_a_vllm_without_what_it_needs_runs_the_model_as_it_ships(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import vllm.utils.ompmultiprocessing as ompmultiprocessing

    monkeypatch.delattr(ompmultiprocessing, "OMPProcessManager")  # as in a vLLM that renamed it
    config = tiny_config()
    with caplog.at_level(logging.WARNING, logger="inferq.engine"), model_in_core(config) as moved:
        assert not moved
    assert config.parallel_config.distributed_executor_backend == "mp"
    assert "runs the model in a process of its own, as it ships" in caplog.text
