"""Process supervision: one test per guarantee, with real processes and signals.

Most scenarios run tests/workers/sup_harness.py as the launcher process (a
WorkerGroup with the agent's policy) so that it can be signalled and killed;
the in-process ones check what the API returns. After each scenario no
process it started is left, and no zombie.
"""
import json
import os
import re
import select
import signal
import sys
import threading
import time

import pytest
from helpers import (
    children,
    clean_env,
    comm,
    dead,
    job_cgroups,
    my_zombies,
    parent,
    state,
    sup_worker,
    wait_for,
)

from launcher.logs import LogsSpecs, Std
from launcher.supervisor import EventKind, SignalWatch, WorkerGroup, WorkerLaunch

# --- nothing survives the launcher -------------------------------------------

def test_sigkilled_launcher_leaves_no_worker_nor_grandchild(harness, tmp_path):
    h = harness(sup_worker(tmp_path, "children", 2, "stubborn"))
    st = h.ready()
    processes = list(st["workers"].values())
    for rank in range(2):
        processes += [int(pid) for pid in h.file(f"{rank}.children").split()]
    os.kill(st["launcher"], signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: all(dead(pid) for pid in processes), timeout=10, what="every process to be gone")
    assert time.monotonic() - killed_at < 2.0


def test_parent_death_signal_kills_a_worker_without_the_guardian(harness, tmp_path):
    h = harness(sup_worker(tmp_path, "wait"))
    st = h.ready()
    guardian = [pid for pid in children(st["launcher"]) if comm(pid) == "launcher-guard"]
    assert len(guardian) == 1
    with open(f"/proc/{st['workers']['0']}/cgroup") as f:
        cgroups = job_cgroups(f.read())
    os.kill(guardian[0], signal.SIGKILL)
    os.kill(st["launcher"], signal.SIGKILL)
    wait_for(lambda: all(dead(pid) for pid in st["workers"].values()), timeout=10, what="the workers to die")
    for directory in cgroups.values():  # with its guardian gone too, nothing removes the job's cgroup, now empty
        os.rmdir(directory)


def test_subreaper_reaps_an_orphaned_grandchild(harness, tmp_path):
    os.mkfifo(tmp_path / "release")
    h = harness([sup_worker(tmp_path, "orphan"), sup_worker(tmp_path, "wait")])
    st = h.ready()
    orphan = int(h.file("0.orphan"))
    wait_for(lambda: not dead(orphan) and parent(orphan) == st["launcher"], what="the orphan to be adopted")
    with open(tmp_path / "release", "w"):
        pass  # the orphan reads EOF and exits
    wait_for(lambda: state(orphan) is None, what="the orphan to be reaped")
    h.proc.send_signal(signal.SIGTERM)
    assert h.finish()[0] == 128 + signal.SIGTERM


# --- signals -------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_handled_signal_is_forwarded_and_sets_the_exit_code(harness, tmp_path, sig):
    h = harness(sup_worker(tmp_path, "record", sig.name), signals="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    st = h.ready()
    h.proc.send_signal(sig)
    code, _, err = h.finish()
    assert code == 128 + sig, err
    for rank in range(2):
        assert h.file(f"{rank}.signals") == f"{sig.name}\n"
    assert all(dead(pid) for pid in st["workers"].values())


def test_worker_ignoring_sigterm_is_killed_after_the_shutdown_timeout(harness, tmp_path):
    h = harness(sup_worker(tmp_path, "endure", "SIGTERM"), shutdown_timeout=1.0)
    h.ready()
    sent = time.monotonic()
    h.proc.send_signal(signal.SIGTERM)
    code, _, err = h.finish()
    assert code == 128 + signal.SIGTERM, err
    assert time.monotonic() - sent >= 1.0
    assert [e["status"] for e in h.exits()] == ["SIGKILL", "SIGKILL"]
    assert h.file("0.signals") == "SIGTERM\n"


def test_second_sigint_kills_at_once(harness, tmp_path):
    h = harness(sup_worker(tmp_path, "endure", "SIGINT"), shutdown_timeout=120.0)
    h.ready()
    h.proc.send_signal(signal.SIGINT)
    wait_for(lambda: all((tmp_path / f"{r}.signals").exists() for r in range(2)), what="the SIGINT to be forwarded")
    sent = time.monotonic()
    h.proc.send_signal(signal.SIGINT)
    code, _, err = h.finish()
    assert code == 128 + signal.SIGINT, err
    assert time.monotonic() - sent < 60
    assert [e["status"] for e in h.exits()] == ["SIGKILL", "SIGKILL"]


# --- exits -----------------------------------------------------------------------

def test_segfault_is_reported_as_sigsegv(harness, tmp_path):
    h = harness(sup_worker(tmp_path, "segv"), nproc=1)
    code, _, err = h.finish()
    assert code == 1, err
    (exit,) = h.exits()
    assert exit["signal"] == signal.SIGSEGV and exit["exitcode"] is None
    assert exit["status"] == "SIGSEGV" + (" (core dumped)" if exit["core_dumped"] else "")


def test_a_crash_on_one_rank_tears_down_the_others(harness, tmp_path):
    h = harness([sup_worker(tmp_path, "record", "SIGTERM"), sup_worker(tmp_path, "exit", 3, tmp_path / "0.ready")])
    code, _, err = h.finish()
    assert code == 1, err
    assert h.file("0.signals") == "SIGTERM\n"
    assert [e["status"] for e in h.exits()] == ["exitcode 0", "exitcode 3"]


@pytest.mark.parametrize("term_on_failure", [True, False])
def test_term_on_failure_signals_the_others_before_the_agent_stops_the_group(tmp_path, term_on_failure):
    group, _ = in_process_group(
        tmp_path,
        [sup_worker(tmp_path, "record", "SIGTERM"), sup_worker(tmp_path, "exit", 3, tmp_path / "0.ready")],
        term_on_failure=term_on_failure,
    )
    group.start()
    event = group.wait(timeout=60)
    assert event.kind is EventKind.EXITED and [e.exitcode for e in event.exits if e.failed] == [3]
    if term_on_failure:
        wait_for(lambda: (tmp_path / "0.signals").exists(), what="rank 0's SIGTERM, sent by the loop")
    else:
        assert state(group.pids()[0]) not in (None, "Z") and not (tmp_path / "0.signals").exists()
    exits = group.stop()
    assert (tmp_path / "0.signals").read_text() == "SIGTERM\n"
    assert [e.status for e in exits] == ["exitcode 0", "exitcode 3"]
    assert my_zombies() == []


def test_process_group_members_are_killed_at_teardown(tmp_path):
    group, _ = in_process_group(tmp_path, [sup_worker(tmp_path, "children", 2, "stubborn")], shutdown_timeout=1.0)
    group.start()
    wait_for(lambda: (tmp_path / "0.children").exists(), what="the children")
    members = [int(pid) for pid in (tmp_path / "0.children").read_text().split()]
    exits = group.stop()
    assert exits[0].status == "SIGTERM"
    assert [state(pid) for pid in members] == [None, None]
    assert my_zombies() == []


def test_leftovers_of_workers_that_all_succeeded_are_killed(tmp_path):
    group, _ = in_process_group(tmp_path, [sup_worker(tmp_path, "children", 1, "stubborn", "exit")],
                                shutdown_timeout=1.0)
    group.start()
    event = group.wait(timeout=60)
    assert event.kind is EventKind.EXITED and event.exits[0].exitcode == 0
    member = int((tmp_path / "0.children").read_text())
    assert state(member) is None
    assert my_zombies() == []


def test_stderr_tail_keeps_the_last_20_lines(tmp_path):
    group, _ = in_process_group(tmp_path, [sup_worker(tmp_path, "stderr", 30)])
    group.start()
    event = group.wait(timeout=60)
    assert event.exits[0].exitcode == 1 and event.exits[0].failed
    assert event.exits[0].stderr_tail == [f"error line {i}" for i in range(10, 30)]


def test_stderr_tail_shows_a_redrawn_line_as_the_terminal_last_did(tmp_path):
    script = "import sys; sys.stderr.write('first\\nprogress 10%\\rprogress 50%\\rprogress 100%\\r\\n'); sys.exit(1)"
    group, _ = in_process_group(tmp_path, [[sys.executable, "-c", script]])
    group.start()
    assert group.wait(timeout=60).exits[0].stderr_tail == ["first", "progress 100%"]


def test_exec_failure_names_the_program_and_stops_the_started_workers(tmp_path):
    not_executable = tmp_path / "script.sh"
    not_executable.write_text("echo hi\n")
    for argv, error in ((["no-such-program-xyz"], FileNotFoundError), ([str(not_executable)], PermissionError)):
        group, _ = in_process_group(tmp_path, [sup_worker(tmp_path, "wait"), argv])
        with pytest.raises(error) as raised:
            group.start()
        assert raised.value.filename == argv[0]
        assert f"cannot execute: {os.strerror(raised.value.errno)}: '{argv[0]}'" in str(raised.value)
        assert dead(group.exits[0].pid) and group.exits[0].signal == signal.SIGTERM
        assert my_zombies() == []


def test_exec_failure_through_the_launcher_is_one_line(harness, tmp_path):
    h = harness(["no-such-program-xyz", "--flag"])
    code, _, err = h.finish()
    assert code == 1
    assert err == "error: [Errno 2] cannot execute: No such file or directory: 'no-such-program-xyz'\n"


def test_workers_start_clean(tmp_path):
    """Default signal dispositions, empty mask, own session, no inherited fd, cwd and CPU affinity applied."""
    script = (
        "import os, json; print(json.dumps({'sid': os.getsid(0), 'pid': os.getpid(),"
        "'fds': sorted(os.listdir('/proc/self/fd')), 'cwd': os.getcwd(), 'cpus': sorted(os.sched_getaffinity(0))}))"
    )
    leaked_r, leaked_w = os.pipe()
    os.set_inheritable(leaked_w, True)
    try:
        with SignalWatch([signal.SIGTERM, signal.SIGUSR1]):  # blocked here, and Python ignores SIGPIPE
            group, attempt = in_process_group(
                tmp_path, [["grep", "^Sig[BI]", "/proc/self/status"], [sys.executable, "-c", script]],
                redirects=Std.OUT, cpus={0}, cwd=str(tmp_path),
            )
            group.start()
            while len(group.exits) < 2:
                group.wait(timeout=60)
    finally:
        os.close(leaked_r)
        os.close(leaked_w)
    assert open(attempt.workers[0].stdout.file).read() == "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"
    seen = json.loads(open(attempt.workers[1].stdout.file).read())
    assert seen["sid"] == seen["pid"]
    assert seen["fds"] == ["0", "1", "2", "3"]  # 3: listdir's own
    assert seen["cwd"] == str(tmp_path) and seen["cpus"] == [0]


def test_workers_born_on_the_launchers_cpu_may_use_every_cpu_the_launcher_may(tmp_path):
    """Once the group's workers fill the launcher's other CPUs, the next ones are born on the spawning
    thread's CPU alone (launcher_spawn): each leaves that mask for the launcher's, and so does the thread."""
    previous = os.sched_getaffinity(0)
    allowed = sorted(previous)[:2]
    script = "import os; print(sorted(os.sched_getaffinity(0)))"
    os.sched_setaffinity(0, allowed)  # the workers' CPUs are this thread's: 3 workers fill 2 CPUs
    try:
        group, attempt = in_process_group(tmp_path, [[sys.executable, "-c", script]] * 3, redirects=Std.OUT)
        group.start()
        assert sorted(os.sched_getaffinity(0)) == allowed
        while len(group.exits) < 3:
            group.wait(timeout=60)
    finally:
        os.sched_setaffinity(0, previous)
    assert [open(logs.stdout.file).read() for logs in attempt.workers.values()] == [f"{allowed}\n"] * 3


@pytest.mark.skipif(
    not os.path.exists("/proc/self/numa_maps"), reason="this kernel has no NUMA support (no /proc/self/numa_maps)"
)
def test_memory_binding_is_applied(tmp_path):
    script = "print(open('/proc/self/numa_maps').read())"
    group, attempt = in_process_group(tmp_path, [[sys.executable, "-c", script]], redirects=Std.OUT, mem_nodes={0})
    group.start()
    assert group.wait(timeout=60).exits[0].exitcode == 0
    assert "bind:0" in open(attempt.workers[0].stdout.file).read()


def test_signal_watch_reads_blocked_signals_and_restores_the_mask():
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with SignalWatch([signal.SIGUSR1, signal.SIGUSR2]) as watch:
        assert watch.read() is None
        # to this thread, which blocks it: a process-directed signal could land on another test's thread
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR2)
        assert select.select([watch.fileno()], [], [], 10)[0] == [watch.fileno()]
        assert watch.read() == signal.SIGUSR2
        assert watch.read() is None
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    with pytest.raises(ValueError):
        SignalWatch([signal.SIGKILL])


def test_a_signal_taken_by_an_older_thread_reaches_the_watch():
    # In a program that embeds the launcher, threads started before the watch do not block its signals.
    release = threading.Event()
    older = threading.Thread(target=release.wait)
    older.start()
    handler_before = signal.getsignal(signal.SIGUSR1)
    try:
        with SignalWatch([signal.SIGUSR1]) as watch:
            signal.pthread_kill(older.ident, signal.SIGUSR1)  # the default action would end the process
            assert select.select([watch.fileno()], [], [], 10)[0] == [watch.fileno()]
            assert watch.read() == signal.SIGUSR1
        assert signal.getsignal(signal.SIGUSR1) == handler_before
    finally:
        release.set()
        older.join()


def test_wait_returns_on_a_watched_fd_and_on_timeout(tmp_path):
    group, _ = in_process_group(tmp_path, [sup_worker(tmp_path, "wait")], shutdown_timeout=5.0)
    group.start()
    assert group.wait(timeout=0.05).kind is EventKind.TIMEOUT
    r, w = os.pipe()
    try:
        os.write(w, b"x")
        event = group.wait(timeout=60, watch_fds=[r])
        assert event.kind is EventKind.FD and event.fd == r
    finally:
        os.close(r)
        os.close(w)
    assert group.stop()[0].status == "SIGTERM"


def in_process_group(tmp_path, argvs, shutdown_timeout=30.0, redirects=Std.NONE, tee=Std.NONE, term_on_failure=False,
                     **launch):
    attempt = LogsSpecs(log_dir=str(tmp_path / "logs"), redirects=redirects, tee=tee).attempt(
        "run", 0, "default", {r: r for r in range(len(argvs))}
    )
    workers = [
        WorkerLaunch(r, r, argv, dict(clean_env(), RANK=str(r)), attempt.workers[r], **launch)
        for r, argv in enumerate(argvs)
    ]
    return WorkerGroup(workers, attempt, shutdown_timeout=shutdown_timeout, term_on_failure=term_on_failure), attempt


# --- output ------------------------------------------------------------------------

LINE = re.compile(r"\[default(\d)\]:line (\d+) of rank (\d)")


def test_100000_lines_reach_console_and_file_whole_and_in_order_through_a_slow_pipe(harness, tmp_path):
    n = 100_000
    h = harness(sup_worker(tmp_path, "print", n, "partial"), tee="1")
    received = []
    while True:  # a slow reader: small reads, a pause now and then
        chunk = h.proc.stdout.read(4096)
        if not chunk:
            break
        received.append(chunk)
        if len(received) % 64 == 0:
            time.sleep(0.01)
    code, _, err = h.finish()
    assert code == 0, err
    console = "".join(received).splitlines()
    st = json.load(open(h.state_path))
    for rank in range(2):
        mine = [line for line in console if line.startswith(f"[default{rank}]:")]
        expected = [f"[default{rank}]:line {i} of rank {rank}" for i in range(n)]
        expected.append(f"[default{rank}]:no newline at the end")
        assert mine == expected
        with open(os.path.join(st["attempt"], str(rank), "stdout.log")) as f:
            assert f.read() == "".join(f"line {i} of rank {rank}\n" for i in range(n)) + "no newline at the end"
    assert len(console) == 2 * (n + 1)


def test_redirects_tee_filters_and_prefix_template(harness, tmp_path):
    h = harness(
        sup_worker(tmp_path, "print", 3), tee="0:1", redirects="1:3", filters_out=["line 1 "],
        prefix_template="<${role_name}:${rank}:${local_rank}>",
    )
    code, out, err = h.finish()
    assert code == 0, err
    attempt = json.load(open(h.state_path))["attempt"]
    assert out.splitlines() == [f"<default:0:0>line {i} of rank 0" for i in range(3)]  # rank 1 is redirected
    for rank in range(2):
        with open(os.path.join(attempt, str(rank), "stdout.log")) as f:
            assert f.read() == "".join(f"line {i} of rank {rank}\n" for i in range(3))
    with open(os.path.join(attempt, "filtered_stdout.log")) as f:
        assert f.read() == "<default:0:0>line 1 of rank 0\n"  # only teed lines are filtered
    assert os.path.exists(os.path.join(attempt, "1", "stderr.log"))
    assert not os.path.exists(os.path.join(attempt, "0", "stderr.log"))


def test_plain_output_is_unprefixed_and_local_ranks_filter_hides_ranks(harness, tmp_path):
    h = harness(sup_worker(tmp_path, "print", 2), local_ranks_filter=[1])
    code, out, err = h.finish()
    assert code == 0, err
    assert out.splitlines() == ["line 0 of rank 1", "line 1 of rank 1"]


def test_teed_stderr_lines_are_prefixed_and_tailed(harness, tmp_path):
    h = harness(sup_worker(tmp_path, "stderr", 2), tee="2", filters_err=["line 1"], nproc=1)
    code, _, err = h.finish()
    assert code == 1
    assert "[default0]:error line 0\n[default0]:error line 1\n" in err
    attempt = json.load(open(h.state_path))["attempt"]
    with open(os.path.join(attempt, "filtered_stderr.log")) as f:
        assert f.read() == "[default0]:error line 1\n"
    assert h.exits()[0]["stderr_tail"] == ["error line 0", "error line 1"]
