"""TORCHELASTIC_UNINTERRUPTIBLE_STATE_TIMEOUT: a worker in uninterruptible sleep (D state) too long fails the group.

A worker really in D state, without special hardware: a task of a frozen
cgroup v1 freezer shows state D in /proc/<pid>/stat (checked on a process of
the test's own before it is relied on). It needs root and the v1 freezer;
without them those tests are skipped, saying which is missing. A frozen task
cannot run its signal handlers, not even SIGKILL's end: it dies once thawed.
"""
import os
import subprocess
import uuid

import pytest
from helpers import WORKERS, clean_env, dead, finish, start_launcher, state, wait_for

from launcher.hangs import HangWatch, uninterruptible_state_timeout

SLEEPER = os.path.join(WORKERS, "hang_sleeper.py")
FREEZER = "/sys/fs/cgroup/freezer"


class Freezer:
    """A cgroup v1 freezer group of the test's own."""

    def __init__(self):
        self.path = os.path.join(FREEZER, f"launcher_test_{uuid.uuid4().hex[:8]}")
        os.mkdir(self.path)

    def add(self, pid):
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(pid))

    def set(self, value):
        with open(os.path.join(self.path, "freezer.state"), "w") as f:
            f.write(value)
        wait_for(lambda: open(os.path.join(self.path, "freezer.state")).read().strip() == value, what=value)

    def tasks(self):
        with open(os.path.join(self.path, "tasks")) as f:
            return f.read().split()

    def remove(self):
        self.set("THAWED")
        wait_for(lambda: not self.tasks(), what="the frozen tasks to end")
        os.rmdir(self.path)


def freezer_missing():
    """Why a frozen task cannot stand for a task in D state here, or None."""
    if os.geteuid() != 0:
        return "not root: a cgroup freezer needs root"
    if not os.path.exists(os.path.join(FREEZER, "cgroup.procs")):
        return f"no cgroup v1 freezer at {FREEZER}"
    return None


@pytest.fixture
def freezer():
    """A freezer group, once a frozen task of the test's own was seen in state D."""
    missing = freezer_missing()
    if missing:
        pytest.skip(missing)
    group = Freezer()
    try:
        probe = subprocess.Popen(["sleep", "60"])
        group.add(probe.pid)
        group.set("FROZEN")
        probe_state = state(probe.pid)
        group.set("THAWED")
        probe.kill()
        probe.wait()
        if probe_state != "D":
            pytest.skip(f"a frozen task shows state {probe_state}, not D, on this kernel")
        yield group
    finally:
        if os.path.isdir(group.path):
            group.remove()


def test_a_worker_in_d_state_too_long_fails_the_group_without_restart(tmp_path, freezer):
    env = clean_env(TORCHELASTIC_UNINTERRUPTIBLE_STATE_TIMEOUT=1)
    launcher = start_launcher("--nproc-per-node=2", "--shutdown-timeout=1", "--max-restarts=1",
                              f"--log-dir={tmp_path / 'logs'}", SLEEPER, tmp_path, env=env)
    wait_for(lambda: (tmp_path / "0.pid").exists() or launcher.poll() is not None, timeout=120, what="rank 0")
    stuck = int((tmp_path / "0.pid").read_text())
    freezer.add(stuck)
    freezer.set("FROZEN")
    assert state(stuck) == "D"
    [(code, _, stderr)] = finish(launcher)
    assert code == 1, stderr
    summary = stderr[stderr.index("FAILED"):]
    assert "rank      : 0 (local_rank: 0)" in summary
    assert "hang      : uninterruptible sleep (D state) for " in summary
    assert "over TORCHELASTIC_UNINTERRUPTIBLE_STATE_TIMEOUT=1: SIGKILL" in summary
    assert "exitcode  : <none: still running after SIGKILL, stuck in the kernel>" in summary
    assert "state: D (disk sleep), wchan: " in summary
    assert "kernel stack:\n    [<0>] " in summary  # where the kernel holds it (root may read it)
    assert "not restarting: a worker stuck in the kernel may still hold its devices" in stderr
    assert not list((tmp_path / "logs").glob("*/attempt_1")) and "restarts left" not in stderr
    freezer.remove()
    wait_for(lambda: dead(stuck), what="the thawed worker to die of its SIGKILL")


def test_nothing_is_watched_without_the_variables():
    watch = HangWatch("trainer", environ={})
    try:
        assert watch.timeout() is None and watch.watch_fds() == []  # the loop sleeps until a worker does something
    finally:
        watch.close()


@pytest.mark.parametrize("limit, every", [("1", 0.1), ("30", 3.0), ("0.2", 0.1), ("3600", 10.0)])
def test_the_state_is_read_every_tenth_of_the_limit(limit, every):
    watch = HangWatch("trainer", environ={"TORCHELASTIC_UNINTERRUPTIBLE_STATE_TIMEOUT": limit})
    try:
        assert watch._d_state_every == every
    finally:
        watch.close()


@pytest.mark.parametrize("value, seconds", [
    ("", 0.0), ("5", 5.0), ("0.5", 0.5), ("0", 0.0), ("-3", 0.0), ("soon", 0.0), ("nan", 0.0), ("inf", 0.0),
])
def test_the_variable_is_read_as_torch_reads_it(value, seconds):
    assert uninterruptible_state_timeout({"TORCHELASTIC_UNINTERRUPTIBLE_STATE_TIMEOUT": value}) == seconds
    assert uninterruptible_state_timeout({}) == 0.0
