# The two set-up commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
APT_PACKAGES := dcmtk dicom3tools

.PHONY: run test lint system-deps benchmark clean

# torch and torchvision pinned to the builds this project is tested with (on this machine
# pip takes them from disk; an unpinned torch would download gigabytes).
TORCH := torch==2.14.1 torchvision==0.29.1

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

## Install and run the node on its embedded defaults (AE DICOMNODE, port 11112).
run: $(VENV)/.installed
	$(BIN)/dicom-node serve

## The real DICOM peers the tests talk to; installed when missing and we may.
system-deps:
	@if [ ! -x /usr/bin/storescu ] || [ ! -x /usr/bin/dciodvfy ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_PACKAGES); \
		else \
			echo "please install: sudo apt-get install $(APT_PACKAGES)"; exit 1; \
		fi; \
	fi

## Install dev dependencies and run the whole test suite.
test: system-deps $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

benchmark: system-deps $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks.ingest

clean:
	rm -rf $(VENV) dicom-node-data .pytest_cache
