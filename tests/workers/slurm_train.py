"""A gloo worker for the Slurm tests: all-reduce rank + 1, record where it ran, optionally wait, all-reduce again.

    slurm_train.py DIR [--hold]

Writes DIR/<RANK>.json (rank, local and group rank, world size, hostname, the sum,
the restart count, the pid, the Slurm job) after the first all-reduce. With --hold it
then writes DIR/<RANK>.ready and waits for DIR/go before a second all-reduce, whose
sum it writes to DIR/<RANK>.done, so that a test can signal or kill mid-job; every
SIGUSR1 it gets is appended to DIR/<RANK>.signals, and the worker carries on.
"""
import json
import os
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist

out_dir = sys.argv[1]
hold = "--hold" in sys.argv[2:]
rank = int(os.environ["RANK"])


def record_signal(signum, frame):
    with open(os.path.join(out_dir, f"{rank}.signals"), "a") as out:
        out.write(f"{signal.Signals(signum).name}\n")


signal.signal(signal.SIGUSR1, record_signal)
dist.init_process_group("gloo")
total = torch.tensor([rank + 1.0])
dist.all_reduce(total)
record = {
    "rank": rank,
    "local_rank": int(os.environ["LOCAL_RANK"]),
    "group_rank": int(os.environ["GROUP_RANK"]),
    "world_size": dist.get_world_size(),
    "hostname": socket.gethostname(),
    "sum": total.item(),
    "restarts": int(os.environ["TORCHELASTIC_RESTART_COUNT"]),
    "pid": os.getpid(),
    "job": os.environ["SLURM_JOB_ID"],
}
# Whole or not at all: a test may read it while a restarted attempt rewrites it.
with open(os.path.join(out_dir, f"{rank}.json.part"), "w") as out:
    json.dump(record, out)
os.replace(os.path.join(out_dir, f"{rank}.json.part"), os.path.join(out_dir, f"{rank}.json"))
if hold:
    with open(os.path.join(out_dir, f"{rank}.ready"), "w") as out:
        out.write(str(os.getpid()))
    while not os.path.exists(os.path.join(out_dir, "go")):
        time.sleep(0.05)
    dist.all_reduce(total)
    with open(os.path.join(out_dir, f"{rank}.done"), "w") as out:
        json.dump({"sum": total.item(), "world_size": dist.get_world_size()}, out)
dist.destroy_process_group()
