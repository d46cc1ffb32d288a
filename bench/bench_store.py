"""The launcher's store server against torch's libuv TCPStore server, same load, same run.

Each server runs in a process of its own. Two loads:

(a) pipelined: raw-socket generator processes keep a window of SET+GET pairs in
    flight on each connection (8 connections x depth 32 by default);
(b) torch's own Python clients: a few processes looping set/get.

Every figure is the median over ``runs`` rounds; each round measures both
servers back to back, alternating which goes first.

    python -m bench store
"""
from __future__ import annotations

import collections
import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import time

from bench.common import PYTHON, REPO, Row, median, percentile

CONNECTIONS = 8
DEPTH = 32
GENERATORS = 2  # processes; each drives CONNECTIONS // GENERATORS connections
VALUE_SIZE = 64
TORCH_CLIENTS = 4
SECONDS = 1.5  # measured per load, per server, per round
PEER = "torch TCPStore (libuv)"

VALIDATE = b"\x00" + struct.pack("<I", 0x3C85F7CE)

SERVE_OURS = (
    "import sys; from launcher.store import StoreServer;"
    "s = StoreServer('127.0.0.1'); print(s.port, flush=True); sys.stdin.read()"
)
SERVE_TORCH = (
    "import sys; import torch.distributed as d;"
    "s = d.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False, use_libuv=True);"
    "print(s.port, flush=True); sys.stdin.read()"
)


def wire(value: bytes) -> bytes:
    return struct.pack("<Q", len(value)) + value


# --- worker processes: read "PORT SECONDS" lines, answer one JSON line each ---


def pipeline_worker(connections: int) -> None:
    """(a): per connection, a sliding window of DEPTH SET+GET pairs; a GET's latency runs from
    sending its pair to receiving its reply."""
    value = b"v" * VALUE_SIZE
    reply_size = 8 + VALUE_SIZE
    for line in sys.stdin:
        port, seconds = int(line.split()[0]), float(line.split()[1])
        selector = selectors.DefaultSelector()
        state = {}
        for index in range(connections):
            conn = socket.create_connection(("127.0.0.1", port))
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            key = f"/bench/{os.getpid()}/{index}".encode()
            pair = b"\x01" + wire(key) + wire(value) + b"\x03" + wire(key)
            conn.sendall(VALIDATE + pair * DEPTH)
            sent_at = collections.deque([time.perf_counter()] * DEPTH)
            state[conn] = [pair, sent_at, 0]  # the pair, send times in flight, bytes of a partial reply
            selector.register(conn, selectors.EVENT_READ)
        latencies, pairs = [], 0
        end = time.perf_counter() + seconds
        in_flight = connections * DEPTH
        while in_flight:
            now = time.perf_counter()
            for key, _ in selector.select():
                conn = key.fileobj
                entry = state[conn]
                data = conn.recv(1 << 20)
                if not data:
                    raise RuntimeError("the server closed a connection")
                entry[2] += len(data)
                done, entry[2] = divmod(entry[2], reply_size)
                now = time.perf_counter()
                for _ in range(done):
                    latencies.append(now - entry[1].popleft())
                pairs += done
                if now < end:
                    conn.sendall(entry[0] * done)
                    entry[1].extend([now] * done)
                else:
                    in_flight -= done
        for conn in state:
            selector.unregister(conn)
            conn.close()
        latencies.sort()
        print(json.dumps({"ops": 2 * pairs, "seconds": seconds, "p50": percentile(latencies, 50),
                          "p99": percentile(latencies, 99)}), flush=True)


def torch_worker() -> None:
    """(b): torch's client in a set/get loop (a get is WAIT then GET: three requests an iteration)."""
    from datetime import timedelta

    import torch.distributed as dist

    stores = {}
    print("ready", flush=True)
    for line in sys.stdin:
        port, seconds = int(line.split()[0]), float(line.split()[1])
        if port not in stores:
            stores[port] = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
        store = stores[port]
        key, latencies = f"bench/{os.getpid()}", []
        end = time.perf_counter() + seconds
        while (started := time.perf_counter()) < end:
            store.set(key, "v" * VALUE_SIZE)
            store.get(key)
            latencies.append(time.perf_counter() - started)
        latencies.sort()
        print(json.dumps({"ops": 3 * len(latencies), "seconds": seconds, "p50": percentile(latencies, 50),
                          "p99": percentile(latencies, 99)}), flush=True)


# --- the driver ---------------------------------------------------------


def start(argv, wait_line=True):
    proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc, (proc.stdout.readline().strip() if wait_line else None)


def measure(workers, port: int) -> dict:
    for worker in workers:
        worker.stdin.write(f"{port} {SECONDS}\n")
        worker.stdin.flush()
    results = [json.loads(worker.stdout.readline()) for worker in workers]
    return {
        "ops_per_s": sum(r["ops"] for r in results) / SECONDS,
        "p50_ms": 1000 * max(r["p50"] for r in results),
        "p99_ms": 1000 * max(r["p99"] for r in results),
    }


def run(runs: int) -> list[Row]:
    servers = {}
    workers = {}
    try:
        for name, code in (("ours", SERVE_OURS), ("peer", SERVE_TORCH)):
            servers[name] = start([PYTHON, "-c", code])
        ports = {name: int(port) for name, (_, port) in servers.items()}
        per_generator = CONNECTIONS // GENERATORS
        workers["pipelined"] = [
            start([PYTHON, "-m", "bench.bench_store", "pipeline", str(per_generator)], wait_line=False)[0]
            for _ in range(GENERATORS)
        ]
        torch_client = [PYTHON, "-m", "bench.bench_store", "torch"]
        workers["torch clients"] = [start(torch_client)[0] for _ in range(TORCH_CLIENTS)]
        figures = {(load, name): [] for load in workers for name in ports}
        for round_no in range(runs):
            order = ["ours", "peer"] if round_no % 2 == 0 else ["peer", "ours"]
            for load, procs in workers.items():
                for name in order:
                    figures[(load, name)].append(measure(procs, ports[name]))
    finally:
        for proc, _ in servers.values():
            proc.stdin.close()
        for procs in workers.values():
            for proc in procs:
                proc.stdin.close()
        for proc in [p for p, _ in servers.values()] + [p for procs in workers.values() for p in procs]:
            proc.wait(60)

    def mid(load, name, figure):
        return median([f[figure] for f in figures[(load, name)]])

    rows = []
    shapes = {
        "pipelined": f"{CONNECTIONS} conns x depth {DEPTH} SET+GET",
        "torch clients": f"{TORCH_CLIENTS} torch client processes, set+get loop",
    }
    for load, shape in shapes.items():
        ours, peer = mid(load, "ours", "ops_per_s"), mid(load, "peer", "ops_per_s")
        goal = 2.0 if load == "pipelined" else 1.0
        rows.append(Row(f"{shape}: throughput (requests/s)", ours, peer, PEER, f"ours/peer >= {goal:g}",
                        ours / peer >= goal))
        for figure, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
            ours, peer = mid(load, "ours", figure), mid(load, "peer", figure)
            rows.append(Row(f"{shape}: {label} latency (ms)", ours, peer, PEER, "ours/peer <= 1", ours <= peer))
    return rows


if __name__ == "__main__":
    if sys.argv[1] == "pipeline":
        pipeline_worker(int(sys.argv[2]))
    else:
        torch_worker()
