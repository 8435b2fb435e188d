"""The worker's side of vLLM's front end (worker/vllm_engine.py): how it tokenizes prompts and caches vLLM's
settings. On the tiny model's real tokenizer, loaded the way AsyncLLM loads it."""

from __future__ import annotations

from typing import Any

import pytest

from inferq.worker.vllm_engine import fast_encode
from inferq.worker.vllm_private import envs_cache
from tests.conftest import MODELS_DIR

PROMPTS = [
    "The queue holds requests",
    "",
    " leading space",
    "trailing space ",
    "two  spaces, ünïcode ✓, 日本語 and an emoji 🙂",
    "\n\nnewlines\tand tabs\n",
    "<s> looks special </s> <|im_start|>user\nhi<|im_end|>",
    "word " * 300,
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from vllm.tokenizers import get_tokenizer
    from vllm.tokenizers.hf import maybe_make_thread_pool

    from inferq.worker.models import prepare_model

    return maybe_make_thread_pool(get_tokenizer(str(prepare_model("tiny", MODELS_DIR))))


def test_prompts_skip_the_transformers_wrapper_and_get_the_same_ids(tokenizer: Any) -> None:
    encode = fast_encode(tokenizer)
    assert encode.encode.__name__ == "direct" and encode.off_loop is not None  # the Rust tokenizer itself
    for prompt in PROMPTS:
        for special in (True, False):
            assert encode(prompt, special) == tokenizer.encode(prompt, add_special_tokens=special)
            assert encode.off_loop(prompt, special) == encode(prompt, special)
    assert len(encode("word " * 300, True)) >= 300


class Prefixed:
    """A tokenizer whose Python wrapper adds an id the Rust tokenizer under it does not."""

    def __init__(self, inner: Any) -> None:
        self.backend_tokenizer = inner.backend_tokenizer
        self.inner = inner

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [7, *self.inner.encode(text, add_special_tokens=add_special_tokens)]


def test_a_wrapper_that_changes_the_ids_keeps_its_own_encode(tokenizer: Any) -> None:
    encode = fast_encode(Prefixed(tokenizer))
    assert encode.encode.__name__ == "wrapped" and encode.off_loop is None
    assert encode("The queue", True) == [7, *tokenizer.encode("The queue")]

    class NoBackend:
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return [len(text), int(add_special_tokens)]

    assert fast_encode(NoBackend())("abc", False) == [3, 0]


def test_vllm_settings_are_cached_while_an_engine_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm import envs

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    envs_cache(True)
    try:
        monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "5")
        assert envs.VLLM_CPU_KVCACHE_SPACE == 3  # read once, at start
    finally:
        envs_cache(False)
    assert envs.VLLM_CPU_KVCACHE_SPACE == 5  # after stop, from the environment again
