"""A 2-worker hello-world under our launcher and under torchrun: wall time and the launcher's peak RSS."""
import os

from bench.common import LAUNCHER, REPO, TORCHRUN, Row, median, run_measured

HELLO = os.path.join(REPO, "bench", "hello.py")
ARGS = ["--standalone", "--nproc-per-node=2", HELLO]


def measure(command, runs):
    walls, peaks = [], []
    for _ in range(runs):
        wall, peak = run_measured(command + ARGS, cwd=REPO)
        walls.append(wall)
        peaks.append(peak)
    return median(walls), median(peaks)


def run(runs: int) -> list[Row]:
    ours_wall, ours_rss = measure(LAUNCHER, runs)
    peer_wall, peer_rss = measure(TORCHRUN, runs)
    return [
        Row("2-worker hello-world wall time, python -m launcher (ms)", ours_wall * 1000, peer_wall * 1000,
            "torchrun", "ours/peer < 1", ours_wall < peer_wall),
        Row("2-worker hello-world launcher peak RSS, python -m launcher (MiB)", ours_rss / 1024, peer_rss / 1024,
            "torchrun", "ours/peer < 1", ours_rss < peer_rss),
    ]
