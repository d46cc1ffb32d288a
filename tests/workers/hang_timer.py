"""torch's file timer in a gloo job, from the worker's side: ``hang_timer.py MODE DIR``.

MODE:
  expire   rank 0 all-reduces inside ``expires(after=1, scope="allreduce")``, which
           rank 1 never joins: it hangs until the agent ends it
  release  both ranks all-reduce inside ``expires(after=1)``, then live past the deadline; exit 0
  restart  attempt 0 as ``expire``; attempt 1 all-reduces and exits 0
  garbage  rank 0 first writes into the FIFO what torch's client never writes (see below),
           then hangs as in ``expire`` inside scope "after-garbage"
  signal0  rank 0 holds a timer whose signal is 0 past its deadline; exit 0

Each rank writes DIR/<rank>.ready once its timer client is configured.
"""
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.elastic.timer import FileTimerClient, configure, expires

TIMER_FILE = os.environ["TORCHELASTIC_TIMER_FILE"]


def hang_in_allreduce():
    dist.all_reduce(torch.ones(1))


def wait_for_teardown():
    while True:
        time.sleep(1)


def live_past(deadline):
    while time.time() < deadline:
        time.sleep(0.1)


def write_garbage(directory):
    """Bad lines, a request for a pid that is not a worker (the launcher's), a line whose writer closes
    mid-line, then a flood of junk larger than the FIFO and than what the agent reads in one turn."""
    stranger = os.getppid()
    with open(os.path.join(directory, "stranger"), "w") as out:
        out.write(str(stranger))
    with open(TIMER_FILE, "wb") as fifo:
        fifo.write(b"this is not json\n")
        fifo.write(b'{"pid": %d, "expiration_time": 1.0, "signal": 9}\n' % os.getpid())  # no scope_id
        fifo.write(json.dumps({"version": 1, "pid": stranger, "scope_id": "stranger", "expiration_time": time.time(),
                               "signal": 9}).encode() + b"\n")
    with open(TIMER_FILE, "wb") as fifo:
        fifo.write(b'{"version": 1, "pid": %d, "scope_id": "cut sh' % os.getpid())
    with open(TIMER_FILE, "wb") as fifo:
        fifo.write(b"junk line of the flood, as long as a request would be, or nearly so\n" * 8192)


def main():
    mode, directory = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))  # a stuck start fails, with its error
    configure(FileTimerClient(TIMER_FILE))
    with open(os.path.join(directory, f"{rank}.ready"), "w"):
        pass
    if mode == "release":
        with expires(after=1, scope="quick"):
            dist.all_reduce(torch.ones(1))
        live_past(time.time() + 2)
        dist.barrier()
    elif mode == "signal0":
        if rank == 0:
            with expires(after=0.5, scope="no signal", client=FileTimerClient(TIMER_FILE, signal=0)):
                live_past(time.time() + 2)
        dist.barrier()
    elif mode == "restart" and attempt == 1:
        dist.all_reduce(torch.ones(1))
        with open(os.path.join(directory, f"attempt1_{rank}"), "w"):
            pass
    elif rank == 0:
        if mode == "garbage":
            write_garbage(directory)
        with expires(after=1, scope="after-garbage" if mode == "garbage" else "allreduce"):
            hang_in_allreduce()
    else:
        wait_for_teardown()
    dist.destroy_process_group()


main()
