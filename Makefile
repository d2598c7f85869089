# Quickstart: `make demo` runs the embedded demo study, `make test` runs the tests.
# Both create the virtual environment .venv on first use (torch, Ray, Optuna, ...: ~2 minutes).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-all setup clean-demo lint format docs

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

# The embedded demo: a complete weight-balancing study on long-tailed digits (a few minutes on a
# 2-core CPU). Running it again on a finished study just says where the results are.
demo: $(STAMP)
	$(BIN)/study run digits-lt
	$(BIN)/study table results/digits-lt --kind ablation

# The default suite: everything but the tests marked `slow` (pyproject.toml's addopts). It still runs
# real end-to-end studies and a seeded pair of driver kills with resume.
test: $(STAMP)
	$(BIN)/python -m pytest

# Only the slow tests: the driver stopped in every phase, and more seeded random kills.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# The default suite and the slow tests.
test-all: $(STAMP)
	$(BIN)/python -m pytest -m ""

clean-demo:
	rm -rf results/digits-lt

# Style: ruff's lint rules and its formatter (pyproject.toml's [tool.ruff]); `make format` applies both.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The generated parts of docs/ (the trials.csv and per_class.csv column lists, from study/layout.py).
docs: $(STAMP)
	$(BIN)/python docs/generate.py
