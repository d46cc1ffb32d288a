"""The single binary (dist/launcher, `make binary`) against torchrun and python -m launcher, in one run.

The figures: ``dist/launcher --version`` wall time; the 2-worker hello-world
of bench_launch.py, wall time against torchrun and against python -m launcher
(every launcher's workers run the virtualenv's Python: the binary is given it
with --python); the binary's size; the launcher's peak RSS in that
hello-world, the onefile bootloader and its child (the launcher) together.

Wall times are medians of runs that take turns (binary, python -m launcher,
torchrun, binary, ...), so a change in the machine's load falls on all of
them, and are timed without run_measured's RSS sampler, whose thread would
compete with the launchers for the cores; peak RSS comes from runs of its own.
"""
import os
import subprocess
import threading
import time

from bench.bench_launch import ARGS
from bench.common import LAUNCHER, PYTHON, REPO, TORCHRUN, Row, median, run_measured

BINARY = os.path.join(REPO, "dist", "launcher")
VERSION_TARGET_MS = 150
HELLO_RATIO_TO_TORCHRUN = 1 / 8
HELLO_RATIO_TO_PYTHON = 1.5  # what unpacking the bundle may add to python -m launcher
SIZE_TARGET_MB = 12
RSS_TARGET_MIB = 40
TIMEOUT = 120.0


def wall_seconds(argv) -> float:
    """From start to exit. A wait with a timeout polls (up to 50 ms late); this one blocks, and a timer ends a hang."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watchdog = threading.Timer(TIMEOUT, proc.kill)
    watchdog.start()
    try:
        code = proc.wait()
    finally:
        watchdog.cancel()
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {code}")
    return wall


def median_walls(commands: dict, runs: int) -> dict:
    """The median wall seconds of each command, the commands taking turns."""
    walls = {name: [] for name in commands}
    for _ in range(runs):
        for name, argv in commands.items():
            walls[name].append(wall_seconds(argv))
    return {name: median(values) for name, values in walls.items()}


def median_peak_rss_mib(argv, runs: int, watch_children: bool) -> float:
    return median([run_measured(argv, cwd=REPO, watch_children=watch_children)[1] for _ in range(runs)]) / 1024


def run(runs: int) -> list[Row]:
    if not os.path.exists(BINARY):
        raise SystemExit(f"{BINARY} is not built: run `make binary` first")
    hello = [BINARY, "--python", PYTHON, *ARGS]
    walls = median_walls({
        "version": [BINARY, "--version"],
        "python version": LAUNCHER + ["--version"],
        "hello": hello,
        "python hello": LAUNCHER + ARGS,
        "torchrun hello": TORCHRUN + ARGS,
    }, runs)
    ms = {name: wall * 1000 for name, wall in walls.items()}
    hello_rss = median_peak_rss_mib(hello, runs, watch_children=True)
    torchrun_rss = median_peak_rss_mib(TORCHRUN + ARGS, runs, watch_children=False)
    size_mb = os.path.getsize(BINARY) / 1e6
    return [
        Row("dist/launcher --version wall time (ms)", ms["version"], ms["python version"], "python -m launcher",
            f"ours < {VERSION_TARGET_MS} ms", ms["version"] < VERSION_TARGET_MS),
        Row("2-worker hello-world wall time, dist/launcher (ms)", ms["hello"], ms["torchrun hello"], "torchrun",
            "ours/peer <= 1/8", ms["hello"] <= ms["torchrun hello"] * HELLO_RATIO_TO_TORCHRUN),
        Row("2-worker hello-world wall time, dist/launcher (ms)", ms["hello"], ms["python hello"], "python -m launcher",
            f"ours/peer <= {HELLO_RATIO_TO_PYTHON}", ms["hello"] <= ms["python hello"] * HELLO_RATIO_TO_PYTHON),
        Row("dist/launcher size (MB)", size_mb, None, "", f"ours < {SIZE_TARGET_MB} MB", size_mb < SIZE_TARGET_MB),
        Row("2-worker hello-world launcher peak RSS, dist/launcher: bootloader + launcher (MiB)", hello_rss,
            torchrun_rss, "torchrun", f"ours < {RSS_TARGET_MIB} MiB", hello_rss < RSS_TARGET_MIB),
    ]
