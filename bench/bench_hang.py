"""A hung worker under torch's file timer: from its timer's deadline to its kill, ours against torchrun's watchdog.

One worker acquires a timer through torch's own ``FileTimerClient`` (the
launcher's environment has ``TORCHELASTIC_ENABLE_FILE_TIMER=1``), writes its
pid and the deadline, and sleeps past it. The benchmark watches the worker's
flags in /proc and takes the instant it starts to exit; latency = that
instant - the deadline. Ours captures the worker's Python stack before it
kills it (that is in the figure); torchrun's watchdog reads its FIFO every 0.1 s,
kills the worker, then kills its own agent, so its figure depends on where
the deadline falls in that period (at random: the medians are over 3 x runs
launches each). The launchers take turns, so a change in the machine's load
falls on both.

Run as a script, this file is the worker: ``bench_hang.py DIR``.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time

from bench.common import LAUNCHER, TORCHRUN, Row, bench_env, median

HERE = os.path.abspath(__file__)
AFTER = 1.0  # seconds from the worker's request to its deadline, plus up to WATCHDOG_PERIOD
WATCHDOG_PERIOD = 0.1  # torchrun's FileTimerServer max_interval
TIMEOUT = 120.0
TARGET_MS = 50
PF_EXITING = 0x4  # <linux/sched.h>


def timer_env(directory: str) -> dict:
    """The timer enabled, its FIFO in ``directory`` (torchrun's watchdog kills its agent, which leaves the FIFO)."""
    return {**bench_env(), "TORCHELASTIC_ENABLE_FILE_TIMER": "1",
            "TORCHELASTIC_TIMER_FILE": os.path.join(directory, "timer.fifo")}


def expiry_to_kill_ms(command: list[str]) -> float:
    """One launch of one worker whose timer expires; milliseconds from its deadline to its being killed."""
    with tempfile.TemporaryDirectory() as directory:
        proc = subprocess.Popen(command + ["--standalone", "--nproc-per-node=1", HERE, directory],
                                env=timer_env(directory), cwd=directory,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ready = os.path.join(directory, "deadline")
            started = time.monotonic()
            while not os.path.exists(ready):
                if proc.poll() is not None or time.monotonic() - started > TIMEOUT:
                    raise RuntimeError(f"{command[-1]}: the worker did not start")
                time.sleep(0.01)
            with open(ready) as f:
                pid, deadline = f.read().split()
            time.sleep(max(0.0, float(deadline) - time.time() - 0.05))
            killed = killed_at(int(pid), float(deadline) + TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.wait(timeout=TIMEOUT)
    return (killed - float(deadline)) * 1000


def killed_at(pid: int, give_up: float) -> float:
    """When the process started to exit (PF_EXITING in /proc/<pid>/stat's flags, set as a SIGKILL is taken),
    before the kernel's teardown of its memory, which takes tens of ms after a torch import and is no
    launcher's doing. Polled every 0.2 ms over the short window around the deadline."""
    while time.time() < give_up:
        try:
            with open(f"/proc/{pid}/stat") as f:
                flags = int(f.read().rpartition(")")[2].split()[6])
        except (FileNotFoundError, ProcessLookupError):
            return time.time()
        if flags & PF_EXITING:
            return time.time()
        time.sleep(0.0002)
    raise RuntimeError(f"the worker outlived its timer by {TIMEOUT:g} s")


def run(runs: int) -> list[Row]:
    samples = {"ours": [], "torchrun": []}
    for _ in range(3 * runs):
        samples["ours"].append(expiry_to_kill_ms(LAUNCHER))
        samples["torchrun"].append(expiry_to_kill_ms(TORCHRUN))
    ours, peer = median(samples["ours"]), median(samples["torchrun"])
    return [
        Row("timer expiry -> hung worker killed, median ms (ours captures its stack first)", ours, peer, "torchrun",
            f"ours < {TARGET_MS} ms and ours <= peer", ours < TARGET_MS and ours <= peer),
    ]


def worker(directory: str) -> None:
    from torch.distributed.elastic.timer import FileTimerClient

    client = FileTimerClient(os.environ["TORCHELASTIC_TIMER_FILE"])
    # A random instant, so that no deadline is in step with torchrun's watchdog period.
    deadline = time.time() + AFTER + random.uniform(0, WATCHDOG_PERIOD)
    client.acquire("bench", deadline)
    with open(os.path.join(directory, "deadline.tmp"), "w") as out:
        out.write(f"{os.getpid()} {deadline!r}")
    os.rename(os.path.join(directory, "deadline.tmp"), os.path.join(directory, "deadline"))
    time.sleep(TIMEOUT)
    sys.exit(0)


if __name__ == "__main__":
    worker(sys.argv[1])
