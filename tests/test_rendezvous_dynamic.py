"""The c10d and etcd rendezvous, handler by handler: each handler is a node.

Nodes are threads of this process or processes of their own (where a test
kills one), on distinct loopback addresses (127.0.0.2, 127.0.0.3...), against
a real store or a real etcd.
"""
from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import pytest
from etcd import EtcdServer, needs_etcd, needs_openssl
from helpers import REPO, free_port, node_addr, together

from launcher.rendezvous import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousParameters,
    RendezvousTimeoutError,
    create_handler,
    dynamic,
)
from launcher.rendezvous.keyvalue import node_address
from launcher.store import StoreInterrupted, TCPStore

# Short timeouts so rounds complete quickly; liveness = 1 s x 2.
FAST = {
    "join_timeout": "30",
    "last_call_timeout": "1",
    "close_timeout": "3",
    "keep_alive_interval": "1",
    "keep_alive_max_attempt": "2",
    "read_timeout": "10",
}


@pytest.fixture(params=["c10d", "etcd"])
def rdzv(request):
    """Makes parameters for one run id on a fresh c10d endpoint or the test etcd.

    The c10d store lives as long as the test: the nodes are threads of this
    process, which share one server (multi-tenant) that would otherwise stop
    with the last handler holding it.
    """
    backend = request.param
    if backend == "c10d":
        keeper = TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True, wait_for_workers=False)
        request.addfinalizer(keeper.close)
        endpoint = f"127.0.0.1:{keeper.port}"
    else:
        endpoint = request.getfixturevalue("etcd_server").endpoint
    run_id = f"{request.node.name}-{os.urandom(3).hex()}"

    def make(i: int, min_nodes: int, max_nodes: int, job: str = "", **config) -> RendezvousParameters:
        return RendezvousParameters(
            backend=backend,
            endpoint=endpoint,
            run_id=run_id + job,
            min_nodes=min_nodes,
            max_nodes=max_nodes,
            local_world_size=i + 1,
            local_addr=node_addr(i),
            config={**FAST, **{k: str(v) for k, v in config.items()}},
        )

    make.backend = backend
    return make


def check_round(infos, n):
    assert sorted(i.rank for i in infos) == list(range(n))
    assert len({i.round for i in infos}) == 1
    assert len({(i.master_addr, i.master_port) for i in infos}) == 1
    nodes = infos[0].nodes
    assert all(i.nodes == nodes for i in infos) and len(nodes) == n
    by_rank = {i.rank: i for i in infos}
    assert infos[0].master_addr == nodes[0].addr
    return by_rank


def test_a_node_is_reached_at_its_local_addr_else_at_the_fqdn_python_finds():
    assert node_address("10.1.2.3") == "10.1.2.3"
    assert node_address(None) == socket.getfqdn()


@pytest.mark.parametrize("n", [2, 3])
def test_nodes_agree_on_ranks_and_the_workers_store(rdzv, handlers, n):
    handlers += [create_handler(rdzv(i, n, n)) for i in range(n)]
    infos = together([h.next_rendezvous for h in handlers])
    check_round(infos, n)
    # Each node's record came through: its address and its local world size.
    for handler_index, info in enumerate(infos):
        me = info.nodes[info.rank]
        assert (me.addr, me.local_world_size) == (node_addr(handler_index), handler_index + 1)
    # The workers' store answers at MASTER_ADDR:MASTER_PORT, and the agents share info.store.
    worker = TCPStore(infos[0].master_addr, infos[0].master_port, timeout=10)
    worker.set("hello", b"world")
    assert worker.get("hello") == b"world"
    worker.close()
    infos[0].store.set("from", str(infos[0].rank))
    assert all(i.store.get("from") == str(infos[0].rank).encode() for i in infos)


def test_a_restarted_round_gets_a_fresh_workers_store(rdzv, handlers):
    handlers += [create_handler(rdzv(i, 2, 2)) for i in range(2)]
    first = together([h.next_rendezvous for h in handlers])
    worker = TCPStore(first[0].master_addr, first[0].master_port, timeout=10)
    worker.set("attempt0", b"stale")
    worker.close()
    second = together([h.next_rendezvous for h in handlers])
    by_rank = check_round(second, 2)
    assert by_rank[0].round == first[0].round + 1
    # Ranks are stable from round to round.
    assert [i.rank for i in second] == [i.rank for i in first]
    worker = TCPStore(second[0].master_addr, second[0].master_port, timeout=10)
    assert not worker.check(["attempt0"])
    worker.close()
    assert (second[0].master_addr, second[0].master_port) != (first[0].master_addr, first[0].master_port)


def test_max_completes_at_once_min_waits_for_the_last_call(rdzv, handlers):
    handlers += [create_handler(rdzv(i, 1, 2, last_call_timeout=20)) for i in range(2)]
    started = time.monotonic()
    check_round(together([h.next_rendezvous for h in handlers]), 2)
    assert time.monotonic() - started < 10  # max reached: no last call

    more = [create_handler(rdzv(i, 2, 3, job="-second", last_call_timeout=1)) for i in range(2, 4)]
    handlers += more
    check_round(together([h.next_rendezvous for h in more]), 2)  # min reached, window passed


def test_the_node_of_a_one_node_job_watches_no_membership(rdzv, handlers):
    # Its round cannot change (no other member to lose, none can join): a restart starts no watcher thread
    # nor its connection to the store.
    def watchers():
        return [thread.name for thread in threading.enumerate() if thread.name.startswith("rendezvous-watch")]

    only = create_handler(rdzv(0, 1, 1))
    handlers.append(only)
    for _ in range(2):  # the first round, a restart
        only.next_rendezvous()
        assert not select.select([only.waiting_fd()], [], [], 0)[0]
        assert watchers() == []
        assert only.num_nodes_waiting() == 0 and only.lost_nodes() == []
    two = create_handler(rdzv(1, 1, 2, job="-other"))  # one node of a job that another may join: watched
    handlers.append(two)
    two.next_rendezvous()
    two.waiting_fd()
    assert len(watchers()) == 1


def test_a_restart_round_of_one_node_reads_back_nothing_it_wrote(request, handlers, monkeypatch):
    # 11 requests to the store: the join (3), the coordinator's claim, the done record and the news count,
    # the join records and heartbeat, the seats, the done record and the latest round. The seat and the
    # previous round's members this node wrote itself are not read back (each request is a round trip).
    keeper = TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True, wait_for_workers=False)
    request.addfinalizer(keeper.close)
    only = create_handler(RendezvousParameters(
        backend="c10d", endpoint=f"127.0.0.1:{keeper.port}", run_id="restart-cost", min_nodes=1, max_nodes=1,
        local_world_size=1, local_addr=node_addr(0), config=FAST,
    ))
    handlers.append(only)
    only.next_rendezvous()
    requests = []

    def counting(name):
        call = getattr(TCPStore, name)

        def counted(self, *args, **kwargs):
            requests.append(name)
            return call(self, *args, **kwargs)
        return counted

    for name in ("set", "get", "add", "compare_set", "check", "wait", "append", "multi_get", "multi_set"):
        monkeypatch.setattr(TCPStore, name, counting(name))
    info = only.next_rendezvous()
    assert (info.round, info.rank) == (1, 0)
    assert len(requests) <= 11, requests


def test_a_node_joining_a_running_job_is_seen_and_makes_the_next_round_larger(rdzv, handlers):
    first = create_handler(rdzv(0, 1, 2))
    handlers.append(first)
    info = first.next_rendezvous()
    assert (info.rank, len(info.nodes)) == (0, 1)
    assert first.num_nodes_waiting() == 0
    assert not select.select([first.waiting_fd()], [], [], 0)[0]

    late = create_handler(rdzv(1, 1, 2))
    handlers.append(late)
    with ThreadPoolExecutor(1) as pool:
        joining = pool.submit(late.next_rendezvous)
        assert select.select([first.waiting_fd()], [], [], 20)[0], "waiting_fd never became readable"
        assert first.num_nodes_waiting() == 1
        assert not select.select([first.waiting_fd()], [], [], 0)[0]  # consumed
        again = first.next_rendezvous()
        joined = joining.result(timeout=30)
    check_round([again, joined], 2)
    assert again.round == info.round + 1 and again.rank == 0  # the running node keeps rank 0


def test_a_node_that_never_arrives_times_out_with_one_line(rdzv, handlers):
    handler = create_handler(rdzv(0, 2, 2, join_timeout=2))
    handlers.append(handler)
    started = time.monotonic()
    with pytest.raises(RendezvousTimeoutError) as error:
        handler.next_rendezvous()
    assert time.monotonic() - started < 8
    message = str(error.value)
    assert "\n" not in message
    assert "timed out after 2 s" in message and "1 of min 2, max 2 nodes joined (127.0.0.2)" in message
    assert (rdzv.backend in message) and ("c10d store 127.0.0.1:" in message or "etcd http://127.0.0.1:" in message)


def test_waiting_prints_a_status_line_every_few_seconds(rdzv, handlers, caplog, monkeypatch):
    monkeypatch.setattr(dynamic, "STATUS_INTERVAL", 1.0)
    handler = create_handler(rdzv(0, 2, 3, join_timeout=5))
    handlers.append(handler)
    with caplog.at_level(logging.WARNING, logger="launcher"), pytest.raises(RendezvousTimeoutError):
        handler.next_rendezvous()
    lines = [r.getMessage() for r in caplog.records if "timeout in" in r.getMessage()]
    assert 2 <= len(lines) <= 6, lines  # about one a second, not a flood
    assert all("round 0" in line and "1 of min 2, max 3 nodes joined (127.0.0.2)" in line for line in lines)
    assert all(r.name.startswith("launcher") and r.levelno == logging.WARNING
               for r in caplog.records if "timeout in" in r.getMessage())


def test_the_interrupt_fd_ends_a_wait_at_once(rdzv, handlers):
    read_fd, write_fd = os.pipe()
    params = rdzv(0, 2, 2, join_timeout=60)
    params.interrupt_fd = read_fd
    handler = create_handler(params)
    handlers.append(handler)
    threading.Timer(0.5, os.write, (write_fd, b"x")).start()
    started = time.monotonic()
    with pytest.raises(StoreInterrupted):
        handler.next_rendezvous()
    assert time.monotonic() - started < 3
    os.close(write_fd)
    os.close(read_fd)


def test_shutdown_closes_only_when_last_and_leave_never(rdzv):
    a, b = (create_handler(rdzv(i, 1, 2, last_call_timeout=1)) for i in range(2))
    together([a.next_rendezvous, b.next_rendezvous])
    b.shutdown()  # a still runs: not closed
    c = create_handler(rdzv(2, 1, 2))
    with ThreadPoolExecutor(1) as pool:
        joining = pool.submit(c.next_rendezvous)
        assert select.select([a.waiting_fd()], [], [], 20)[0]
        assert a.num_nodes_waiting() == 1
        info = a.next_rendezvous()
        assert joining.result(timeout=30).round == info.round
    c.leave()  # a signal on c: the others carry on
    a.shutdown()  # the last one closes
    d = create_handler(rdzv(3, 1, 2))
    with pytest.raises(RendezvousClosedError, match="is closed"):
        d.next_rendezvous()
    d.shutdown()


# -- nodes in processes of their own -------------------------------------------------

NODE = r"""
import json, sys
from launcher.rendezvous import RendezvousParameters, create_handler
handler = create_handler(RendezvousParameters(**json.loads(sys.argv[1])))
print(json.dumps({"pid": __import__("os").getpid()}), flush=True)
for line in sys.stdin:
    try:
        if line.strip() == "next":
            info = handler.next_rendezvous()
            out = {"round": info.round, "rank": info.rank, "nodes": [n.addr for n in info.nodes],
                   "master": [info.master_addr, info.master_port]}
        elif line.strip() == "waiting":
            out = {"waiting": handler.num_nodes_waiting()}
        else:
            handler.shutdown()
            out = {}
    except Exception as exc:
        out = {"error": type(exc).__name__, "message": str(exc)}
    print(json.dumps(out), flush=True)
"""


class NodeProcess:
    """A handler in a process of its own, driven line by line."""

    def __init__(self, params: RendezvousParameters, prefix: list[str] = ()):
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", NODE, json.dumps(params.__dict__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
        )
        self._pending = b""
        self.read(30)

    def send(self, command: str) -> None:
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError(f"node process {self.proc.pid} did not answer in {timeout} s")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise EOFError(f"node process exited with {self.proc.wait()}")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return json.loads(line)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(30)


@pytest.fixture
def processes():
    made = []
    yield made
    for node in reversed(made):
        if node.proc.poll() is None:
            node.kill()


def test_a_killed_node_is_dropped_and_the_survivors_carry_on(rdzv, processes):
    nodes = [NodeProcess(rdzv(i, 2, 3)) for i in range(3)]
    processes += nodes
    for node in nodes:
        node.send("next")
    first = [node.read(30) for node in nodes]
    assert sorted(r["rank"] for r in first) == [0, 1, 2]
    victim = nodes[2]  # not the c10d store's host: node 0 was made first and bound its port
    victim.kill()
    survivors = [n for n in nodes if n is not victim]
    started = time.monotonic()
    for node in survivors:
        node.send("next")
    second = [node.read(30) for node in survivors]
    # Dead after 2 s without heartbeat, then the 1 s last call; a generous margin.
    assert time.monotonic() - started < 10
    assert sorted(r["rank"] for r in second) == [0, 1]
    assert second[0]["round"] == first[0]["round"] + 1 and len(second[0]["nodes"]) == 2
    assert node_addr(nodes.index(victim)) not in second[0]["nodes"]
    assert len({tuple(r["master"]) for r in second}) == 1


def test_a_killed_member_is_reported_lost_to_the_others_while_they_run(rdzv, handlers, processes):
    """No next_rendezvous() after the kill: the running members learn of it through waiting_fd()."""
    running = [create_handler(rdzv(i, 2, 3)) for i in range(2)]
    handlers += running
    victim = NodeProcess(rdzv(2, 2, 3))
    processes.append(victim)
    victim.send("next")
    together([h.next_rendezvous for h in running])
    assert len(victim.read(30)["nodes"]) == 3
    fds = [h.waiting_fd() for h in running]
    assert not select.select(fds, [], [], 0)[0]
    victim.kill()
    started = time.monotonic()
    for handler, fd in zip(running, fds):
        assert select.select([fd], [], [], 20)[0], "waiting_fd never became readable"
        assert handler.num_nodes_waiting() == 0  # a loss, not a node waiting
        assert handler.lost_nodes() == [node_addr(2)]
    # Dead 2 s after its last heartbeat, found so by two checks 1 s apart; a generous margin.
    assert time.monotonic() - started < 10
    survivors = together([h.next_rendezvous for h in running])
    check_round(survivors, 2)
    assert node_addr(2) not in [n.addr for n in survivors[0].nodes]


def test_losing_the_c10d_store_host_fails_with_one_line(processes):
    endpoint = f"127.0.0.1:{free_port()}"

    def node(i, **config):
        return RendezvousParameters(
            backend="c10d", endpoint=endpoint, run_id="host-loss", min_nodes=2, max_nodes=2, local_world_size=1,
            local_addr=node_addr(i), config={**FAST, **config},
        )

    host = NodeProcess(node(0, is_host="true"))
    processes.append(host)
    client = create_handler(node(1, is_host="false", read_timeout="5"))
    host.send("next")
    with ThreadPoolExecutor(1) as pool:
        mine = pool.submit(client.next_rendezvous)
        host_rank = host.read(30)["rank"]  # whoever joined first is rank 0
        assert {host_rank, mine.result(timeout=30).rank} == {0, 1}
    host.kill()
    started = time.monotonic()
    with pytest.raises(RendezvousConnectionError) as error:
        client.next_rendezvous()
    assert time.monotonic() - started < 8
    assert "\n" not in str(error.value) and "c10d store 127.0.0.1:" in str(error.value)
    client.leave()


def test_unreachable_etcd_fails_within_read_timeout():
    port = free_port()  # nothing listens there
    params = RendezvousParameters(
        backend="etcd", endpoint=f"127.0.0.1:{port},http://127.0.0.1:{port}", run_id="gone", min_nodes=1,
        max_nodes=1, local_world_size=1, local_addr="127.0.0.2", config={"read_timeout": "2"},
    )
    started = time.monotonic()
    with pytest.raises(RendezvousConnectionError) as error:
        create_handler(params).next_rendezvous()  # the handler reaches etcd as it starts
    waited = time.monotonic() - started
    assert 2 <= waited < 5
    message = str(error.value)
    assert "\n" not in message
    assert f"cannot reach etcd http://127.0.0.1:{port}" in message and "tried for 2 s" in message


@needs_etcd
def test_etcd_lost_mid_run_fails_within_read_timeout():
    own = EtcdServer().start()
    try:
        params = dict(
            backend="etcd", endpoint=own.endpoint, run_id="lost", min_nodes=1, max_nodes=1, local_world_size=1,
            local_addr="127.0.0.2", config={**FAST, "read_timeout": "3"},
        )
        handler = create_handler(RendezvousParameters(**params))
        assert handler.next_rendezvous().rank == 0
        own.stop()
        started = time.monotonic()
        with pytest.raises(RendezvousConnectionError, match=f"cannot reach etcd http://{own.endpoint}"):
            handler.next_rendezvous()
        assert time.monotonic() - started < 8
        started = time.monotonic()
        handler.leave()  # etcd is still gone: leaving gives up after close_timeout
        assert time.monotonic() - started < 6
    finally:
        own.cleanup()


# -- nodes in network namespaces: a partition ------------------------------------------


class Namespaces:
    """Network namespaces joined by veth pairs to a bridge in a hub namespace; removed on close."""

    def __init__(self, count: int):
        tag = f"lr{os.getpid() % 100000:05d}"
        self.hub = f"{tag}hub"
        self.nodes = [f"{tag}n{i}" for i in range(count)]
        self.hub_ends = [f"{tag}p{i}" for i in range(count)]
        self.addrs = [f"10.213.7.{10 + i}" for i in range(count)]
        self.created: list[str] = []
        try:
            self._ns(self.hub)
            self.run(self.hub, "ip link add br0 type bridge", "ip link set br0 up")
            for i, ns in enumerate(self.nodes):
                self._ns(ns)
                node_end = f"{tag}v{i}"
                ip(f"link add {node_end} type veth peer name {self.hub_ends[i]}")
                ip(f"link set {node_end} netns {ns}")
                ip(f"link set {self.hub_ends[i]} netns {self.hub}")
                self.run(self.hub, f"ip link set {self.hub_ends[i]} master br0", f"ip link set {self.hub_ends[i]} up")
                self.run(ns, f"ip addr add {self.addrs[i]}/24 dev {node_end}", f"ip link set {node_end} up")
        except BaseException:
            self.close()
            raise

    def _ns(self, name: str) -> None:
        ip(f"netns add {name}")
        self.created.append(name)
        self.run(name, "ip link set lo up")

    def run(self, ns: str, *commands: str) -> None:
        for command in commands:
            ip(f"netns exec {ns} {command}")

    def cut(self, i: int) -> None:
        self.run(self.hub, f"ip link set {self.hub_ends[i]} down")

    def close(self) -> None:
        for name in reversed(self.created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.created = []


def ip(arguments: str) -> None:
    subprocess.run(["ip", *arguments.split()], check=True, capture_output=True, text=True)


@pytest.fixture
def namespaces():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("ip netns is not available")
    spaces = Namespaces(3)
    yield spaces
    spaces.close()


def test_a_partitioned_node_is_dropped_and_fails_within_its_timeouts(namespaces, processes):
    endpoint = f"{namespaces.addrs[0]}:29400"

    def node(i):
        return RendezvousParameters(
            backend="c10d", endpoint=endpoint, run_id="partition", min_nodes=2, max_nodes=3, local_world_size=1,
            local_addr=namespaces.addrs[i],
            config={**FAST, "is_host": "true" if i == 0 else "false", "read_timeout": "5"},
        )

    nodes = [NodeProcess(node(i), prefix=["ip", "netns", "exec", namespaces.nodes[i]]) for i in range(3)]
    processes += nodes
    for n in nodes:
        n.send("next")
    first = [n.read(30) for n in nodes]
    assert sorted(r["rank"] for r in first) == [0, 1, 2] and len(first[0]["nodes"]) == 3

    namespaces.cut(2)
    started = time.monotonic()
    for n in nodes:
        n.send("next")
    second = [n.read(30) for n in nodes[:2]]
    assert time.monotonic() - started < 10  # 2 s without heartbeat, a 1 s last call, a margin
    assert sorted(r["rank"] for r in second) == [0, 1] and namespaces.addrs[2] not in second[0]["nodes"]
    assert second[0]["round"] == first[0]["round"] + 1
    cut_off = nodes[2].read(30)  # its store is unreachable: it gives up after read_timeout
    assert cut_off["error"] == "RendezvousConnectionError", cut_off
    assert f"c10d store {endpoint}" in cut_off["message"]
    assert time.monotonic() - started < 20


@needs_etcd
@needs_openssl
def test_etcd_over_https_with_client_certificates():
    server = EtcdServer(tls=True).start()
    try:
        tls = server.tls

        def params(cacert, **config):
            return RendezvousParameters(
                backend="etcd", endpoint=f"https://{server.endpoint}", run_id="tls", min_nodes=1, max_nodes=1,
                local_world_size=1, local_addr="127.0.0.2",
                config={**FAST, "read_timeout": "3", "cacert": cacert, **config},
            )

        handler = create_handler(params(tls["ca.crt"], cert=tls["client.crt"], key=tls["client.key"]))
        assert handler.next_rendezvous().rank == 0
        handler.shutdown()
        with pytest.raises(RendezvousConnectionError, match="TLS verification failed"):
            create_handler(params(tls["client.crt"]))  # a CA that did not sign etcd's certificate
        with pytest.raises(RendezvousConnectionError, match=f"cannot reach etcd https://{server.endpoint}"):
            create_handler(params(tls["ca.crt"]))  # no client certificate: etcd refuses the handshake
    finally:
        server.cleanup()


def test_etcd_endpoints_are_tried_in_turn(etcd_server):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    handler = create_handler(
        RendezvousParameters(
            backend="etcd", endpoint=f"http://{dead},{etcd_server.endpoint}", run_id="failover", min_nodes=1,
            max_nodes=1, local_world_size=1, local_addr="127.0.0.2", config=FAST,
        )
    )
    assert handler.next_rendezvous().rank == 0
    handler.shutdown()


@pytest.mark.parametrize("size", [1, 2])
def test_a_node_that_finds_the_job_full_waits_for_a_place_past_its_join_timeout(rdzv, handlers, size):
    running = [create_handler(rdzv(i, 1, size)) for i in range(size)]
    handlers += running
    together([h.next_rendezvous for h in running])  # complete at once: the maximum joined
    # Once a place is free, what is left of its join timeout (a keep-alive interval less at worst) outlasts
    # the last call of the round it then completes.
    spare = create_handler(rdzv(size, 1, size, join_timeout=3))
    handlers.append(spare)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(spare.next_rendezvous)
        try:
            # No place while the job runs at its maximum: no timeout (torch's redundancy list), and no
            # reason for the running nodes to restart. The node of a one-node job is not even woken: it
            # watches no membership (no other node can ever be in its round).
            if size > 1:
                assert select.select([running[0].waiting_fd()], [], [], 20)[0]
            assert running[0].num_nodes_waiting() == 0
            with pytest.raises(FutureTimeout):
                waiting.result(timeout=4)  # neither done nor timed out, past its 3 s join timeout
            assert not select.select([running[0].waiting_fd()], [], [], 0)[0]
        finally:
            for node in running:
                node.leave()
        info = waiting.result(timeout=30)
    assert (info.rank, len(info.nodes), info.nodes[0].addr) == (0, 1, node_addr(size))
