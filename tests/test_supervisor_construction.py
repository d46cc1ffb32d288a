"""A native constructor that fails part-way leaves the process as it found it.

Each failure is real (too low an open-files limit, a signal the C library
refuses), made in a process of its own: tests/workers/sup_construct.py.
"""
import json
import os
import signal
import subprocess
import sys

import pytest
from helpers import REPO, clean_env

CONSTRUCT = [sys.executable, os.path.join(REPO, "tests", "workers", "sup_construct.py")]


def construct(scenario):
    result = subprocess.run(CONSTRUCT + [scenario], capture_output=True, text=True, env=clean_env(), cwd=REPO,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("scenario, error", [
    ("supervisor-signalfd", "[Errno 24] signalfd: Too many open files"),
    ("supervisor-guardian", "[Errno 24] cannot start the guardian: Too many open files"),
    ("supervisor-closed", None),
])
def test_a_supervisor_restores_the_mask_the_subreaper_and_the_descriptors(scenario, error):
    seen = construct(scenario)
    assert seen["error"] == error
    assert signal.SIGCHLD not in seen["before"]["mask"] and seen["before"]["subreaper"] == 0
    if scenario == "supervisor-closed":  # the process keeps its guardian, made with the first group, for the next
        [guardian_pipe] = set(seen["after"].pop("fds")) - set(seen["before"].pop("fds"))
    assert seen["after"] == seen["before"]


@pytest.mark.parametrize("scenario, error", [
    ("watch-signalfd", "[Errno 24] signalfd: Too many open files"),
    ("watch-sigaction", "[Errno 22] sigaction: Invalid argument"),
])
def test_a_signal_watch_restores_the_mask_the_handlers_and_the_descriptors(scenario, error):
    seen = construct(scenario)
    assert seen["error"] == error
    assert signal.SIGUSR1 not in seen["before"]["mask"] and signal.SIGUSR1 not in seen["before"]["caught"]
    assert seen["after"] == seen["before"]
