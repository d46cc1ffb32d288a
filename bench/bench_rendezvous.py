"""One rendezvous round of N agents on one store host: ours (the c10d backend), torch's
DynamicRendezvousHandler (its C10dRendezvousBackend), and the least a rendezvous can do,
all on the same store server (ours: torch's clients speak its protocol).

The agents are spread over processes of AGENTS_PER_PROCESS threads each, every agent with
its own handler and store connections as a real one has, so that up to 4,096 agents the
harness is not what is measured. Each process makes its agents and says it is ready; they
all start next_rendezvous() when the bench says go (min = max = N: the round completes as
soon as the last one joins). The store host is a process of its own that does nothing else.
The figures:

- wall time from go until the last agent returned;
- the store host's CPU time (its server thread's, from /proc) and the bytes it sent over the
  round (TCP_INFO of each of its connections): the protocol's cost where it is paid for all;
- how those grow from the smallest to the largest N (linear: by N_last / N_first), beside the
  least a rendezvous can do. The smallest size is then measured as N_last / N_first rounds at
  once on as many agents as the largest: most of the host's CPU here is the kernel's share of
  each request, which grows with the connections and threads of the machine, not the protocol.

Our agents heartbeat every KEEP_ALIVE seconds, longer than a round here, so that the
per-period costs (a heartbeat and a check of one other member per node, see
rendezvous/background.py) stay out of the per-round figures.

    python -m bench.bench_rendezvous ours 1024     # one measurement: prints its figures as JSON
"""
from __future__ import annotations

import json
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid

from bench.common import PYTHON, REPO, Row, median

SIZES = (256, 1024, 4096)
TORCH_SIZE = 256  # torch's round of 256 does not complete in TORCH_LIMIT here: a lower bound
AGENTS_PER_PROCESS = 32
TIMEOUT = 600  # join timeout of ours: a round must complete within it
TORCH_LIMIT = 60  # torch's join timeout: past it, its figures are lower bounds
KEEP_ALIVE = 30  # seconds between our agents' heartbeats
PEER = "torch DynamicRendezvousHandler (c10d)"
FLOOR = "join + wait + read own seat; the last reads every record once and writes every seat"
# The offset in struct tcp_info of tcpi_bytes_sent, a u64 (Linux >= 4.19; tcpi_bytes_acked would lag
# behind the peer's delayed acknowledgements).
BYTES_SENT_AT = 200
U64 = struct.Struct("<Q")


# --- the store host: a process of its own -----------------------------------------------------


def _thread_cpu_seconds(tid: str) -> float:
    """CPU time of one thread of this process: schedstat's nanoseconds, else stat's clock ticks."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except FileNotFoundError:
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _tcp_bytes_sent() -> int:
    """Bytes sent on every TCP connection this process holds."""
    sent = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            duplicate = os.dup(int(name))
        except OSError:
            continue  # the directory's own descriptor, gone by now
        with socket.socket(fileno=duplicate) as sock:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        sent += U64.unpack_from(info, BYTES_SENT_AT)[0]
    return sent


def host() -> None:
    """Host a store server; answer every line on stdin with its costs so far, as JSON.

    Only the server's own thread is counted: this main thread sleeps on stdin but for the answers.
    """
    from launcher.store import StoreServer

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # two connections per agent
    server = StoreServer("127.0.0.1", 0)
    main = str(threading.get_native_id())
    print(server.port, flush=True)
    for _ in sys.stdin:
        cpu = sum(_thread_cpu_seconds(tid) for tid in os.listdir("/proc/self/task") if tid != main)
        print(json.dumps({"cpu": cpu, "sent": _tcp_bytes_sent()}), flush=True)
    server.close()


# --- the agents: what each kind does, in processes of AGENTS_PER_PROCESS threads -------------------


def _ours(port: int, run_id: str, n: int):
    from launcher.rendezvous import RendezvousParameters, create_handler

    config = {"is_host": "false", "join_timeout": TIMEOUT, "read_timeout": TIMEOUT, "keep_alive_interval": KEEP_ALIVE}
    handler = create_handler(
        RendezvousParameters("c10d", f"127.0.0.1:{port}", run_id, n, n, 1, local_addr="127.0.0.1", config=config)
    )

    def run():
        info = handler.next_rendezvous()
        return [info.rank, info.world_size, info.master_port]

    return run


def _torch(port: int, run_id: str, n: int):
    from datetime import timedelta

    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous.api import RendezvousParameters
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    store = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=TIMEOUT))
    params = RendezvousParameters("c10d", f"127.0.0.1:{port}", run_id, n, n, local_addr="127.0.0.1",
                                  join_timeout=TORCH_LIMIT)
    handler = create_handler(store, C10dRendezvousBackend(store, run_id), params)

    def run():
        info = handler.next_rendezvous()
        return [info.rank, info.world_size, 0]

    return run


def _floor(port: int, run_id: str, n: int):
    """The least a rendezvous can do: every agent adds its record and counts itself in; the last
    one reads every record once, writes every agent's seat (rank, world) and says so; every
    agent waits for that and reads its own seat."""
    from launcher.store import TCPStore

    client = TCPStore("127.0.0.1", port, timeout=TIMEOUT)
    me = uuid.uuid4().hex

    def run():
        client.append(f"{run_id}/nodes", json.dumps([me, "127.0.0.1", 1, "default", 0]).encode() + b"\n")
        if client.add(f"{run_id}/count", 1) == n:
            rows = [json.loads(line) for line in client.get(f"{run_id}/nodes").splitlines()]
            client.multi_set([f"{run_id}/seat/{row[0]}" for row in rows],
                             [json.dumps([rank, n, rank]).encode() for rank in range(n)])
            client.set(f"{run_id}/all", b"")
        client.wait([f"{run_id}/all"])
        rank, world, _ = json.loads(client.get(f"{run_id}/seat/{me}"))
        return [rank, world, 0]

    return run


KINDS = {"ours": _ours, "torch": _torch, "floor": _floor}


def agents(which: str, port: int, run_id: str, n: int, count: int) -> None:
    """Make ``count`` agents of kind ``which``; print "ready"; on a line from stdin run them all at once;
    print when the last one finished (time.monotonic, shared by the processes of a machine) and
    what each returned; exit on the next line."""
    runs = [KINDS[which](port, run_id, n) for _ in range(count)]
    results: list = [None] * count
    go = threading.Event()

    def agent(i):
        go.wait()
        try:
            results[i] = runs[i]()
        except Exception as exc:  # torch's handler timing out: reported, not a crash
            results[i] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=agent, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    print("ready", flush=True)
    sys.stdin.readline()
    go.set()
    for thread in threads:
        thread.join()
    print(json.dumps({"finished": time.monotonic(), "results": results}), flush=True)
    sys.stdin.readline()  # the connections stay until the store host has counted their bytes
    os._exit(0)  # the handlers' threads and servers go with the process: no shutdown to wait for


# --- one measurement ----------------------------------------------------------------------------


def _spawn(*args) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "bench.bench_rendezvous", *map(str, args)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _ask(host_proc: subprocess.Popen) -> dict:
    host_proc.stdin.write("costs\n")
    host_proc.stdin.flush()
    return json.loads(host_proc.stdout.readline())


def rounds(which: str, n: int, parallel: int = 1) -> dict:
    """``parallel`` rounds of n agents of kind ``which`` at once, each with its own run id: wall seconds
    until the last agent returned (None when one did not complete), and the store host's CPU seconds
    and bytes sent per round."""
    procs = [_spawn("host")]
    try:
        port = int(procs[0].stdout.readline())
        run_ids = [uuid.uuid4().hex for _ in range(parallel)]
        groups = [
            _spawn("agents", which, port, run_id, n, min(AGENTS_PER_PROCESS, n - start))
            for run_id in run_ids
            for start in range(0, n, AGENTS_PER_PROCESS)
        ]
        procs += groups
        for group in groups:
            if group.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{which}: an agent process of {n} failed to start")
        before = _ask(procs[0])
        began = time.monotonic()
        for group in groups:
            group.stdin.write("go\n")
            group.stdin.flush()
        outputs = [json.loads(group.stdout.readline()) for group in groups]
        after = _ask(procs[0])
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    per_round = len(outputs) // parallel
    results = [[r for output in outputs[i:i + per_round] for r in output["results"]]
               for i in range(0, len(outputs), per_round)]
    failed = [r for round_results in results for r in round_results if not isinstance(r, list)]
    if failed and which != "torch":
        raise RuntimeError(f"{which} with {n} agents failed: {failed[0]}")
    for found in results if not failed else []:
        if sorted(r[0] for r in found) != list(range(n)) or {(r[1], r[2]) for r in found} != {(n, found[0][2])}:
            raise RuntimeError(f"{which}: the agents of a round disagree on ranks or world")
    return {
        "seconds": None if failed else max(output["finished"] for output in outputs) - began,
        "cpu": (after["cpu"] - before["cpu"]) / parallel,
        "sent": (after["sent"] - before["sent"]) / parallel,
    }


def measure(which: str, n: int, runs: int, parallel: int = 1) -> dict:
    """Medians over ``runs`` measurements (seconds None when a round did not complete)."""
    found = [rounds(which, n, parallel) for _ in range(runs)]
    done = [r["seconds"] for r in found if r["seconds"] is not None]
    return {
        "seconds": median(done) if len(done) == len(found) else None,
        "cpu": median([r["cpu"] for r in found]),
        "sent": median([r["sent"] for r in found]),
    }


def run(runs: int) -> list[Row]:
    first, last = SIZES[0], SIZES[-1]
    ours, floor = {}, {}
    for n in SIZES:
        repeat = max(1, runs * first // n)  # the largest rounds are long and vary little
        ours[n], floor[n] = measure("ours", n, repeat), measure("floor", n, repeat)
    # The growth's baseline: the largest number of agents in rounds of the smallest size, all at once,
    # so that both sides of the ratio run with the same connections, threads and load.
    ours_small, floor_small = (measure(which, first, 1, parallel=last // first) for which in ("ours", "floor"))
    torch = measure("torch", TORCH_SIZE, 1)  # it times out: once is enough
    rows = []
    peer, name = torch["seconds"], PEER
    if peer is None:
        peer, name = TORCH_LIMIT, f"{PEER}: not done in {TORCH_LIMIT} s, a lower bound"
    seconds = ours[TORCH_SIZE]["seconds"]
    rows.append(Row(f"rendezvous of {TORCH_SIZE} agents on one store, wall time (ms)", seconds * 1000, peer * 1000,
                    name, "ours/peer <= 0.1", seconds <= 0.1 * peer))
    for n in SIZES:
        rows.append(Row(f"rendezvous of {n} agents, wall time beside the least a rendezvous can do (ms)",
                        ours[n]["seconds"] * 1000, floor[n]["seconds"] * 1000, FLOOR, "ours/peer <= 4",
                        ours[n]["seconds"] <= 4 * floor[n]["seconds"]))
    rows.append(Row(f"rendezvous of {last} agents, store host CPU per round (ms)", ours[last]["cpu"] * 1000,
                    floor[last]["cpu"] * 1000, FLOOR, "ours/peer <= 2", ours[last]["cpu"] <= 2 * floor[last]["cpu"]))
    rows.append(Row(f"rendezvous of {last} agents, store host bytes sent per round (KiB)", ours[last]["sent"] / 1024,
                    floor[last]["sent"] / 1024, FLOOR, "ours/peer <= 4", ours[last]["sent"] <= 4 * floor[last]["sent"]))
    linear = last / first
    for figure, key in (("CPU", "cpu"), ("bytes sent", "sent")):
        growth = ours[last][key] / ours_small[key]
        rows.append(Row(f"store host {figure} per round, {first} -> {last} agents (x; {last} agents either way)",
                        growth, floor[last][key] / floor_small[key], FLOOR, f"ours <= {linear * 1.25:g} (linear: "
                        f"{linear:g})", growth <= linear * 1.25))
    return rows


if __name__ == "__main__":
    if sys.argv[1] == "host":
        host()
    elif sys.argv[1] == "agents":
        agents(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    else:
        print(json.dumps(rounds(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1)))
