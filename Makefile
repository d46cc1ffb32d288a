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
# The single binary: our bootloader (packaging/bootloader.c) with PyInstaller's one-directory build of the
# launcher (packaging/launcher.spec) appended by packaging/bundle.py.
BINARY := dist/launcher
BOOTLOADER := build/bootloader
ONEDIR := build/onedir
BINARY_SOURCES := packaging/launcher.spec packaging/entry.py packaging/bundle.py $(wildcard launcher/*.py launcher/*/*.py)

.PHONY: setup build run test lint asan bench binary clean

setup: $(BUILD_STAMP)

$(SETUP_STAMP): requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-dev.txt torch==2.13.0
	test -f /usr/include/zlib.h || ./.ci/install-zlib-dev
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

# The bootloader needs nothing but the C library where it runs: zlib is linked in.
$(BOOTLOADER): packaging/bootloader.c
	mkdir -p $(@D)
	$(CC) -O2 -Wall -Wextra -Werror -o $@ $< -Wl,-Bstatic -lz -Wl,-Bdynamic

# A fixed hash seed and PyInstaller's cache under build/ make the build depend on its inputs only.
$(BINARY): $(BUILD_STAMP) $(BOOTLOADER) $(BINARY_SOURCES)
	PYTHONHASHSEED=0 PYINSTALLER_CONFIG_DIR=build/pyinstaller-config $(BIN)/pyinstaller --noconfirm \
		--log-level WARN --distpath $(ONEDIR) --workpath build/pyinstaller packaging/launcher.spec
	mkdir -p $(@D)
	$(BIN)/python packaging/bundle.py $(BOOTLOADER) $(ONEDIR)/launcher $@

binary: $(BINARY)

# The workers need torch: they run on the virtualenv's Python, the launcher is the binary.
run: $(BINARY)
	$(BINARY) --standalone --nproc-per-node=$(NPROC) --python $(BIN)/python examples/train.py

# ruff for the Python, cython-lint (which runs pycodestyle from the virtualenv) for the Cython; pyproject.toml has both settings.
lint: $(SETUP_STAMP)
	$(BIN)/ruff check --quiet .
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/cython-lint _native

# AddressSanitizer: both extensions built with -fsanitize=address into build/asan (launcher/_native/ keeps
# the normal build), and the tests that drive them directly run against that build in every process of
# the run: tests/asan/sitecustomize.py loads the extensions from LAUNCHER_NATIVE_BUILD. The runtime is
# preloaded, with libstdc++ (ASan's __cxa_throw interceptor needs it there from the start). No leak
# checking: what the interpreter keeps until exit would drown the rest. The workers the supervisor tests
# crash on purpose must die by their signal, as they do without ASan. Each process reports to
# build/asan/report.<pid>; any report fails the target, whatever the test that started the process saw.
ASAN_BUILD := build/asan
ASAN_STAMP := $(ASAN_BUILD)/.build-done
ASAN_TESTS := $(wildcard tests/test_store*.py tests/test_supervisor*.py)
ASAN_PRELOAD = $(shell gcc -print-file-name=libasan.so) $(shell gcc -print-file-name=libstdc++.so)

$(ASAN_STAMP): $(BUILD_STAMP)
	CPPFLAGS="-ffile-prefix-map=$(CURDIR)=. -fsanitize=address -fno-omit-frame-pointer" LDFLAGS="-fsanitize=address" \
		$(BIN)/python setup.py -q build_ext --build-lib $(ASAN_BUILD) --build-temp $(ASAN_BUILD)/temp
	touch $@

asan: $(ASAN_STAMP)
	rm -f $(ASAN_BUILD)/report.*
	PYTHONPATH=$(CURDIR)/tests/asan LAUNCHER_NATIVE_BUILD=$(CURDIR)/$(ASAN_BUILD)/launcher/_native \
	ASAN_OPTIONS=detect_leaks=0:handle_segv=0:handle_sigbus=0:handle_sigfpe=0:log_path=$(CURDIR)/$(ASAN_BUILD)/report \
	LD_PRELOAD="$(ASAN_PRELOAD)" $(BIN)/python -m pytest -q -m 'not address_space_limit' $(ASAN_TESTS); status=$$?; \
	if ls $(ASAN_BUILD)/report.* >/dev/null 2>&1; then cat $(ASAN_BUILD)/report.*; exit 1; fi; exit $$status

# Lint first: a lint error fails the tests as a failing test does; then the native tests under ASan.
test: lint asan $(BUILD_STAMP) $(BINARY)
	$(BIN)/python -m pytest -q

bench: $(BUILD_STAMP) $(BINARY)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build dist *.egg-info launcher/_native/*.so _native/*.cpp bench/results.json
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
