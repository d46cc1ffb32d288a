"""A 2-worker hello-world under python -m launcher, against the bare workers and torchrun: wall time, and
the launcher's peak RSS.

The bare workers (bench/bare.py) are the floor: the same two worker commands
with a launcher's environment, started in parallel by the benchmark itself
and waited for. Wall times are medians of runs that take turns (bare,
python -m launcher, torchrun, bare, ...), timed without run_measured's RSS
sampler, whose thread would compete with the launchers for the cores; peak
RSS comes from runs of its own.
"""
import os
import time

from bench import bare
from bench.common import LAUNCHER, PYTHON, REPO, TORCHRUN, Row, median, median_walls, run_measured, wall_seconds

HELLO = os.path.join(REPO, "bench", "hello.py")
NPROC = 2
ARGS = ["--standalone", f"--nproc-per-node={NPROC}", HELLO]
WORKER = [PYTHON, "-u", HELLO]  # what a launcher runs for each worker
RATIO_TO_BARE = 2.0


def bare_seconds() -> float:
    start = time.perf_counter()
    codes = bare.run(WORKER, NPROC)
    wall = time.perf_counter() - start
    if any(codes):
        raise RuntimeError(f"the bare hello-world workers exited {codes}")
    return wall


def run(runs: int) -> list[Row]:
    walls = median_walls({
        "bare": bare_seconds,
        "ours": lambda: wall_seconds(LAUNCHER + ARGS),
        "torchrun": lambda: wall_seconds(TORCHRUN + ARGS),
    }, runs)
    ms = {name: wall * 1000 for name, wall in walls.items()}
    ours_rss = median([run_measured(LAUNCHER + ARGS, cwd=REPO)[1] for _ in range(runs)]) / 1024
    peer_rss = median([run_measured(TORCHRUN + ARGS, cwd=REPO)[1] for _ in range(runs)]) / 1024
    return [
        Row("2-worker hello-world wall time, python -m launcher (ms)", ms["ours"], ms["bare"],
            "the bare workers", f"ours/peer <= {RATIO_TO_BARE:g}", ms["ours"] <= ms["bare"] * RATIO_TO_BARE),
        Row("2-worker hello-world wall time, python -m launcher (ms)", ms["ours"], ms["torchrun"],
            "torchrun", "ours/peer < 1", ms["ours"] < ms["torchrun"]),
        Row("2-worker hello-world launcher peak RSS, python -m launcher (MiB)", ours_rss, peer_rss,
            "torchrun", "ours/peer < 1", ours_rss < peer_rss),
    ]
