"""The single binary (dist/launcher, `make binary`) against torchrun and python -m launcher, in one run.

The figures: ``dist/launcher --version`` wall time; the 2-worker hello-world
of bench_launch.py, wall time against torchrun, python -m launcher and the
bare workers (bench/bare.py; every launcher's workers run the virtualenv's
Python: the binary is given it with --python); the binary's size; the
launcher's peak RSS in that hello-world. Every start but the first of a user on
a machine runs the copy of the bundle the first unpacked: the
wall times are those of later starts (one start unpacks the copy before they
are measured); the first start is a figure of its own, each run with an empty
$TMPDIR.

Wall times are medians of runs that take turns (bare workers, binary,
python -m launcher, torchrun, bare workers, ...), so a change in the
machine's load falls on all of them, and are timed without run_measured's RSS sampler, whose thread would
compete with the launchers for the cores; peak RSS comes from runs of its own.
"""
import os
import tempfile

from bench.bench_launch import ARGS, bare_seconds
from bench.common import LAUNCHER, PYTHON, REPO, TORCHRUN, Row, median, median_walls, run_measured, wall_seconds

BINARY = os.path.join(REPO, "dist", "launcher")
VERSION_TARGET_MS = 150
HELLO_RATIO_TO_TORCHRUN = 1 / 8
HELLO_RATIO_TO_PYTHON = 1.5  # what the binary may add to python -m launcher
HELLO_RATIO_TO_BARE = 2.5
SIZE_TARGET_MB = 12
RSS_TARGET_MIB = 40


def median_peak_rss_mib(argv, runs: int) -> float:
    return median([run_measured(argv, cwd=REPO)[1] for _ in range(runs)]) / 1024


def run(runs: int) -> list[Row]:
    if not os.path.exists(BINARY):
        raise SystemExit(f"{BINARY} is not built: run `make binary` first")
    hello = [BINARY, "--python", PYTHON, *ARGS]
    commands = {
        "version": [BINARY, "--version"],
        "python version": LAUNCHER + ["--version"],
        "hello": hello,
        "python hello": LAUNCHER + ARGS,
        "torchrun hello": TORCHRUN + ARGS,
    }
    wall_seconds([BINARY, "--version"])  # unpacks the copy the other starts run

    def first_start() -> float:
        with tempfile.TemporaryDirectory() as tmpdir:
            return wall_seconds([BINARY, "--version"], env={**os.environ, "TMPDIR": tmpdir})

    walls = median_walls({"bare hello": bare_seconds, "first version": first_start,
                          **{name: lambda argv=argv: wall_seconds(argv) for name, argv in commands.items()}}, runs)
    ms = {name: wall * 1000 for name, wall in walls.items()}
    hello_rss = median_peak_rss_mib(hello, runs)
    torchrun_rss = median_peak_rss_mib(TORCHRUN + ARGS, runs)
    size_mb = os.path.getsize(BINARY) / 1e6
    return [
        Row("dist/launcher --version wall time (ms)", ms["version"], ms["python version"], "python -m launcher",
            f"ours < {VERSION_TARGET_MS} ms", ms["version"] < VERSION_TARGET_MS),
        Row("dist/launcher --version wall time, a user's first start: unpacking the bundle (ms)", ms["first version"],
            ms["python version"], "python -m launcher", f"ours < {VERSION_TARGET_MS} ms",
            ms["first version"] < VERSION_TARGET_MS),
        Row("2-worker hello-world wall time, dist/launcher (ms)", ms["hello"], ms["torchrun hello"], "torchrun",
            "ours/peer <= 1/8", ms["hello"] <= ms["torchrun hello"] * HELLO_RATIO_TO_TORCHRUN),
        Row("2-worker hello-world wall time, dist/launcher (ms)", ms["hello"], ms["python hello"], "python -m launcher",
            f"ours/peer <= {HELLO_RATIO_TO_PYTHON}", ms["hello"] <= ms["python hello"] * HELLO_RATIO_TO_PYTHON),
        Row("2-worker hello-world wall time, dist/launcher (ms)", ms["hello"], ms["bare hello"], "the bare workers",
            f"ours/peer <= {HELLO_RATIO_TO_BARE:g}", ms["hello"] <= ms["bare hello"] * HELLO_RATIO_TO_BARE),
        Row("dist/launcher size (MB)", size_mb, None, "", f"ours < {SIZE_TARGET_MB} MB", size_mb < SIZE_TARGET_MB),
        Row("2-worker hello-world launcher peak RSS, dist/launcher (MiB)", hello_rss,
            torchrun_rss, "torchrun", f"ours < {RSS_TARGET_MIB} MiB", hello_rss < RSS_TARGET_MIB),
    ]
