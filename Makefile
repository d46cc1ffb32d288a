# Every target sets up what it needs, so each works on a fresh Debian machine
# with Python 3.11 (as root: setup installs etcd-server when it is missing).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SETUP_STAMP := $(VENV)/.setup-done
BUILD_STAMP := $(VENV)/.build-done
NATIVE_SOURCES := $(wildcard _native/*.pyx _native/*.pxd _native/*.h) setup.py
NPROC ?= auto

.PHONY: setup build run test bench binary clean

setup: $(BUILD_STAMP)

$(SETUP_STAMP): requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-dev.txt torch==2.13.0
	command -v etcd >/dev/null || ./.ci/install-etcd
	touch $@

# Editable install: the compiled modules land in launcher/_native/.
$(BUILD_STAMP): $(SETUP_STAMP) $(NATIVE_SOURCES)
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD_STAMP)

run: $(BUILD_STAMP)
	$(BIN)/python -m launcher --standalone --nproc-per-node=$(NPROC) examples/train.py

test: $(BUILD_STAMP)
	$(BIN)/python -m pytest -q

bench: $(BUILD_STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build dist *.egg-info launcher/_native/*.so _native/*.cpp bench/results.json
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
