# The two commands: `make demo` and `make test`. Each sets up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: a CPU build; the project itself only asks torch>=2.4
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# the native kernels, built now where a C compiler exists (else on first use, or the PyTorch path)
	$(BIN)/python -m cuda_ext
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	bash scripts/demo.sh

lint: $(STAMP)
	$(BIN)/ruff check engine moeinf_cli cuda_ext tests benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info
