# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both create the virtual environment and install the project (pinned torch/torchvision) first;
# re-running them skips whatever is already set up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint

setup: $(STAMP)

$(STAMP): pyproject.toml featinv-codecs/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -e ./featinv-codecs -e '.[test]'
	# Byte-compiled on every core (pip's own pass is serial: 1.7 min of the setup here), but not
	# the packages' own test suites (a sixth of the files, never imported); as pip does, a file
	# that does not compile for this Python (newer-syntax test helpers) is skipped.
	$(BIN)/python -m compileall -q -j 0 -x '/tests?/' $(VENV)/lib >/dev/null || true
	touch $(STAMP)

demo: setup
	$(BIN)/snakemake all --cores 2

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two workers: much of the suite waits on subprocesses, servers and a SLURM scheduler; the
# slowest tests are listed at the end, to keep the whole run under 20 minutes (the slowest
# groups start first: tests/conftest.py).
test: lint
	$(BIN)/pytest -n 2 --dist loadgroup --no-loadscope-reorder --durations=25
