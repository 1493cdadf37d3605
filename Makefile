# The whole set-up on a fresh machine: `make demo`, then `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
# Reproducible set-up: exact versions live in constraints.txt, pyproject.toml keeps loose ranges.
INSTALL := $(PIP) install --quiet -c constraints.txt

.PHONY: demo test test-slow bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.base: $(BIN)/python pyproject.toml constraints.txt
	$(INSTALL) -e ".[subword,plot,lite,serve]"
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(INSTALL) -e ".[dev,subword,plot,lite,serve]"
	touch $@

demo: $(VENV)/.base
	$(BIN)/seqgen demo

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

test-slow: $(VENV)/.dev
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info
