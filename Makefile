# Quick start: `make demo` and `make test` both work from a fresh clone (they set up .venv first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Without a GPU, install the CPU build of torch first so pip never pulls the multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
export OMP_WAIT_POLICY ?= PASSIVE
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test unit-test smoke-test demo bench lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: installing torch from the default index"; \
	else \
		echo "no GPU: installing the CPU build $(TORCH_CPU)"; \
		$(BIN)/python -m pip install -q "$(TORCH_CPU)"; \
	fi
	$(BIN)/python -m pip install -q -e ".[dev,tracking]"
	touch $@

# The unit tests and the smoke test run side by side: the smoke test's 19 commands mostly wait on
# imports (one core), the unit tests use the other; each one's output is printed whole when it ends.
test: install lint
	$(MAKE) --no-print-directory -j2 --output-sync=target unit-test smoke-test

unit-test: install
	$(BIN)/python -m pytest

smoke-test: install
	bash examples/smoke.sh

demo: install
	bash examples/demo.sh

bench: install
	$(BIN)/python bench/run.py

lint: install
	$(BIN)/ruff check align_cli tests examples bench
	$(BIN)/ruff format --check align_cli tests examples bench

format: install
	$(BIN)/ruff format align_cli tests examples bench

clean:
	rm -rf runs examples/models .align_cache bench/results.json
