# The two set-up commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
APT_PACKAGES := dcmtk dicom3tools orthanc orthanc-dicomweb chromium postgresql rabbitmq-server
# The real viewer the tests drive: OHIF's prebuilt app from its npm tarball (its own npm
# dependencies are not needed for the built dist) and playwright-core for Debian's Chromium.
OHIF_VERSION := 3.13.2
VIEWER := tests/viewer

.PHONY: run test test-fast lint system-deps viewer-tools benchmark clean

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

## The real DICOM peers the tests talk to, and the cluster mode's PostgreSQL (any major version:
## the glob) and RabbitMQ; installed when missing and we may.
system-deps:
	@if [ ! -x /usr/bin/storescu ] || [ ! -x /usr/bin/dciodvfy ] || [ ! -x /usr/sbin/Orthanc ] \
		|| [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || [ ! -x /usr/bin/chromium ] \
		|| ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || [ ! -x /usr/sbin/rabbitmq-server ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_PACKAGES); \
		else \
			echo "please install: sudo apt-get install $(APT_PACKAGES)"; exit 1; \
		fi; \
	fi

$(VIEWER)/node_modules/playwright-core/package.json: $(VIEWER)/package.json
	npm install --prefix $(VIEWER) --no-audit --no-fund --loglevel=error
	touch $@

$(VIEWER)/ohif/package/dist/index.html:
	mkdir -p $(VIEWER)/ohif
	cd $(VIEWER)/ohif && npm pack --loglevel=error @ohif/app@$(OHIF_VERSION) >/dev/null \
		&& tar xzf ohif-app-$(OHIF_VERSION).tgz && rm ohif-app-$(OHIF_VERSION).tgz
	touch $@

viewer-tools: $(VIEWER)/node_modules/playwright-core/package.json $(VIEWER)/ohif/package/dist/index.html

## Install dev dependencies and run the whole test suite: lint, types, the fast unit layer
## (it fails in about a minute), then everything else.
test: system-deps viewer-tools $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -m "unit and not slow"
	$(BIN)/python -m pytest -m "not (unit and not slow)" -n 2 --dist loadfile

## The unit layer alone (no node process, socket, external program or browser; no slow test):
## about a minute. Markers: pyproject.toml [tool.pytest.ini_options], tests/conftest.py.
test-fast: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m "unit and not slow"

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

benchmark: system-deps $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks.ingest

clean:
	rm -rf $(VENV) dicom-node-data .pytest_cache $(VIEWER)/node_modules $(VIEWER)/ohif test-artefacts
