# Set-up and everyday commands. Every target creates .venv on first use, with the CPU build
# of torch pinned (the package itself only asks for torch>=2.4, so users keep their version).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[all,test]'
	touch $(STAMP)

.PHONY: setup train test test-fast
setup: $(STAMP)

## The main job: train the 1-D CNN on MNIST-1D in 4 pipeline stages with EMA reconstruction.
train: $(STAMP)
	$(BIN)/layerpipe train

## The test suite (slow and distributed tests included; 722 tests, about 8 minutes on 2 cores).
test: $(STAMP)
	$(BIN)/python -m pytest -q

## Only the fast unit tests.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not distributed"
