"""vLLM's v1 AsyncLLM behind the worker's Engine interface (continuous batching, DELTA outputs, abort)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from inferq.shared.errors import ConfigError, EngineError
from inferq.shared.schemas import GenerationRequest
from inferq.shared.settings import Settings
from inferq.worker import vllm_children, vllm_private, vllm_spin
from inferq.worker.cpu_share import yield_to_neighbours
from inferq.worker.engine import Delta, RequestRejected
from inferq.worker.engine_profile import EngineSetup, engine_setup
from inferq.worker.flow import EngineLoad
from inferq.worker.vllm_load import LoadState, stat_loggers

log = logging.getLogger("inferq.engine")
_SHUTDOWN_GRACE_S = 0.0
# A request nobody streams (bulk) needs no token events, only its end; yet a cancelled or expired one is stored
# with its partial text, so the engine still reports now and then: every 64 tokens, not every step.
_UNSTREAMED_INTERVAL = 64

# Compared at start, both ways: plain text, unicode, spaces, newlines, markup that looks like special tokens.
_PROBES = ("Hello, world!", "  two  spaces ünïcode ✓ 日本語\n\nnewlines\t", "<s> </s> <|im_start|>user<|im_end|>", "")
# A prompt longer than this is tokenized off the event loop (1 MiB is ~0.8 s of tokenizing on a CPU): the loop
# keeps renewing claims, streaming tokens and reading. Shorter ones stay inline, where a thread hop would cost
# more than the tokenizing.
_INLINE_CHARS = 16_384


@dataclass(frozen=True)
class Encoder:
    """(text, add_special_tokens) -> token ids, on the event loop. `off_loop`: the same ids through the Rust
    tokenizer's batch encode, which lets go of the GIL while it works (its plain encode holds it: a thread
    would not free the loop), for a long prompt in another thread; None where only the transformers wrapper
    gives the right ids (it also writes to the tokenizer, so it never runs beside vLLM's detokenizer)."""

    encode: Callable[[str, bool], list[int]]
    off_loop: Callable[[str, bool], list[int]] | None = None

    def __call__(self, text: str, special: bool) -> list[int]:
        return self.encode(text, special)


def fast_encode(tokenizer: Any) -> Encoder:
    """The tokenizer's encode without the transformers wrapper around it, where that gives the same ids.

    A HF fast tokenizer's `encode` resets truncation and padding on its Rust tokenizer and builds a
    BatchEncoding around the ids, half of its time on a short prompt (150 against 75 us for 20 words, and
    12% of a busy worker's samples). vLLM's own detokenizer reads that Rust tokenizer directly too. A tokenizer
    without one, or one whose wrapper changes the ids (checked on a few probes here), keeps its own encode."""

    def wrapped(text: str, special: bool) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=special))

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not callable(getattr(backend, "encode", None)):
        return Encoder(wrapped)

    def direct(text: str, special: bool) -> list[int]:
        return backend.encode(text, add_special_tokens=special).ids  # type: ignore[no-any-return]

    def batched(text: str, special: bool) -> list[int]:
        return backend.encode_batch([text], add_special_tokens=special)[0].ids  # type: ignore[no-any-return]

    try:
        same = all(direct(p, s) == wrapped(p, s) == batched(p, s) for p in _PROBES for s in (True, False))
    except Exception:  # an unusual tokenizer: its own encode is the reference
        same = False
    return Encoder(direct, batched) if same else Encoder(wrapped)


def check_engine_args(given: dict[str, Any]) -> None:
    """`given` (INFERQ_ENGINE_ARGS, --engine-arg), checked against vLLM's AsyncEngineArgs: a name it does not
    have is a ConfigError that names it, before anything loads."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(
            f"unknown vLLM engine argument(s): {', '.join(unknown)}; the names are AsyncEngineArgs' fields, as in "
            "`vllm serve --help` with - as _ (https://docs.vllm.ai/en/latest/configuration/engine_args.html)"
        )


def _unstarted(text: str, special: bool) -> list[int]:
    raise EngineError("engine not started")


def _prompt_chars(request: GenerationRequest) -> int:
    return len(request.prompt or "") + sum(len(m.content) for m in request.messages or [])


class VllmEngine:
    """One AsyncLLM in this process (its engine core runs in a child process, started from the engine's thread)."""

    def __init__(self, model_path: str, settings: Settings, *, as_shipped: bool = False) -> None:
        """`as_shipped=True`: the profile's engine arguments, but vLLM's own busy-waiting and processes
        (engine_spin_ms and engine_model_in_core unused): the bench's direct ceiling."""
        self.name = "vllm"
        self.model_path = model_path
        self.settings = settings
        self.as_shipped = as_shipped
        self._llm: Any = None
        self._tokenizer: Any = None
        self._encode = Encoder(_unstarted)
        # The engine's thread: it builds the engine, then tokenizes long prompts, one at a time, in order.
        self._thread: ThreadPoolExecutor | None = None
        # A start given up (its caller cancelled it): the build, which cannot be stopped in its thread, shuts down
        # what it built. The lock orders that with the loop's side (stop, giving up).
        self._given_up = False
        self._lock = threading.Lock()
        self._load = LoadState()
        self.setup: EngineSetup | None = None  # how it was set up (worker/engine_profile.py), once started
        self._ipc_dir: str | None = None  # where vLLM binds this engine's sockets (vllm_children.own_ipc_dir)

    async def start(self) -> None:
        # vLLM is imported and builds its engine (spawns the core, loads the model: minutes for a large one) in
        # this engine's own thread, so the event loop stays free meanwhile: the probe answers /health and a
        # "loading" /ready, and SIGTERM is heard. The thread lives as long as the engine, and must: the engine
        # processes die when the thread that started them ends (PR_SET_PDEATHSIG, worker/vllm_children.py).
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inferq-engine")
        self._ipc_dir = vllm_children.own_ipc_dir()
        before = vllm_children.child_pids()
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._build)
        except asyncio.CancelledError:
            # Given up (a signal while it loads): the engine processes started so far are killed, so the build
            # fails soon; one still waiting for its handshake would otherwise wait minutes for a parent gone.
            with self._lock:
                self._given_up = True
                vllm_children.kill_started(before)
                self._shut_down()
            raise
        self._tokenizer = self._llm.get_tokenizer()
        self._encode = fast_encode(self._tokenizer)
        if self.setup is not None and self.setup.cache_envs:
            vllm_private.envs_cache(True)

    def _build(self) -> None:
        """The AsyncLLM the settings ask for, built in the engine's thread. (AsyncLLM starts its output handler
        on the event loop, at the first request.) Stored here, not returned: a frame of this thread outlives
        the call (a library keeps a traceback of an import made here), and a reference there would keep the
        AsyncLLM alive past stop(), to be collected at interpreter exit, when its finalizer fails."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        check_engine_args(self.settings.engine_args)  # a name vLLM does not have: one line that names it
        on_cpu = current_platform.is_cpu()
        self.setup = setup = engine_setup(
            self.settings, self.model_path, on_cpu=on_cpu, tested=vllm_private.tested,
            serves_metrics=self.settings.metrics_port is not None, as_shipped=self.as_shipped,
        )  # fmt: skip
        log.info("engine profile %s (INFERQ_ENGINE_PROFILE=%s)", setup.profile, self.settings.engine_profile)
        yield_to_neighbours(setup.nice)  # before vLLM starts its busy-polling processes
        # From here vLLM loads its plugins (as it reads the arguments), in this process and in each it spawns.
        ipc = vllm_children.handed_down("VLLM_RPC_BASE_PATH", self._ipc_dir)  # read as the engine is built
        with vllm_spin.spin_for_children(setup.spin_s), vllm_children.die_with_this_process(), ipc:
            args = AsyncEngineArgs(**setup.args)
            try:
                config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
            except (TypeError, ValueError) as exc:  # what a value given in INFERQ_ENGINE_ARGS makes of it
                raise ConfigError(f"vLLM refused the engine arguments: {exc}") from None
            quiet = [vllm_private.quiet_prometheus()] if setup.quiet_vllm_metrics else []
            in_core = vllm_private.model_in_core(config) if setup.model_in_core else contextlib.nullcontext()
            with in_core:
                if self._given_up:
                    return
                self._llm = AsyncLLM.from_vllm_config(
                    config, stat_loggers=stat_loggers(self._load, *quiet), disable_log_stats=args.disable_log_stats
                )
        with self._lock:
            if self._given_up:  # while it loaded: nobody will use it
                self._shut_down()

    def _shut_down(self) -> None:
        if self._llm is not None:
            # The worker stops the engine only once nothing runs in it (drained, or abandoned to others), so
            # there is nothing to wait for: stop the core at once, as `vllm run-batch` does (timeout 0). vLLM's
            # default waits 5 s for an engine core that rarely exits by itself, then kills it anyway.
            self._llm.shutdown(timeout=_SHUTDOWN_GRACE_S)
            self._llm = None
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
            self._ipc_dir = None

    def load(self) -> EngineLoad | None:
        return self._load.snapshot()

    async def stop(self) -> None:
        with self._lock:
            self._shut_down()
        if self._thread is not None:  # only now: its end would kill the engine processes it started
            self._thread.shutdown(wait=False, cancel_futures=True)
            self._thread = None
            if self.setup is not None and self.setup.cache_envs:
                vllm_private.envs_cache(False)

    def prompt_token_ids(
        self, request: GenerationRequest, encode: Callable[[str, bool], list[int]] | None = None
    ) -> list[int]:
        """Tokenize here so the context check can say exactly what is too long; chat uses the model's template."""
        encode = encode or self._encode
        tok = self._tokenizer
        if request.messages is not None:
            if not getattr(tok, "chat_template", None):
                raise RequestRejected(f"model {request.model!r} has no chat template; send a plain prompt instead")
            msgs = [m.model_dump() for m in request.messages]
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ids = encode(text, False)
        else:
            ids = encode(request.prompt, True)
        limit = self.settings.max_model_len
        if len(ids) + request.max_tokens > limit:
            raise RequestRejected(
                f"prompt of {len(ids)} tokens plus max_tokens={request.max_tokens} exceeds the model's "
                f"context of {limit} tokens; shorten the prompt or lower max_tokens"
            )
        return ids

    async def _prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        off_loop = self._encode.off_loop
        if _prompt_chars(request) <= _INLINE_CHARS or off_loop is None or self._thread is None:
            return self.prompt_token_ids(request)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self.prompt_token_ids, request, off_loop)

    def _sampling_params(self, request: GenerationRequest) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        return SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k or 0,
            stop=request.stop or None,
            seed=request.seed,
            ignore_eos=bool(request.ignore_eos),
            output_kind=RequestOutputKind.DELTA,
            # vLLM's own batching of a stream (the first and the last output always at once): each output costs
            # a wake-up of this request's task, of Redis and of the client, so fewer outputs leave the CPU to the
            # model (BENCHMARKS.md, "Tokens per event"). Per request, so the engine default stays 1.
            stream_interval=self._stream_interval(request),
        )

    def _stream_interval(self, request: GenerationRequest) -> int:
        interval = request.stream_interval or self.settings.stream_interval
        return interval if request.publishes else max(interval, _UNSTREAMED_INTERVAL)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        if self._llm is None:
            raise EngineError("engine not started")
        ids = await self._prompt_token_ids(request)
        try:
            # AsyncLLM aborts the request itself when this generator is cancelled or closed.
            async for out in self._llm.generate(
                {"prompt_token_ids": ids}, self._sampling_params(request), request_id=request.id
            ):
                completion = out.outputs[0]
                yield Delta(
                    text=completion.text,
                    token_ids=list(completion.token_ids),
                    finished=out.finished,
                    finish_reason=completion.finish_reason if out.finished else None,
                    prompt_tokens=len(ids),
                )
        except EngineDeadError as exc:
            raise EngineError(f"vLLM engine died: {exc}") from exc
        except VLLMClientError as exc:
            raise RequestRejected(str(exc)) from exc
        except Exception as exc:
            if self._llm is not None and self._llm.errored:
                raise EngineError(f"vLLM engine failed: {exc!r}") from exc
            if isinstance(exc, EngineGenerateError):  # this request only; its message is empty, the cause is not
                cause = exc.__cause__ or exc
                raise RequestRejected(f"vLLM could not run it: {cause.__class__.__name__}: {cause}") from exc
            raise
