"""Restart: from a worker's failure to every worker of the next attempt running its first line.

Two workers; in the first attempt both get ready (the ``import torch``
variant imports torch first, so the group to end is as heavy as a real
one), then rank 0 records the instant it exits 1. Every worker records the
instant its first line runs; the figure is the last such instant of the
second attempt less the failure's. Each launch, ours (``python -m launcher
--max-restarts=1``), the bare respawn (bench/bare.py: on the failure's
pidfd, SIGTERM the others' process groups, wait for them, start the same
workers again) and torchrun take turns run by run; medians of 3 x runs (a
restart is over in tens of milliseconds, which a shared machine's load moves
by several). A torchrun launch that does not restart successfully is
counted, not timed.

Run as a script, this file is the worker: ``bench_restart.py DIR [torch]``.
"""
from __future__ import annotations

import time

FIRST_LINE = time.time()  # the worker's first line: nothing before it but the clock

import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

from bench import bare  # noqa: E402
from bench.common import LAUNCHER, PYTHON, TORCHRUN, Row, bench_env, median, write_whole  # noqa: E402

HERE = os.path.abspath(__file__)
NPROC = 2
RATIO_TO_BARE = 1.25
RATIO_TO_TORCHRUN = 1 / 4
TIMEOUT = 300


def worker(directory: str, with_torch: bool) -> None:
    rank = int(os.environ["RANK"])
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    write_whole(os.path.join(directory, f"{attempt}.{rank}.first"), repr(FIRST_LINE))
    if with_torch:
        import torch  # noqa: F401
    if attempt > 0:
        return
    write_whole(os.path.join(directory, f"{rank}.ready"), "")
    if rank == 0:
        while not all(os.path.exists(os.path.join(directory, f"{r}.ready")) for r in range(NPROC)):
            time.sleep(0.005)
        time.sleep(random.uniform(0, 0.05))  # out of step with anything periodic in a launcher
        write_whole(os.path.join(directory, "exit"), repr(time.time()))
        os._exit(1)
    while True:
        signal.pause()


def restart_ms(command: list[str], with_torch: bool) -> float | None:
    """One launch's failure-to-next-attempt time; None when it did not restart and succeed."""
    with tempfile.TemporaryDirectory() as directory:
        argv = [*command, HERE, directory, *(["torch"] if with_torch else [])]
        code = subprocess.run(argv, env=bench_env(), cwd=directory, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=TIMEOUT).returncode
        firsts = [os.path.join(directory, f"1.{rank}.first") for rank in range(NPROC)]
        if code != 0 or not all(os.path.exists(path) for path in firsts):
            return None
        with open(os.path.join(directory, "exit")) as f:
            exited = float(f.read())
        return (max(float(open(path).read()) for path in firsts) - exited) * 1000


def run(runs: int) -> list[Row]:
    commands = {
        "ours": LAUNCHER + ["--standalone", f"--nproc-per-node={NPROC}", "--max-restarts=1"],
        "bare": [PYTHON, bare.__file__, "respawn", str(NPROC), PYTHON, "-u"],
        "torchrun": TORCHRUN + ["--standalone", f"--nproc-per-node={NPROC}", "--max-restarts=1"],
    }
    rows = []
    for with_torch in (False, True):
        samples = {name: [] for name in commands}
        for _ in range(3 * runs):
            for name, command in commands.items():
                samples[name].append(restart_ms(command, with_torch))
        ms = {name: median([s for s in values if s is not None]) if any(s is not None for s in values) else None
              for name, values in samples.items()}
        if None in (ms["ours"], ms["bare"]) or samples["ours"].count(None) or samples["bare"].count(None):
            raise RuntimeError(f"a restart did not complete: {samples}")
        failed = samples["torchrun"].count(None)
        workers = "workers import torch" if with_torch else "workers without torch"
        rows += [
            Row(f"restart: worker failure -> next attempt's first line, {workers} (ms)", ms["ours"], ms["bare"],
                "a bare respawn", f"ours/peer <= {RATIO_TO_BARE:g}", ms["ours"] <= ms["bare"] * RATIO_TO_BARE),
            Row(f"restart: worker failure -> next attempt's first line, {workers} (ms)", ms["ours"], ms["torchrun"],
                f"torchrun ({failed}/{3 * runs} restarts failed)" if failed else "torchrun", "ours/peer <= 1/4",
                ms["torchrun"] is None or ms["ours"] <= ms["torchrun"] * RATIO_TO_TORCHRUN),
        ]
    return rows


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2:] == ["torch"])
