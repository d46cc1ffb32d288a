"""One rendezvous round of N simulated agents against one store: ours (c10d backend)
against torch's DynamicRendezvousHandler over its C10dRendezvousBackend on a torch TCPStore.

Every agent is a thread with its own store connection and handler, as a real
agent has; all start next_rendezvous() together (min = max = N, so the round
completes as soon as the last one joins). The figures:

- wall time until the last agent returned, for each N, against torch;
- the same beside the least a rendezvous can do on the same threads (each
  agent appends its record, counts itself in, waits for the last one and reads
  every record): on one machine the agents' threads share one interpreter lock
  and two cores, and each reads all N records, so even that one grows faster
  than N; staying within a constant factor of it is growing as little as this
  harness allows;
- how the store operations the agents made grow from the smallest to the
  largest N (ours: every call on our store clients; torch: every call of its
  rendezvous backend): the protocol's cost, which the store host pays.

Each measurement runs in a fresh process:

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
TIMEOUT = 600  # join timeout of ours: a round must complete within it
TORCH_LIMIT = 120  # torch's join timeout: past it, its figures are lower bounds
PEER = "torch DynamicRendezvousHandler (c10d)"
FLOOR = "append + add + wait + read all records per agent, same threads"


def _agents_together(handlers, call, ops) -> tuple[float, int, list]:
    """Start call(handler) in one thread per handler at once.

    Returns the seconds until all returned, the store operations meanwhile,
    and each call's result (or the exception it raised).
    """
    results: list = [None] * len(handlers)
    start = threading.Barrier(len(handlers) + 1)

    def agent(i):
        start.wait()
        try:
            results[i] = call(handlers[i])
        except Exception as exc:  # torch's handler timing out: reported, not a crash
            results[i] = exc

    threads = [threading.Thread(target=agent, args=(i,), daemon=True) for i in range(len(handlers))]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    counted = next(ops)
    for thread in threads:
        thread.join()
    return time.perf_counter() - began, next(ops) - counted - 1, results


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
        raise RuntimeError(f"ours: the agents disagree: {infos}")
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
                                      join_timeout=TORCH_LIMIT)
        handlers.append(create_handler(store, C10dRendezvousBackend(CountingStore(store), run_id), params))
    elapsed, count, infos = _agents_together(handlers, lambda h: h.next_rendezvous(), ops)
    if any(isinstance(i, Exception) for i in infos):  # not done within its join timeout
        return {"seconds": None, "ops": count}
    if sorted(i.rank for i in infos) != list(range(n)):
        raise RuntimeError(f"torch: the agents disagree: {infos}")
    return {"seconds": elapsed, "ops": count}


def floor(n: int) -> dict:
    """The least a rendezvous can do on these threads: every agent adds its record to one
    list and counts itself in, the last one says so, and every agent reads and decodes
    the list (it needs every node's address and world size)."""
    from launcher.rendezvous import NodeInfo
    from launcher.store import TCPStore

    ops = itertools.count()
    host = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    clients = [_counting(TCPStore, ops)("127.0.0.1", host.port, timeout=TIMEOUT) for _ in range(n)]

    def barrier(client):
        record = json.dumps([uuid.uuid4().hex, "127.0.0.1", 1, "default", 0], separators=(",", ":"))
        client.append("nodes", record.encode() + b",")
        if client.add("arrived", 1) == n:
            client.set("all", b"")
        client.wait(["all"])
        rows = json.loads(b"[" + client.get("nodes")[:-1] + b"]")  # one parse for all: the cheapest
        return [NodeInfo(addr, size, role) for _, addr, size, role, _ in rows]

    elapsed, count, nodes = _agents_together(clients, barrier, ops)
    if any(not isinstance(seen, list) or len(seen) != n for seen in nodes):
        raise RuntimeError(f"floor: an agent did not see every node: {nodes}")
    return {"seconds": elapsed, "ops": count}


def measure(which: str, n: int) -> dict:
    """One rendezvous of n agents in a fresh process: {"seconds": None if not done in time, "ops": ...}."""
    done = subprocess.run(
        [PYTHON, "-m", "bench.bench_rendezvous", which, str(n)],
        cwd=REPO, capture_output=True, text=True, timeout=max(TIMEOUT, TORCH_LIMIT) + 120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{which} with {n} agents failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def run(runs: int) -> list[Row]:
    rows, seconds, ops = [], {}, {}
    for n in SIZES:
        for which in ("ours", "floor", "torch"):
            # torch's round of 256 does not complete here: once is enough to see it time out.
            results = [measure(which, n) for _ in range(runs if which != "torch" or n < SIZES[-1] else 1)]
            finished = [r for r in results if r["seconds"] is not None]
            # A peer that did not finish ran TORCH_LIMIT seconds and that many operations at least.
            seconds[which, n] = median([r["seconds"] for r in finished]) if finished else None
            ops[which, n] = median([r["ops"] for r in (finished or results)])
    for n in SIZES:
        target = 0.1 if n == SIZES[-1] else 1.0
        peer, name = seconds["torch", n], PEER
        if peer is None:
            peer, name = TORCH_LIMIT, f"{PEER}: not done in {TORCH_LIMIT} s, a lower bound"
        rows.append(Row(f"rendezvous of {n} agents on one store, wall time (ms)", seconds["ours", n] * 1000,
                        peer * 1000, name, f"ours/peer <= {target:g}", seconds["ours", n] <= target * peer))
    for n in SIZES:
        rows.append(Row(f"rendezvous of {n} agents, beside the least a rendezvous can do (ms)",
                        seconds["ours", n] * 1000, seconds["floor", n] * 1000, FLOOR, "ours/peer <= 2",
                        seconds["ours", n] <= 2 * seconds["floor", n]))
    first, last = SIZES[0], SIZES[-1]
    growth = ops["ours", last] / ops["ours", first]
    rows.append(Row(f"store operations growth from {first} to {last} agents (x)", growth,
                    ops["torch", last] / ops["torch", first],
                    PEER if seconds["torch", last] is not None else f"{PEER}: not done, a lower bound",
                    f"ours <= {last / first:g} (linear)", growth <= last / first))
    return rows


if __name__ == "__main__":
    which, n = sys.argv[1], int(sys.argv[2])
    print(json.dumps({"ours": ours, "torch": torch_dynamic, "floor": floor}[which](n)))
