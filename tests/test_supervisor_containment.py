"""Nothing outlives the launcher: not even a worker's descendant in a session of its own.

Where the launcher can create a cgroup (as root here and in CI) it runs the job in one, killed whole
at the end and by the guardian when the launcher is killed. tests/workers/sup_readonly_cgroups.py
runs the launcher where cgroup2 is read-only (it takes the v1 freezer) or where every cgroup is (the
fallback: the processes the launcher adopted are killed at the end; after kill -9 of the launcher the
guardian kills the workers' process groups, and a descendant in a session of its own survives).
"""
import os
import signal
import subprocess
import sys

import pytest
from helpers import (
    LAUNCHER,
    REPO,
    SECCOMP,
    WORKERS,
    cgroup_mounts,
    clean_env,
    dead,
    job_cgroups,
    wait_for,
    wait_until_ready,
    x86_64_only,
)

READONLY_CGROUPS = [sys.executable, os.path.join(WORKERS, "sup_readonly_cgroups.py")]
WORKER = os.path.join(WORKERS, "sup_worker.py")
NPROC = 2
MOUNTS = cgroup_mounts()
# v2: the launcher as it is; v1: cgroup2 read-only; none: every cgroup read-only.
MODES = {"v2": [], "v1": [*READONLY_CGROUPS, "v2"], "none": [*READONLY_CGROUPS, "all"]}


def usable(mode):
    """mode, once this machine can run the launcher so (else the test is skipped, naming what is missing)."""
    if os.geteuid() != 0:
        pytest.skip("the launcher creates cgroups as root, and only root can make them read-only for it")
    if mode != "none" and MOUNTS[mode] is None:
        pytest.skip(f"no {mode} cgroup hierarchy (for the freezer) is mounted here")
    if mode == "v2" and tuple(map(int, os.uname().release.split(".")[:2])) < (5, 14):
        pytest.skip("this kernel's cgroup2 has no cgroup.kill (Linux < 5.14): the launcher takes the v1 freezer")
    return mode


@pytest.fixture(params=list(MODES))
def mode(request):
    return usable(request.param)


@pytest.fixture(params=[mode for mode in MODES if mode != "none"])
def cgroup_mode(request):
    return usable(request.param)


def launch(mode, tmp_path, *worker_args):
    return subprocess.Popen(
        [*MODES[mode], *LAUNCHER, "--standalone", f"--nproc-per-node={NPROC}", WORKER, str(tmp_path), *worker_args],
        env=clean_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def job_cgroup(mode, tmp_path):
    """The directory of the cgroup the launcher ran rank 0 in (None without one), from its /proc/self/cgroup."""
    cgroups = job_cgroups((tmp_path / "0.cgroup").read_text())
    assert set(cgroups) == ({mode} if mode != "none" else set()), cgroups
    return cgroups.get(mode)


@pytest.fixture
def escaped(tmp_path):
    """The pids of the workers' escaped `sleep 300`; any still there after the test is killed."""
    def read():
        return [int((tmp_path / f"{rank}.escaped").read_text()) for rank in range(NPROC)]

    yield read
    for rank in range(NPROC):
        path = tmp_path / f"{rank}.escaped"
        if path.exists() and not dead(int(path.read_text())):
            os.kill(int(path.read_text()), signal.SIGKILL)


def test_a_descendant_in_a_session_of_its_own_ends_with_the_job(mode, tmp_path, escaped):
    proc = launch(mode, tmp_path, "escape")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert [pid for pid in escaped() if not dead(pid)] == []
    cgroup = job_cgroup(mode, tmp_path)
    assert cgroup is None or not os.path.exists(cgroup)


def test_kill_9_of_the_launcher_ends_the_descendant_in_a_session_of_its_own(mode, tmp_path, escaped):
    proc = launch(mode, tmp_path, "escape", "wait")
    try:
        wait_until_ready(tmp_path, proc, NPROC)
        workers = [int((tmp_path / f"{rank}.ready").read_text()) for rank in range(NPROC)]
        cgroup = job_cgroup(mode, tmp_path)
        proc.kill()
        wait_for(lambda: all(dead(pid) for pid in workers), timeout=10, what="the workers to be gone")
        if mode == "none":  # the limit of the fallback: the guardian knows the workers' process groups only
            assert [pid for pid in escaped() if dead(pid)] == []
        else:
            wait_for(lambda: all(dead(pid) for pid in escaped()), timeout=10, what="the escaped sleeps to be gone")
            wait_for(lambda: not os.path.exists(cgroup), timeout=10, what="the guardian to remove the job's cgroup")
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def test_kill_9_of_the_launcher_in_its_second_attempt_ends_that_attempts_job(mode, tmp_path, escaped):
    # One guardian serves every attempt of a launcher: it must have learnt the second attempt's cgroup.
    proc = subprocess.Popen(
        [*MODES[mode], *LAUNCHER, "--standalone", f"--nproc-per-node={NPROC}", "--max-restarts=1", WORKER,
         str(tmp_path), "escape", "wait", "restarted"],
        env=clean_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until_ready(tmp_path, proc, NPROC)  # in the second attempt: in the first the workers exit 1 at once
        workers = [int((tmp_path / f"{rank}.ready").read_text()) for rank in range(NPROC)]
        cgroup = job_cgroup(mode, tmp_path)
        proc.kill()
        wait_for(lambda: all(dead(pid) for pid in workers), timeout=10, what="the workers to be gone")
        if mode != "none":
            wait_for(lambda: all(dead(pid) for pid in escaped()), timeout=10, what="the escaped sleeps to be gone")
            wait_for(lambda: not os.path.exists(cgroup), timeout=10, what="the guardian to remove the job's cgroup")
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def test_kill_9_of_a_launcher_running_a_launcher_leaves_neither_cgroup(cgroup_mode, tmp_path, escaped):
    mode = cgroup_mode
    inner = ["-m", "launcher", "--standalone", f"--nproc-per-node={NPROC}", WORKER, str(tmp_path), "escape", "wait"]
    proc = subprocess.Popen([*MODES[mode], *LAUNCHER, "--standalone", "--nproc-per-node=1", *inner],
                            env=clean_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_ready(tmp_path, proc, NPROC)
        inner_cgroup = job_cgroup(mode, tmp_path)
        outer_cgroup = os.path.dirname(inner_cgroup)
        assert os.path.basename(outer_cgroup).startswith("launcher-")
        proc.kill()
        wait_for(lambda: all(dead(pid) for pid in escaped()), timeout=10, what="the escaped sleeps to be gone")
        wait_for(lambda: not os.path.exists(outer_cgroup), timeout=10, what="the guardian to remove both cgroups")
    finally:
        proc.kill()
        proc.communicate(timeout=30)


@x86_64_only
def test_without_clone3_each_worker_joins_the_jobs_cgroup_itself(tmp_path, escaped):
    # Workers are born in the job's cgroup by clone3; where it fails with ENOSYS (Linux < 5.3, Docker's
    # default seccomp profile) a plain fork's child joins it before it execs.
    mode = usable("v2")
    proc = subprocess.Popen(
        [*SECCOMP, "clone3", *LAUNCHER, "--standalone", f"--nproc-per-node={NPROC}", WORKER, str(tmp_path), "escape"],
        env=clean_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert [pid for pid in escaped() if not dead(pid)] == []
    cgroup = job_cgroup(mode, tmp_path)
    assert os.path.basename(cgroup).startswith("launcher-") and not os.path.exists(cgroup), cgroup
