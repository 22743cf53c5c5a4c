# Two commands a fresh machine needs (see README):  make demo   and   make test
# Each creates .venv on first use. `make demo` installs what the demo needs: torch (CPU-only
# where it can) and the lightning and tensorboard extras. `make install` / `make test` install
# the pinned, tested stack (constraints/ci.txt) with every extra and the dev tools.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
TORCH_STAMP := $(VENV)/.torch-stamp
DEMO_STAMP  := $(VENV)/.demo-stamp
# pip arguments that install a CPU-only torch: PyTorch's CPU wheels are ~200 MB, PyPI's Linux
# torch brings several GB of CUDA libraries. Tried on machines without nvidia-smi; when they
# fail (no network to that index), torch comes from PyPI. Another source, e.g. a local wheel:
#   make demo TORCH_CPU="--find-links /path/to/wheels torch==2.13.0+cpu"
TORCH_CPU ?= --index-url https://download.pytorch.org/whl/cpu torch

.PHONY: install demo test lint docs bench clean

# torch first: a torch already in $(VENV) is kept
$(TORCH_STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "make: keeping the torch in $(VENV)"; \
	elif ! command -v nvidia-smi >/dev/null 2>&1 && \
		$(BIN)/python -m pip install --quiet --retries 1 --timeout 20 $(TORCH_CPU); then \
		:; \
	else \
		$(BIN)/python -m pip install --quiet -c constraints/ci.txt torch; \
	fi
	@$(BIN)/python -c "import torch; print('make: torch', torch.__version__, \
		'(CUDA build)' if torch.version.cuda else '(CPU-only build)')"
	touch $(TORCH_STAMP)

# the demo's stack, pinned as tested except torch (whichever build the step above chose)
$(DEMO_STAMP): $(TORCH_STAMP) pyproject.toml constraints/ci.txt
	grep -vE '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==' \
		constraints/ci.txt > $(VENV)/constraints-demo.txt
	$(BIN)/python -m pip install --quiet -c $(VENV)/constraints-demo.txt \
		-e ".[lightning,tensorboard]"
	touch $(DEMO_STAMP)

# the whole pinned stack (CI, make test): PyPI's pinned torch directly, no CPU-index attempt
$(STAMP): pyproject.toml constraints/ci.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints/ci.txt torch torchvision
	$(BIN)/python -m pip install --quiet -c constraints/ci.txt -e ".[all,dev]"
	touch $(TORCH_STAMP) $(STAMP) $(DEMO_STAMP)

install: $(STAMP)

demo: $(DEMO_STAMP)
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
