"""What every benchmark shares: the result row and ways to time processes.

A benchmark is a module ``bench/bench_<name>.py`` with ``run(runs: int) -> list[Row]``
that measures ours and its peer (torchrun, torch's TCPStore...) in the same run.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable  # the venv's interpreter: it has torch for the peers
LAUNCHER = [PYTHON, "-m", "launcher"]
TORCHRUN = [PYTHON, "-m", "torch.distributed.run"]


@dataclass
class Row:
    figure: str  # what is measured, with its unit: "2-worker hello-world wall time (ms)"
    ours: float
    peer: float | None  # the same figure for the peer, None when the peer has none
    peer_name: str  # "torchrun", "torch TCPStore (libuv)"
    target: str  # the goal in words: "ours/peer <= 0.125"
    met: bool

    @property
    def ratio(self) -> float | None:
        return self.ours / self.peer if self.peer else None

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def bench_env() -> dict:
    """This environment without a launcher's or Slurm's variables, with the repository importable (bench.*)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC_", "SLURM_"))}
    env["PYTHONPATH"] = REPO
    return env


def wall_seconds(argv, *, env=None, timeout=120.0) -> float:
    """From start to exit, output discarded. A wait with a timeout polls (up to 50 ms late); this one blocks,
    and a timer ends a hang."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        code = proc.wait()
    finally:
        watchdog.cancel()
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {code}")
    return wall


def median_walls(measures: dict, runs: int) -> dict:
    """The median of each measure (a function returning seconds), the measures taking turns run by run, so
    that a change in the machine's load falls on all of them."""
    walls = {name: [] for name in measures}
    for _ in range(runs):
        for name, measure in measures.items():
            walls[name].append(measure())
    return {name: median(values) for name, values in walls.items()}


def write_whole(path: str, text: str) -> None:
    """Write path aside and rename it, so a reader sees it whole or not at all (the workers' records)."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)


def median(values) -> float:
    return statistics.median(values)


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def peak_rss_kib(pid: int) -> int:
    """VmHWM of one live process, 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_measured(argv, *, env=None, cwd=None, timeout=120):
    """Run a command; return (wall seconds, peak RSS in KiB of the process itself).

    The peak is the process's own VmHWM, sampled until it exits, so workers it
    starts are not counted.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, peak_rss_kib(proc.pid))
            done.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {proc.returncode}: {stderr.decode()[-2000:]}")
    return wall, peak

