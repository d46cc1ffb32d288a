"""--signals-from-stdin: each line of the launcher's stdin is a signal it takes, the end of stdin a hangup;
the workers read /dev/null. (--hosts starts every remote launcher so: tests/test_hosts_launch.py.)"""
import os
import signal
import subprocess

import pytest
from helpers import WORKERS, finish, start_launcher, survivors, wait_for

WORKER = os.path.join(WORKERS, "hosts_worker.sh")

pytestmark = pytest.mark.usefixtures("isolated_environment")


def start(tmp_path):
    proc = start_launcher("--standalone", "--nproc-per-node=2", "--signals-from-stdin", "--no-python", WORKER,
                          tmp_path, "wait", stdin=subprocess.PIPE)
    wait_for(lambda: all((tmp_path / f"{rank}.ready").exists() for rank in range(2)) or proc.poll() is not None,
             what="the workers to be ready")
    assert proc.poll() is None, proc.communicate()
    return proc


def processes(tmp_path):
    """The workers and their sleep children."""
    return [int(pid) for rank in range(2) for pid in (tmp_path / f"{rank}.ready").read_text().split()]


def test_a_signal_name_on_stdin_is_that_signal(tmp_path):
    proc = start(tmp_path)
    proc.stdin.write("NOPE\nSIGTERM\n")
    proc.stdin.flush()
    code = proc.wait(timeout=60)  # stdin stays open (its end would be a hangup); the output fits the pipes
    [(_, _, err)] = finish(proc)
    assert code == 128 + signal.SIGTERM, err
    for rank in range(2):
        assert (tmp_path / f"{rank}.signals").read_text() == "SIGTERM\n"
    assert "--signals-from-stdin: ignoring 'NOPE', which is not a signal name" in err


def test_the_end_of_stdin_is_a_hangup(tmp_path):
    proc = start(tmp_path)
    workers = processes(tmp_path)
    [(code, _, err)] = finish(proc)  # communicate closes stdin
    assert code == 128 + signal.SIGHUP, err
    assert survivors(workers) == {}


def test_the_workers_read_dev_null(tmp_path):
    proc = start_launcher("--standalone", "--signals-from-stdin", "--no-python", WORKER, tmp_path, "record",
                          stdin=subprocess.PIPE)
    code = proc.wait(timeout=60)  # as above: stdin stays open
    [(_, _, err)] = finish(proc)
    assert code == 0, err
    assert (tmp_path / "0.stdin").read_text() == "/dev/null\n"
