# Every target sets up what it needs, so each works on a fresh Debian machine
# with Python 3.11 (as root: setup installs etcd-server, Slurm, munge and openssh-server when they are missing).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SETUP_STAMP := $(VENV)/.setup-done
BUILD_STAMP := $(VENV)/.build-done
# Every Cython and C source, the files the extensions include from subdirectories too.
NATIVE_SOURCES := $(shell find _native -name '*.pyx' -o -name '*.pxd' -o -name '*.h') setup.py
NPROC ?= auto
# The single binary: PyInstaller's onefile bootloader and archive (packaging/launcher.spec).
BINARY := dist/launcher
BINARY_SOURCES := packaging/launcher.spec packaging/entry.py $(wildcard launcher/*.py launcher/*/*.py)

.PHONY: setup build run test lint bench binary clean

setup: $(BUILD_STAMP)

$(SETUP_STAMP): requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-dev.txt torch==2.13.0
	command -v etcd >/dev/null || ./.ci/install-etcd
	./.ci/install-slurm
	test -x /usr/sbin/sshd || ./.ci/install-openssh-server
	touch $@

# Editable install: the compiled modules land in launcher/_native/. The checkout's path stays out of their
# debug info, so that the same sources build the same files (and the same single binary) in any checkout
# (setuptools adds CPPFLAGS to the C and C++ flags; CFLAGS would replace them).
$(BUILD_STAMP): $(SETUP_STAMP) $(NATIVE_SOURCES)
	CPPFLAGS="-ffile-prefix-map=$(CURDIR)=." $(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD_STAMP)

# A fixed hash seed and PyInstaller's cache under build/ make the build depend on its inputs only.
$(BINARY): $(BUILD_STAMP) $(BINARY_SOURCES)
	PYTHONHASHSEED=0 PYINSTALLER_CONFIG_DIR=build/pyinstaller-config $(BIN)/pyinstaller --noconfirm \
		--log-level WARN --distpath dist --workpath build/pyinstaller packaging/launcher.spec

binary: $(BINARY)

# The workers need torch: they run on the virtualenv's Python, the launcher is the binary.
run: $(BINARY)
	$(BINARY) --standalone --nproc-per-node=$(NPROC) --python $(BIN)/python examples/train.py

# ruff for the Python, cython-lint (which runs pycodestyle from the virtualenv) for the Cython; pyproject.toml has both settings.
lint: $(SETUP_STAMP)
	$(BIN)/ruff check --quiet .
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/cython-lint _native

# Lint first: a lint error fails the tests as a failing test does.
test: lint $(BUILD_STAMP) $(BINARY)
	$(BIN)/python -m pytest -q

bench: $(BUILD_STAMP) $(BINARY)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build dist *.egg-info launcher/_native/*.so _native/*.cpp bench/results.json
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
