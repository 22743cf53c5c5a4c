# Two commands a fresh machine needs (see README):  make demo   and   make test
# Each creates .venv and installs the pinned, tested stack (constraints/ci.txt) on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test lint docs bench clean

$(STAMP): pyproject.toml constraints/ci.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints/ci.txt torch torchvision
	$(BIN)/python -m pip install --quiet -c constraints/ci.txt -e ".[all,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/erf-monitor demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy

test: $(STAMP) lint
	MPLBACKEND=Agg WANDB_MODE=offline $(BIN)/python -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_probe.py

clean:
	rm -rf $(VENV) site build dist .pytest_cache .mypy_cache .ruff_cache
