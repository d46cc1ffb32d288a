"""Acts as the launcher process around one WorkerGroup, with the agent's policy.

    python sup_harness.py SPEC.json

SPEC: {"nproc", "argv" (each "{rank}" becomes the local rank; or one argv per rank), "log_dir",
"redirects", "tee", "local_ranks_filter", "prefix_template", "filters_out",
"filters_err", "shutdown_timeout", "signals", "state", "threads"}. "threads": that many idle threads
are started first, as a program that embeds the launcher may have (they block no signal); the
harness then lets every worker exit and one of those threads take the SIGCHLD (no longer pending
for the process) before it first waits on the group. Once the workers run,
"state" gets {"launcher", "workers": {rank: pid}}; at the end, "<state>.exits"
gets every exit and the harness's zombie children at that point. Exit code:
0, 1 on a failure, 128+signum on a signal.
"""
import json
import os
import signal
import sys
import threading
import time

from launcher.logs import LogsSpecs, Std
from launcher.supervisor import EventKind, SignalWatch, WorkerGroup, WorkerLaunch


def main(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    nproc = spec.get("nproc", 2)
    logs = LogsSpecs(
        log_dir=spec["log_dir"],
        redirects=Std.from_str(spec.get("redirects", "0")),
        tee=Std.from_str(spec.get("tee", "0")),
        local_ranks_filter=set(spec["local_ranks_filter"]) if spec.get("local_ranks_filter") else None,
    )
    attempt = logs.attempt("run", 0, "default", {r: r for r in range(nproc)}, spec.get("prefix_template"))
    signals = [signal.Signals[name] for name in spec.get("signals", "SIGTERM,SIGINT,SIGHUP,SIGQUIT").split(",")]
    for _ in range(spec.get("threads", 0)):
        threading.Thread(target=threading.Event().wait, daemon=True).start()
    with SignalWatch(signals) as watch:
        argvs = spec["argv"] if isinstance(spec["argv"][0], list) else [spec["argv"]] * nproc
        workers = [
            WorkerLaunch(rank, rank, [arg.replace("{rank}", str(rank)) for arg in argvs[rank]],
                         dict(os.environ, RANK=str(rank)), attempt.workers[rank])
            for rank in range(nproc)
        ]
        group = WorkerGroup(
            workers, attempt, shutdown_timeout=spec.get("shutdown_timeout", 30.0), signal_watch=watch,
            duplicate_stdout_filters=spec.get("filters_out", ()), duplicate_stderr_filters=spec.get("filters_err", ()),
        )
        try:
            group.start()
        except OSError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        write_json(spec["state"], {"launcher": os.getpid(), "workers": group.pids(), "attempt": attempt.directory})
        if spec.get("threads"):
            while not (all(zombie(pid) for pid in group.pids().values()) and not sigchld_pending()):
                time.sleep(0.01)
        code = None
        while code is None:
            event = group.wait()
            if event.kind is EventKind.SIGNAL:
                group.stop(first_signal=event.signum)
                code = 128 + event.signum
            elif event.kind is EventKind.EXITED and any(e.failed for e in event.exits):
                group.stop()
                code = 1
            elif len(group.exits) == nproc:
                code = 0
        exits = group.stop()
        write_json(spec["state"] + ".exits", {"exits": [vars(e) | {"status": e.status} for e in exits],
                                              "zombies": zombie_children()})
        return code


def zombie(pid):
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0] == "Z"


def sigchld_pending():
    """Whether SIGCHLD is pending for the process as a whole (not yet taken by one of its threads)."""
    with open("/proc/self/status") as status:
        shared = int(next(line for line in status if line.startswith("ShdPnd:")).split()[1], 16)
    return bool(shared >> (signal.SIGCHLD - 1) & 1)


def zombie_children():
    zombies = []
    with open(f"/proc/self/task/{os.getpid()}/children") as f:
        for pid in f.read().split():
            if zombie(pid):
                zombies.append(int(pid))
    return zombies


def write_json(path, value):
    with open(path + ".tmp", "w") as f:
        json.dump(value, f)
    os.rename(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
