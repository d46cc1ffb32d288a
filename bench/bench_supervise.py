"""Supervision against torchrun: how fast a failure tears the group down, and what watching costs.

(a) Teardown latency: one worker exits 1 at a random instant it records; the others
    record when their SIGTERM handler runs. Latency = their instant - its,
    over 4 x runs launches each of ours, the minimal loop (bench/bare.py: epoll
    on the pidfds, SIGTERM the others' process groups) and torchrun, taking
    turns (torchrun's depends on where its 0.1 s monitor period happens to
    be, so a few launches would not show it).
(b) Idle cost: the launcher process's CPU time (utime+stime from /proc) while
    it supervises 32 idle workers for 10 s.

Run as a script, this file is the worker of (a):
    bench_supervise.py DIR   (rank from $RANK / $LOCAL_RANK)
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time

from bench import bare as bare_loop
from bench.common import LAUNCHER, PYTHON, TORCHRUN, Row, bench_env, percentile, write_whole

HERE = os.path.abspath(__file__)
NPROC = 4
IDLE_WORKERS = 32
IDLE_SECONDS = 10.0
RATIO_TO_BARE = 2.0


def launch(command: list[str], nproc: int, argv: list[str], directory: str) -> subprocess.Popen:
    """``command --standalone --nproc-per-node=N`` of ``argv`` (a Python script, or a program with --no-python)."""
    args = argv[1:] if argv[0] == PYTHON else ["--no-python", *argv]
    return subprocess.Popen(command + ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", *args],
                            env=bench_env(), cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ours(nproc: int, argv: list[str], directory: str) -> subprocess.Popen:
    return launch(LAUNCHER, nproc, argv, directory)


def torchrun(nproc: int, argv: list[str], directory: str) -> subprocess.Popen:
    return launch(TORCHRUN, nproc, argv, directory)


def bare(nproc: int, argv: list[str], directory: str) -> subprocess.Popen:
    """The minimal loop (bench/bare.py): epoll on the workers' pidfds, SIGTERM the others' process groups."""
    args = [PYTHON, "-u", *argv[1:]] if argv[0] == PYTHON else argv
    return subprocess.Popen([PYTHON, bare_loop.__file__, "teardown", str(nproc), *args], env=bench_env(),
                            cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def teardown_latencies(launch) -> list[float]:
    """Milliseconds from one worker's exit to each other worker's SIGTERM handler, in one launch."""
    with tempfile.TemporaryDirectory() as directory:
        proc = launch(NPROC, [PYTHON, HERE, directory], directory)
        if proc.wait(timeout=120) == 0:
            raise RuntimeError("the launch succeeded although a worker failed")
        with open(os.path.join(directory, "exit")) as f:
            exited = float(f.read())
        samples = []
        for rank in range(1, NPROC):
            with open(os.path.join(directory, f"{rank}.term")) as f:
                samples.append((float(f.read()) - exited) * 1000)
        return samples


def idle_cpu_percent(launch) -> float:
    """The launcher's CPU time over IDLE_SECONDS of supervising idle workers, in % of one core."""
    with tempfile.TemporaryDirectory() as directory:
        proc = launch(IDLE_WORKERS, ["sleep", "1000"], directory)
        try:
            deadline = time.monotonic() + 120
            while len(sleeping_descendants(proc.pid)) < IDLE_WORKERS:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the idle workers did not start")
                time.sleep(0.05)
            time.sleep(1.0)  # let start-up work settle before the window
            before, start = cpu_seconds(proc.pid), time.monotonic()
            time.sleep(IDLE_SECONDS)
            used, elapsed = cpu_seconds(proc.pid) - before, time.monotonic() - start
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    return 100 * used / elapsed


def sleeping_descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                children = [int(c) for c in f.read().split()]
        except FileNotFoundError:
            continue
        frontier += children
        for child in children:
            try:
                with open(f"/proc/{child}/comm") as f:
                    if f.read().strip() == "sleep":
                        found.append(child)
            except FileNotFoundError:
                pass
    return found


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(runs: int) -> list[Row]:
    launchers = {"ours": ours, "bare": bare, "torchrun": torchrun}
    latency = {name: [] for name in launchers}
    for _ in range(4 * runs):  # the launchers take turns, so that a change in the machine's load falls on all
        for name, launch in launchers.items():
            latency[name] += teardown_latencies(launch)
    p50 = {name: percentile(samples, 50) for name, samples in latency.items()}
    cpu = {name: idle_cpu_percent(launch) for name, launch in (("ours", ours), ("torchrun", torchrun))}
    return [
        Row(f"teardown: worker exit -> others' SIGTERM, p50 ms ({NPROC} workers)", p50["ours"], p50["torchrun"],
            "torchrun", "ours < 5 ms and ours/peer <= 1/15",
            p50["ours"] < 5 and p50["ours"] * 15 <= p50["torchrun"]),
        Row(f"teardown: worker exit -> others' SIGTERM, p50 ms ({NPROC} workers)", p50["ours"], p50["bare"],
            "the minimal pidfd-to-kill loop", f"ours/peer <= {RATIO_TO_BARE:g}",
            p50["ours"] <= p50["bare"] * RATIO_TO_BARE),
        Row(f"launcher CPU supervising {IDLE_WORKERS} idle workers (% of a core)", cpu["ours"], cpu["torchrun"],
            "torchrun", "ours < 1%", cpu["ours"] < 1),
    ]


def worker(directory: str) -> None:
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    if rank == 0:
        while not all(os.path.exists(os.path.join(directory, f"{r}.ready")) for r in range(1, NPROC)):
            time.sleep(0.005)
        # A random instant, so that no launch is in step with a launcher's polling period.
        time.sleep(random.uniform(0, 0.2))
        write_whole(os.path.join(directory, "exit"), repr(time.time()))
        os._exit(1)

    def on_term(signum, frame):
        write_whole(os.path.join(directory, f"{rank}.term"), repr(time.time()))
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    write_whole(os.path.join(directory, f"{rank}.ready"), "")
    while True:
        signal.pause()


if __name__ == "__main__":
    worker(sys.argv[1])
