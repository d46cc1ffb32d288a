"""Run the benchmarks side by side with their peers and print one table.

    python -m bench            # every bench/bench_*.py
    python -m bench launch     # only bench_launch.py
    python -m bench --runs 9   # more repetitions where a figure is a median

The rows are also written to bench/results.json. The launcher's modules are
byte-compiled first, as ``pip install`` leaves them: a checkout run with
PYTHONDONTWRITEBYTECODE (or without write access) would otherwise compile
every module at every start, which no installed launcher does.
"""
import argparse
import compileall
import importlib
import json
import os
import pkgutil
import sys

from bench.common import REPO

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--runs", type=int, default=5, help="repetitions per figure (default: 5)")
    args = parser.parse_args(argv)
    available = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([HERE]) if m.name.startswith("bench_"))
    unknown = set(args.names) - set(available)
    if unknown:
        parser.error(f"unknown benchmark {', '.join(sorted(unknown))}; available: {', '.join(available)}")
    compileall.compile_dir(os.path.join(REPO, "launcher"), quiet=1)
    rows = []
    for name in args.names or available:
        module = importlib.import_module(f"bench.bench_{name}")
        print(f"== {name}", file=sys.stderr, flush=True)
        rows.extend(module.run(args.runs))
    print_table(rows)
    with open(os.path.join(REPO, "bench", "results.json"), "w") as out:
        json.dump([row.as_dict() for row in rows], out, indent=2)
    return 0 if all(row.met for row in rows) else 1


def fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def print_table(rows) -> None:
    header = ("figure", "ours", "peer", "ratio", "target", "met")
    lines = [
        (r.figure, fmt(r.ours), f"{fmt(r.peer)} ({r.peer_name})" if r.peer is not None else "-",
         fmt(r.ratio), r.target, "yes" if r.met else "NO")
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    for line in [header, tuple("-" * w for w in widths), *lines]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
