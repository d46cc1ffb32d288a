"""A lost node: from its ``kill -9`` to the survivors' workers running again, against the keep-alive bound.

Three c10d nodes (launchers on 127.0.0.2-4, --nnodes=2:3, one worker each; keep_alive_interval=1
x keep_alive_max_attempt=3: a node is dead 3 s after its last heartbeat; a last call of 1 s).
The first attempt's workers block forever, as ranks sit in NCCL when a peer vanishes: torchrun's
survivors stay there until NCCL's own timeout, minutes later. Once every worker runs, the third
node's launcher is killed; the figure is the time from then until both survivors' workers of the
next attempt run, as a ratio of the keep-alive bound. What it adds to the bound: up to two
heartbeat checks (a member is lost when two checks an interval apart find it dead), stopping the
blocked workers, the rendezvous' last call, starting the new workers.

Run as a script, this file is the worker:
    bench_lost_node.py DIR
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from bench.common import LAUNCHER, REPO, Row, median

HERE = os.path.abspath(__file__)
INTERVAL, ATTEMPTS, LAST_CALL = 1, 3, 1
LIVENESS = INTERVAL * ATTEMPTS
NODES = 3
TIMEOUT = 120  # seconds for one loss and recovery: past it the bench fails


def worker(directory: str) -> None:
    """Record when this attempt's worker started; the first attempt's then blocks until it is ended."""
    restart = os.environ["TORCHELASTIC_RESTART_COUNT"]
    with open(os.path.join(directory, f"{restart}_{os.environ['RANK']}"), "w") as out:
        out.write(repr(time.time()))
    if restart == "0":
        time.sleep(10**6)


def _wait_for(paths: list[str], procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not all(os.path.exists(path) for path in paths):
        if time.monotonic() > deadline or any(proc.poll() is not None for proc in procs):
            raise RuntimeError("the nodes did not start their workers")
        time.sleep(0.01)


def one_loss(directory: str) -> float:
    """Seconds from killing a node's launcher until every survivor's next attempt runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.2", 0))
        endpoint = f"127.0.0.2:{sock.getsockname()[1]}"
    conf = f"keep_alive_interval={INTERVAL},keep_alive_max_attempt={ATTEMPTS},last_call_timeout={LAST_CALL}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC_", "SLURM_"))}
    env["PYTHONPATH"] = REPO  # the worker is this file, which imports bench.common
    nodes = [
        subprocess.Popen(
            LAUNCHER + [f"--nnodes=2:{NODES}", "--nproc-per-node=1", "--rdzv-backend=c10d",
                        f"--rdzv-endpoint={endpoint}", "--rdzv-id=bench-lost-node", f"--local-addr=127.0.0.{2 + i}",
                        f"--rdzv-conf={conf},is_host={'true' if i == 0 else 'false'}", HERE, directory],
            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        for i in range(NODES)
    ]
    try:
        _wait_for([os.path.join(directory, f"0_{rank}") for rank in range(NODES)], nodes)
        nodes[-1].send_signal(signal.SIGKILL)  # not node 0: it hosts the store
        killed = time.time()
        for node in nodes[:-1]:
            _, stderr = node.communicate(timeout=TIMEOUT)
            if node.returncode != 0:
                raise RuntimeError(f"a survivor exited {node.returncode}: {stderr.decode()[-2000:]}")
        return max(float(open(os.path.join(directory, f"1_{rank}")).read()) for rank in range(NODES - 1)) - killed
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
            node.communicate()


def run(runs: int) -> list[Row]:
    recoveries = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as directory:
            recoveries.append(one_loss(directory))
    seconds = median(recoveries)
    return [Row("lost node (kill -9) to the survivors' workers running again (s)", seconds, LIVENESS,
                f"keep-alive bound ({INTERVAL} s x {ATTEMPTS}); torchrun: never (NCCL's timeout)",
                "ours/peer <= 2.5", seconds <= 2.5 * LIVENESS)]


if __name__ == "__main__":
    worker(sys.argv[1])
