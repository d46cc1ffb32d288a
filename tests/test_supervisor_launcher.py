"""Supervision guarantees through the real launcher: ``python -m launcher --standalone``."""
import os
import signal
import subprocess
import time

import pytest
from helpers import (
    LAUNCHER,
    REPO,
    SECCOMP,
    WORKERS,
    clean_env,
    dead,
    finish,
    start_launcher,
    wait_for,
    wait_until_ready,
    x86_64_only,
)

WORKER = os.path.join(WORKERS, "sup_worker.py")


def launch(*args, nproc=2):
    return start_launcher("--standalone", f"--nproc-per-node={nproc}", *args)


def ready(tmp_path, proc, nproc=2):
    """The workers' pids, once each is ready."""
    wait_until_ready(tmp_path, proc, nproc)
    return [int((tmp_path / f"{r}.ready").read_text()) for r in range(nproc)]


def test_sigkilled_launcher_leaves_no_worker_nor_grandchild(tmp_path):
    proc = launch(WORKER, tmp_path, "children", 2, "stubborn")
    try:
        processes = ready(tmp_path, proc)
        for rank in range(2):
            processes += [int(pid) for pid in (tmp_path / f"{rank}.children").read_text().split()]
        proc.kill()
        killed_at = time.monotonic()
        wait_for(lambda: all(dead(pid) for pid in processes), timeout=10, what="every process to be gone")
        assert time.monotonic() - killed_at < 2.0
    finally:
        proc.kill()
        proc.communicate(timeout=30)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_handled_signal_is_forwarded_and_the_launcher_exits_128_plus_signum(tmp_path, sig):
    proc = launch("--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                  WORKER, tmp_path, "record", sig.name)
    workers = ready(tmp_path, proc)
    proc.send_signal(sig)
    [(code, _, err)] = finish(proc)
    assert code == 128 + sig, err
    for rank in range(2):
        assert (tmp_path / f"{rank}.signals").read_text() == f"{sig.name}\n"
    assert all(dead(pid) for pid in workers)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2])
def test_a_notifying_signal_is_forwarded_and_the_workers_decide(tmp_path, sig):
    """SIGUSR1/SIGUSR2 (Slurm's --signal=USR1@90): forwarded, and the job goes on; here every worker
    records it and ends well, so the launch succeeds (torchrun would end the job with 128+signum)."""
    proc = launch("--signals-to-handle=SIGTERM,SIGINT,SIGUSR1,SIGUSR2", WORKER, tmp_path, "record", sig.name)
    ready(tmp_path, proc)
    proc.send_signal(sig)
    [(code, _, err)] = finish(proc)
    assert code == 0, err
    assert f"received {sig.name}: forwarding it to the workers, which carry on" in err
    for rank in range(2):
        assert (tmp_path / f"{rank}.signals").read_text() == f"{sig.name}\n"


def test_a_notifying_signal_a_worker_does_not_handle_ends_it_as_a_failure(tmp_path):
    proc = launch("--signals-to-handle=SIGTERM,SIGUSR1", WORKER, tmp_path, "record", "SIGTERM")
    ready(tmp_path, proc)
    proc.send_signal(signal.SIGUSR1)  # the workers keep its default action: it ends them
    [(code, _, err)] = finish(proc)
    assert code == 1, err
    assert "signal    : SIGUSR1" in err


def test_a_segfault_is_reported_with_its_signal_name(tmp_path):
    proc = launch("--max-restarts=0", WORKER, tmp_path, "segv", nproc=1)
    [(code, _, err)] = finish(proc)
    assert code == 1
    assert "SIGSEGV" in err


@x86_64_only
@pytest.mark.parametrize("fail", [False, True])
def test_without_pidfd_open_exits_are_seen_through_sigchld(tmp_path, fail):
    args = [f"{WORKERS}/env_dump.py", str(tmp_path)] + (["--fail-rank=1", "--exit-code=5"] if fail else [])
    result = subprocess.run(
        [*SECCOMP, "pidfd_open", *LAUNCHER, "--standalone", "--nproc-per-node=3",
         *args],
        capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=120,
    )
    assert "worker exits are detected through SIGCHLD" in result.stderr
    if fail:  # rank 1's exit tears the others down, maybe before they wrote anything
        assert result.returncode == 1
        assert "exitcode  : 5" in result.stderr and "rank      : 1 (local_rank: 1)" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert sorted(os.listdir(tmp_path)) == ["0.json", "1.json", "2.json"]
