"""The supervisor against what goes wrong around it: a console that goes away, threads that take
SIGCHLD, an embedding program's own children, a guardian that is gone, old kernels' system calls.

Old kernels are made with a seccomp filter (tests/workers/sup_seccomp.py), every process is real.
"""
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
from helpers import (
    LAUNCHER,
    REPO,
    SECCOMP,
    WORKERS,
    children,
    clean_env,
    comm,
    cpu_seconds,
    dead,
    state,
    sup_worker,
    wait_for,
    x86_64_only,
)

from launcher.supervisor import OutputRoute, Supervisor

# --- a console that goes away ----------------------------------------------------------------------

def pipes_watched_by(pid):
    """The pipes (their /proc link names, ``pipe:[inode]``) that the epoll instances of process pid watch."""
    watched = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[eventpoll]":
            continue
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            targets = [int(line.split()[1]) for line in f if line.startswith("tfd:")]
        watched.update(os.readlink(f"/proc/{pid}/fd/{target}") for target in targets)
    return watched


def assert_idle(pid):
    """Process ``pid`` uses under 0.2 s of CPU in 2 s: a measuring window, not a synchronisation."""
    used_before = cpu_seconds(pid)
    time.sleep(2.0)
    assert cpu_seconds(pid) - used_before < 0.2


def test_a_console_that_goes_away_drops_its_backlog_and_the_job_ends(harness, tmp_path):
    """``launcher | less``, scrolled back until the launcher paused the workers, then quit."""
    lines = 250_000  # each rank writes about 5 MB: more than the console holds back (4 MiB) and every pipe
    release = tmp_path / "release"
    h = harness(sup_worker(tmp_path, "flood", lines, release), tee="1")
    wait_for(lambda: os.path.exists(h.state_path) or h.proc.poll() is not None, what="the workers to start")
    st = json.loads(h.file("state"))
    launcher, workers = st["launcher"], list(st["workers"].values())
    worker_stdouts = {os.readlink(f"/proc/{pid}/fd/1") for pid in workers}
    wait_for(lambda: not worker_stdouts & pipes_watched_by(launcher), timeout=120,
             what="the launcher to stop reading the workers (its console backlog is full)")
    h.proc.stdout.close()  # the reader quits
    wait_for(lambda: all((tmp_path / f"{rank}.printed").exists() for rank in range(2)), timeout=120,
             what="the workers to write everything")
    logs = [os.path.join(st["attempt"], str(rank), "stdout.log") for rank in range(2)]
    expected = ["".join(f"line {i} of rank {rank}\n" for i in range(lines)) for rank in range(2)]
    wait_for(lambda: [os.path.getsize(log) for log in logs] == [len(text) for text in expected],
             what="the launcher to write every line to the log files")
    assert_idle(launcher)  # a launcher spinning on the broken pipe would not be
    release.touch()
    code, _, err = h.finish(timeout=120)
    assert code == 0, err
    for log, text in zip(logs, expected):
        with open(log) as f:
            assert f.read() == text


def test_a_console_that_goes_away_while_nothing_is_written_is_not_watched_in_a_loop(harness, tmp_path):
    """``launcher | head`` with quiet workers: the console's reader is gone before anything was written to it."""
    release = tmp_path / "release"
    h = harness(sup_worker(tmp_path, "exit", 0, release))
    wait_for(lambda: os.path.exists(h.state_path) or h.proc.poll() is not None, what="the workers to start")
    launcher = json.loads(h.file("state"))["launcher"]
    h.proc.stdout.close()  # the reader quits; epoll reports an error on the console from now on
    assert_idle(launcher)  # one woken by that error at every turn would not be
    release.touch()
    code, _, err = h.finish(timeout=120)
    assert code == 0, err
    assert [e["exitcode"] for e in h.exits()] == [0, 0]


# --- threads that take SIGCHLD ----------------------------------------------------------------------

@x86_64_only
def test_without_pidfd_open_no_exit_is_lost_to_a_thread_started_before_the_supervisor(harness, tmp_path):
    h = harness(["true"], nproc=40, threads=4, wrapper=[*SECCOMP, "pidfd_open"])
    code, _, err = h.finish(timeout=120)
    assert code == 0, err
    assert "worker exits are detected through SIGCHLD" in err
    assert [e["exitcode"] for e in h.exits()] == [0] * 40


# --- an embedding program's own children ------------------------------------------------------------

@pytest.mark.parametrize("cgroups", ["as they are", "read-only"])
def test_the_launcher_leaves_the_embedding_programs_own_children_to_it(tmp_path, cgroups):
    """With a job cgroup, its membership tells the program's children apart; without one, that it had them first."""
    wrapper = []
    if cgroups == "read-only":
        if os.geteuid() != 0:
            pytest.skip("only root can make the cgroups read-only for the launcher")
        wrapper = [sys.executable, os.path.join(WORKERS, "sup_readonly_cgroups.py"), "all"]
    result = subprocess.run([*wrapper, sys.executable, os.path.join(WORKERS, "sup_embedding.py"), str(tmp_path)],
                            capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "7\n"  # its child's exit code, which the launcher did not reap


# --- a guardian that is gone --------------------------------------------------------------------------

def guardians():
    return [pid for pid in children(os.getpid()) if comm(pid) == "launcher-guard"]


def test_one_guardian_serves_every_group_of_a_process():
    # Forked with the first group and kept: a restart forks nothing (the fork of a launcher-sized process, its
    # copy-on-write faults and the child's exit were some 4 ms of each restart).
    first = Supervisor()
    wait_for(guardians, what="the guardian")
    [guardian] = guardians()
    first.close()
    second = Supervisor()
    try:
        second.spawn([b"/bin/true"], [b"true"], [], None, None, None, OutputRoute(), OutputRoute())
        second.stop(signal.SIGTERM, 10.0)
        assert guardians() == [guardian] and state(guardian) != "Z"
    finally:
        second.close()


def run_in_a_launcher(code):
    """Run ``code`` in a Python of its own, as a launcher process (it must print its workers' pids, one line);
    returns (the process, those pids)."""
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=clean_env(),
                                cwd=REPO)
    return launcher, [int(pid) for pid in launcher.stdout.readline().split()]


SPAWN_A_SLEEP = (
    "import gc, os, time\n"
    "from launcher._native.supervisor import OutputRoute, Supervisor\n"
    "supervisor = Supervisor()\n"
    "supervisor.spawn([b'/bin/sleep'], [b'sleep', b'300'], [], None, None, None, OutputRoute(), OutputRoute())\n"
)


def test_a_group_dropped_without_being_stopped_is_killed():
    # What closing its own guardian's pipe did, before one guardian served every group. In a launcher
    # process of its own, which lives on: its guardian's end is not what kills the worker.
    launcher, [worker] = run_in_a_launcher(
        SPAWN_A_SLEEP + "worker = supervisor.pid(0)\ndel supervisor\ngc.collect()\nprint(worker, flush=True)\n"
        "time.sleep(300)\n"
    )
    try:
        wait_for(lambda: dead(worker), timeout=10, what="the dropped group's worker to be killed")
        assert launcher.poll() is None
    finally:
        launcher.kill()
        launcher.wait()


def test_a_child_forked_from_the_launcher_does_not_keep_its_guardian_from_seeing_it_go(tmp_path):
    # The guardian acts when its pipe reads EOF: a forked child holding the write end would keep it from
    # killing the job after kill -9 of the launcher, for as long as the child lives. The worker's child
    # shows it: the worker itself dies of its parent-death signal anyway.
    grandchild_file = tmp_path / "grandchild"
    launcher, [child] = run_in_a_launcher(
        "import os, time\n"
        "from launcher._native.supervisor import OutputRoute, Supervisor\n"
        "supervisor = Supervisor()\n"
        f"script = 'sleep 300 & echo $! > {grandchild_file}.tmp && mv {grandchild_file}.tmp {grandchild_file}; wait'\n"
        "supervisor.spawn([b'/bin/sh'], [b'sh', b'-c', script.encode()], [], None, None, None, OutputRoute(),"
        " OutputRoute())\n"
        "child = os.fork()\n"
        "if child == 0:\n    time.sleep(300)\n    os._exit(0)\n"
        "print(child, flush=True)\ntime.sleep(300)\n"
    )
    grandchild = None
    try:
        wait_for(grandchild_file.exists, what="the worker's child")
        grandchild = int(grandchild_file.read_text())
        launcher.kill()
        launcher.wait()
        wait_for(lambda: dead(grandchild), timeout=10, what="the guardian to kill the killed launcher's job")
        assert not dead(child)
    finally:
        launcher.kill()
        for pid in (grandchild, child):
            if pid is not None and not dead(pid):
                os.kill(pid, signal.SIGKILL)


def test_spawn_kills_and_reaps_its_worker_when_the_guardian_is_gone():
    supervisor = Supervisor()
    wait_for(guardians, what="the guardian")
    [guardian] = guardians()
    try:
        os.kill(guardian, signal.SIGKILL)
        wait_for(lambda: state(guardian) == "Z", what="the guardian to die")
        before = set(children(os.getpid()))
        with pytest.raises(BrokenPipeError, match="cannot reach the guardian"):
            supervisor.spawn([b"/bin/sleep"], [b"sleep", b"300"], [], None, None, None, OutputRoute(), OutputRoute())
        assert set(children(os.getpid())) == before  # no worker left running, nor a zombie
    finally:
        supervisor.close()
        os.waitpid(guardian, 0)


# --- descriptors and limits ---------------------------------------------------------------------------

def launch_reporting_limits(tmp_path, *wrapper):
    """The launcher, started with a soft open-files limit of 1024 (its store raises it), and its workers' limits."""
    result = subprocess.run(
        [*wrapper, "sh", "-c", 'ulimit -Sn 1024 && exec "$@"', "sh", *LAUNCHER, "--standalone", "--nproc-per-node=2",
         os.path.join(WORKERS, "sup_worker.py"), tmp_path, "limits"],
        capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads((tmp_path / f"{rank}.limits").read_text()) for rank in range(2)]


def assert_only_the_standard_descriptors_and_the_stack_file(fds):
    # 3: the file faulthandler dumps the worker's stack into when the launcher asks (launcher/stacks.py)
    assert sorted(fds, key=int) == ["0", "1", "2", "3"] and fds["3"].endswith(".stack"), fds


@pytest.fixture
def hard_limit_above_1024():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"the hard open-files limit ({hard}) leaves the launcher nothing to raise above 1024")
    return hard


def test_workers_get_the_open_files_limit_the_launcher_started_with(tmp_path, hard_limit_above_1024):
    for limits in launch_reporting_limits(tmp_path):
        assert limits["nofile"] == [1024, hard_limit_above_1024]
        assert_only_the_standard_descriptors_and_the_stack_file(limits["fds"])


@x86_64_only
def test_without_close_range_only_open_descriptors_are_closed(tmp_path, hard_limit_above_1024):
    # Closing a descriptor at or above 1024 kills the process: none was open there.
    for limits in launch_reporting_limits(tmp_path, *SECCOMP, "close_range", "--fatal-close-from=1024"):
        assert limits["nofile"] == [1024, hard_limit_above_1024]
        assert_only_the_standard_descriptors_and_the_stack_file(limits["fds"])
