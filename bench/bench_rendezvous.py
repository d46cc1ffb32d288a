"""One rendezvous round of N simulated agents against one store: ours (c10d backend)
against torch's DynamicRendezvousHandler over its C10dRendezvousBackend on a torch TCPStore.

Every agent is a thread with its own store connection and handler, as a real
agent has; all start next_rendezvous() together (min = max = N, so the round
completes as soon as the last one joins). Two figures per N:

- wall time until the last agent returned;
- store operations the agents made meanwhile (ours: every call on our store
  clients; torch: every call of its rendezvous backend on the state), the cost
  the store host pays, and what shows how a protocol grows with N.

On one machine the agents' threads share one interpreter lock and a few cores,
so wall time grows faster than the protocol's work; the third figure puts it
beside the cheapest possible rendezvous on the same threads (each agent one
add and one wait on our store). Each measurement runs in a fresh process:

    python -m bench.bench_rendezvous ours 64     # prints {"seconds": ..., "ops": ...}
"""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
import uuid

from bench.common import PYTHON, REPO, Row, median

SIZES = (16, 64, 256)
TIMEOUT = 600  # join timeout of ours and torch's: a round must complete within it
TORCH_LIMIT = 300  # seconds torch's round may take before we stop it and report the limit
PEER = "torch DynamicRendezvousHandler (c10d)"


def _agents_together(handlers, call, ops) -> tuple[float, list]:
    """Start call(handler) in one thread per handler at once; seconds until all returned."""
    results: list = [None] * len(handlers)
    start = threading.Barrier(len(handlers) + 1)

    def agent(i):
        start.wait()
        results[i] = call(handlers[i])

    threads = [threading.Thread(target=agent, args=(i,), daemon=True) for i in range(len(handlers))]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    counted = next(ops)
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    if None in results:
        raise RuntimeError("an agent did not finish its rendezvous")
    return elapsed, next(ops) - counted - 1, results


def _counting(cls, ops):
    """``cls`` with every store operation counted in ``ops``."""
    names = ("set", "get", "add", "compare_set", "check", "wait", "append", "multi_get", "multi_set", "delete_key")

    def counted(name):
        def call(self, *args, **kwargs):
            next(ops)
            return getattr(cls, name)(self, *args, **kwargs)

        return call

    return type(f"Counting{cls.__name__}", (cls,), {name: counted(name) for name in names})


def ours(n: int) -> dict:
    from launcher.rendezvous import RendezvousParameters, c10d, create_handler
    from launcher.store import TCPStore

    ops = itertools.count()
    c10d.TCPStore = _counting(TCPStore, ops)
    host = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    run_id = uuid.uuid4().hex
    config = {"is_host": "false", "join_timeout": str(TIMEOUT), "read_timeout": str(TIMEOUT)}
    handlers = [
        create_handler(
            RendezvousParameters("c10d", f"127.0.0.1:{host.port}", run_id, n, n, 1, local_addr="127.0.0.1",
                                 config=config)
        )
        for _ in range(n)
    ]
    elapsed, count, infos = _agents_together(handlers, lambda h: h.next_rendezvous(), ops)
    if sorted(i.rank for i in infos) != list(range(n)) or len({i.master_port for i in infos}) != 1:
        raise RuntimeError("ours: the agents disagree")
    for handler in handlers:
        handler.shutdown()
    host.close()
    return {"seconds": elapsed, "ops": count}


def torch_dynamic(n: int) -> dict:
    from datetime import timedelta

    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous.api import RendezvousParameters
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    ops = itertools.count()

    class CountingStore:
        """What the backend sees of the store: every call counted."""

        def __init__(self, store):
            self._store = store

        def __getattr__(self, name):
            operation = getattr(self._store, name)

            def call(*args, **kwargs):
                next(ops)
                return operation(*args, **kwargs)

            return call

    host = TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True, wait_for_workers=False)
    run_id = uuid.uuid4().hex
    handlers = []
    for _ in range(n):
        store = TCPStore("127.0.0.1", host.port, is_master=False, timeout=timedelta(seconds=TIMEOUT))
        params = RendezvousParameters("c10d", f"127.0.0.1:{host.port}", run_id, n, n, local_addr="127.0.0.1",
                                      join_timeout=TIMEOUT)
        handlers.append(create_handler(store, C10dRendezvousBackend(CountingStore(store), run_id), params))
    elapsed, count, infos = _agents_together(handlers, lambda h: h.next_rendezvous(), ops)
    if sorted(i.rank for i in infos) != list(range(n)):
        raise RuntimeError("torch: the agents disagree")
    return {"seconds": elapsed, "ops": count}


def floor(n: int) -> dict:
    """The cheapest rendezvous on these threads: one add and one wait per agent."""
    from launcher.store import TCPStore

    ops = itertools.count()
    host = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    clients = [_counting(TCPStore, ops)("127.0.0.1", host.port, timeout=TIMEOUT) for _ in range(n)]

    def barrier(client):
        if client.add("arrived", 1) == n:
            client.set("all", b"")
        client.wait(["all"])
        return True

    elapsed, count, _ = _agents_together(clients, barrier, ops)
    return {"seconds": elapsed, "ops": count}


def measure(which: str, n: int, limit: float) -> dict | None:
    """One rendezvous of n agents in a fresh process; None if it took longer than ``limit`` seconds."""
    try:
        done = subprocess.run(
            [PYTHON, "-m", "bench.bench_rendezvous", which, str(n)],
            cwd=REPO, capture_output=True, text=True, timeout=limit + 60,
        )
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        raise RuntimeError(f"{which} with {n} agents failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.splitlines()[-1])
    return result if result["seconds"] <= limit else None


def run(runs: int) -> list[Row]:
    rows, seconds, ops = [], {}, {}
    for n in SIZES:
        for which in ("ours", "floor", "torch"):
            # torch's rendezvous takes minutes at scale, if it ends: fewer repetitions there.
            repeat = runs if which != "torch" or n < SIZES[-1] else 1
            results = [measure(which, n, TIMEOUT if which != "torch" else TORCH_LIMIT) for _ in range(repeat)]
            finished = [r for r in results if r is not None]
            if which == "torch" and not finished:
                seconds[which, n], ops[which, n] = None, None
                continue
            seconds[which, n] = median([r["seconds"] for r in finished])
            ops[which, n] = median([r["ops"] for r in finished])
    for n in SIZES:
        target = 0.1 if n == SIZES[-1] else 1.0
        peer_seconds = seconds["torch", n]
        if peer_seconds is None:  # torch did not finish: its time is at least the limit
            rows.append(Row(f"rendezvous of {n} agents on one store, wall time (ms)", seconds["ours", n] * 1000,
                            TORCH_LIMIT * 1000, f"{PEER}: not done after {TORCH_LIMIT} s, a lower bound",
                            f"ours/peer <= {target:g}", seconds["ours", n] <= target * TORCH_LIMIT))
        else:
            rows.append(Row(f"rendezvous of {n} agents on one store, wall time (ms)", seconds["ours", n] * 1000,
                            peer_seconds * 1000, PEER, f"ours/peer <= {target:g}",
                            seconds["ours", n] <= target * peer_seconds))
    for n in SIZES:
        rows.append(Row(f"store operations in a rendezvous of {n} agents", ops["ours", n], ops["torch", n],
                        PEER if ops["torch", n] is not None else f"{PEER}: did not finish",
                        "ours/peer < 1", ops["torch", n] is None or ops["ours", n] < ops["torch", n]))
    first, last = SIZES[0], SIZES[-1]
    growth = last / first
    ops_growth = ops["ours", last] / ops["ours", first]
    rows.append(Row(f"store operations growth from {first} to {last} agents (x)", ops_growth,
                    ops["torch", last] / ops["torch", first] if ops["torch", last] is not None else None,
                    PEER, f"ours <= {growth:g} (linear)", ops_growth <= growth))
    time_growth = seconds["ours", last] / seconds["ours", first]
    floor_growth = seconds["floor", last] / seconds["floor", first]
    rows.append(Row(f"wall time growth from {first} to {last} agents (x)", time_growth, floor_growth,
                    "one add + one wait per agent, same threads", "ours <= 1.5 x peer",
                    time_growth <= 1.5 * floor_growth))
    return rows


if __name__ == "__main__":
    which, n = sys.argv[1], int(sys.argv[2])
    print(json.dumps({"ours": ours, "torch": torch_dynamic, "floor": floor}[which](n)))
