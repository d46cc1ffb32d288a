"""The store against torch 2.13's own client and server, and the launcher's Python API."""
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from helpers import (
    REPO,
    VALIDATE,
    every_command,
    fd_count,
    free_port,
    ping_frame,
    recv_exactly,
    thread_ids,
    torch_client,
    wire,
)

from launcher.store import (
    DistNetworkError,
    DistStoreError,
    PrefixStore,
    QueueEmptyError,
    StoreInterrupted,
    StoreServer,
    TCPStore,
    create_store,
    get_socket_with_port,
)

torch_dist = pytest.importorskip("torch.distributed", reason="torch (requirements-dev) is the reference peer")


def torch_server():
    return torch_dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)


def raw_connection(port, host="127.0.0.1"):
    conn = socket.create_connection((host, port), timeout=30)
    conn.sendall(VALIDATE)
    return conn


def ping(conn, nonce=7):
    """A round trip: once it is answered, everything sent before it on conn was handled."""
    conn.sendall(ping_frame(nonce))
    assert recv_exactly(conn, 4) == struct.pack("<I", nonce)


def test_torch_client_gets_from_our_server_what_it_gets_from_torch_server():
    with TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False) as ours:
        from_ours = every_command(torch_client(ours.port))
    theirs = torch_server()
    from_theirs = every_command(torch_client(theirs.port))
    assert from_ours == from_theirs
    assert ("wait timeout", "DistStoreError", "wait timeout after 200ms, keys: /never, /k1") in from_ours
    assert ("queue_pop empty", "QueueEmptyError", "queue is empty") in from_ours


def test_our_client_answers_like_torch_client():
    theirs = torch_server()
    with TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False) as ours:
        assert every_command(ours) == every_command(torch_client(theirs.port))


def test_torch_barrier_command_is_served():
    with TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False) as ours:
        first, second = torch_client(ours.port), torch_client(ours.port)
        done = threading.Thread(target=first.barrier, args=("b", 2, timedelta(seconds=30)))
        done.start()
        second.barrier("b", 2, timedelta(seconds=30))
        done.join(30)
        assert not done.is_alive()
        with pytest.raises(torch_dist.DistStoreError, match="barrier timeout"):
            first.barrier("b3", 2, timedelta(milliseconds=100))
        assert ours.get("b") == b"2"


@pytest.mark.parametrize("clients", [2, 16])
def test_concurrent_torch_clients(clients):
    rounds = 25
    errors = []
    with TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False) as ours:

        def member(rank):
            try:
                store = torch_client(ours.port)
                for _ in range(rounds):
                    store.add("counter", 1)
                store.set(f"done/{rank}", str(rank))
                store.wait([f"done/{other}" for other in range(clients)])
                peer = (rank + 1) % clients
                assert store.get(f"done/{peer}") == str(peer).encode()
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=member, args=(rank,)) for rank in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors
        assert ours.get("counter") == str(rounds * clients).encode()


def test_wait_is_released_by_another_clients_write():
    with TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False) as ours:
        waiting = raw_connection(ours.port)
        waiting.sendall(b"\x06" + struct.pack("<Q", 2) + wire(b"/a") + wire(b"/b"))
        ping(waiting)  # the WAIT is registered now
        writer = torch_client(ours.port)
        writer.set("a", "1")
        writer.add("b", 1)
        assert recv_exactly(waiting, 1) == b"\x00"  # STOP_WAITING
        ping(waiting)  # and nothing else was sent


def test_blocking_queue_pop_is_released_by_a_push():
    with TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False) as ours:
        first, second = raw_connection(ours.port), raw_connection(ours.port)
        for conn in (first, second):
            conn.sendall(b"\x06" + struct.pack("<Q", 1) + wire(b"/jobs"))
            ping(conn)
        pusher = torch_client(ours.port)
        pusher.queue_push("jobs", "one")
        # One item releases one waiter (the first in line), a second item the other.
        assert recv_exactly(first, 1) == b"\x00"
        pusher.queue_push("jobs", "two")
        assert recv_exactly(second, 1) == b"\x00"
        popped = []
        for conn in (first, second):
            conn.sendall(b"\x0f" + wire(b"/jobs"))
            count = struct.unpack("<Q", recv_exactly(conn, 8))[0]
            popped.append(recv_exactly(conn, struct.unpack("<Q", recv_exactly(conn, 8))[0]))
            assert count >= 1
        assert popped == [b"one", b"two"]
        # Through torch's client: the blocking pop waits for a push from elsewhere.
        got = []
        popper = threading.Thread(target=lambda: got.append(torch_client(ours.port).queue_pop("later")))
        popper.start()
        pusher.queue_push("later", "x")
        popper.join(30)
        assert got == [b"x"]


def test_cancel_wait_answers_stop_waiting_then_wait_canceled():
    with TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False) as ours:
        waiting, writer = raw_connection(ours.port), raw_connection(ours.port)
        waiting.sendall(b"\x06" + struct.pack("<Q", 1) + wire(b"/k"))
        ping(waiting)
        writer.sendall(b"\x01" + wire(b"/k") + wire(b"v"))
        ping(writer)  # the SET happened: STOP_WAITING is on its way
        waiting.sendall(b"\x0c")
        assert recv_exactly(waiting, 2) == b"\x00\x01"
        # Cancelling with nothing pending is answered too, and clears the waiter for good.
        waiting.sendall(b"\x06" + struct.pack("<Q", 1) + wire(b"/never") + b"\x0c")
        assert recv_exactly(waiting, 1) == b"\x01"
        writer.sendall(b"\x01" + wire(b"/never") + wire(b"v"))
        ping(writer)
        ping(waiting)


def test_torch_client_wait_timeout_cancels_cleanly():
    with TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False) as ours:
        client = torch_client(ours.port)
        with pytest.raises(torch_dist.DistStoreError, match="wait timeout after 100ms, keys: /late"):
            client.wait(["late"], timedelta(milliseconds=100))
        # A stray STOP_WAITING would now be read as the reply to the next call.
        ours.set("late", "v")
        assert client.get("late") == b"v"
        assert client.add("n", 2) == 2


def test_get_waits_for_the_key():
    with TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=30) as ours:
        got = []
        reader = threading.Thread(target=lambda: got.append(TCPStore("127.0.0.1", ours.port).get("soon")))
        reader.start()
        ours.set("soon", b"\x00value")
        reader.join(30)
        assert got == [b"\x00value"]


def test_python_api_details():
    with TCPStore("127.0.0.1", 0, world_size=1, is_master=True, timeout=timedelta(seconds=7)) as store:
        assert store.timeout == timedelta(seconds=7)
        store.set_timeout(0.25)
        assert store.timeout == timedelta(milliseconds=250)
        with pytest.raises(DistStoreError, match=r"^wait timeout after 250ms, keys: /x$"):
            store.get("x")
        with pytest.raises(DistStoreError, match=r"^wait timeout after 250ms, keys: /q$"):
            store.queue_pop("q")
        with pytest.raises(QueueEmptyError, match="queue is empty"):
            store.queue_pop("q", block=False)
        with pytest.raises(TypeError, match="keys are str"):
            store.set(b"x", "v")
        with pytest.raises(TypeError, match="values are str or bytes"):
            store.set("x", 5)
        store.queue_push("q", "item")
        store.set("é", "v")
        assert sorted(store.list_keys()) == ["é"]  # init/ and queues are not user keys
        assert store.num_keys() == 2  # init/ counts, as in torch
        assert store.host == "127.0.0.1" and store.port == store.server.port
    with pytest.raises(DistNetworkError, match="closed"):
        store.num_keys()


def test_prefix_store():
    with TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=30) as store:
        outer = PrefixStore("run", store)
        inner = PrefixStore("attempt", outer)
        inner.set("k", "v")
        assert store.get("run/attempt/k") == b"v"
        assert outer.get("attempt/k") == b"v"
        assert inner.add("n", 3) == 3
        assert inner.compare_set("k", "v", "w") == b"w"
        assert inner.check(["k", "n"]) and not inner.check(["k", "missing"])
        inner.multi_set(["a", "b"], ["1", "2"])
        assert inner.multi_get(["a", "b"]) == [b"1", b"2"]
        inner.append("a", "x")
        assert inner.get("a") == b"1x"
        assert inner.delete_key("b")
        inner.queue_push("q", "i")
        assert inner.queue_len("q") == 1 and inner.queue_pop("q") == b"i"
        inner.wait(["k"])
        with pytest.raises(DistStoreError, match="keys: /run/attempt/never"):
            inner.wait(["never"], timedelta(milliseconds=50))
        store.set("elsewhere", "x")
        assert sorted(inner.list_keys()) == ["a", "k", "n"]
        assert sorted(outer.list_keys()) == ["attempt/a", "attempt/k", "attempt/n"]
        assert inner.num_keys() == store.num_keys() == 4
        assert inner.underlying_store is outer and inner.timeout == store.timeout
        # torch's PrefixStore sees the same keys.
        theirs = torch_dist.PrefixStore("attempt", torch_dist.PrefixStore("run", torch_client(store.port)))
        assert theirs.get("k") == b"w"


def test_clear_keeps_only_the_prefix():
    with TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=30) as store:
        for key in ("attempt0/a", "attempt0/b", "attempt1/a", "keep/x"):
            store.set(key, "v")
        store.queue_push("attempt0/q", "item")
        store.queue_push("keep/q", "item")
        assert store.num_keys() == 4  # a round trip: the writes above (no reply of their own) are done
        store.server.clear(b"/keep/")
        assert sorted(store.list_keys()) == ["keep/x"]
        assert store.queue_len("attempt0/q") == 0 and store.queue_len("keep/q") == 1
        assert not store.check(["attempt0/a"])
        store.server.clear()
        assert store.num_keys() == 0 and store.queue_len("keep/q") == 0


def test_close_wakes_every_waiter_and_frees_everything():
    fds = fd_count()
    server = StoreServer("127.0.0.1")
    ours = TCPStore("127.0.0.1", server.port, timeout=60)
    theirs = torch_client(server.port, timeout=60)
    idle = [raw_connection(server.port) for _ in range(5)]
    woken = {}  # each waiter's error, as text: the error itself would keep its client (and socket) alive

    def wait_on(name, store):
        try:
            store.wait(["never"])
        except Exception as error:
            woken[name] = f"{type(error).__name__}: {error}"

    waiters = [threading.Thread(target=wait_on, args=waiter) for waiter in (("ours", ours), ("theirs", theirs))]
    for waiter in waiters:
        waiter.start()
    ping(idle[0])
    started = time.monotonic()
    server.close()
    for waiter in waiters:
        waiter.join(30)
    assert time.monotonic() - started < 30
    assert woken.keys() == {"ours", "theirs"}, woken
    assert woken["ours"].startswith("DistNetworkError: ") and "lost: the server closed it" in woken["ours"], woken
    assert woken["theirs"].startswith("DistNetworkError: "), woken  # torch's own words follow
    for conn in idle:
        assert conn.recv(1) == b""
        conn.close()
    ours.close()
    del theirs  # torch's client closes its socket once freed
    assert fd_count() == fds
    server.close()  # closing again does nothing


def test_close_while_a_torch_client_sits_in_barrier():
    """Closing the server frees the waiter of a client in torch's store.barrier() with its
    connection; what is freed is not read afterwards (make asan checks that)."""
    server = StoreServer("127.0.0.1")
    worker = torch_client(server.port, timeout=60)
    outcome = []

    def barrier():
        try:
            worker.barrier("b", 2, timedelta(seconds=60))
        except Exception as error:
            outcome.append(type(error).__name__)

    thread = threading.Thread(target=barrier)
    thread.start()
    # BARRIER adds 1 and registers its waiter in one loop pass: once the count is 1, it waits.
    assert server.wait_count(b"/b", 1, 60) == 1
    started = time.monotonic()
    server.close()
    thread.join(30)
    assert time.monotonic() - started < 30
    assert outcome == ["DistNetworkError"]


def test_the_server_thread_is_joined_on_close():
    threads = thread_ids("launcher-store")
    server = StoreServer("127.0.0.1")
    assert len(thread_ids("launcher-store") - threads) == 1
    server.close()
    assert thread_ids("launcher-store") == threads


def test_binds_only_the_address_asked():
    server = StoreServer("127.0.0.1")
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", server.port), timeout=10)
        ping(raw_connection(server.port))
    finally:
        server.close()


CONTENDER = """
import sys, time
from launcher.store import DistNetworkError, StoreServer
print("ready", flush=True)
start = float(sys.stdin.readline())
while time.monotonic() < start:  # spin: every contender is on a CPU when the moment comes
    pass
try:
    server = StoreServer("127.0.0.2", int(sys.argv[1]))
    print("listening", flush=True)
    sys.stdin.read()  # until the test has checked
except DistNetworkError as exc:
    print(exc, flush=True)
"""


def test_servers_racing_for_one_port_leave_exactly_one_listening():
    # How c10d agents on one machine find their host: each tries to serve the endpoint at once.
    # Both bind (SO_REUSEADDR) and each listen then fails on the other: without a retry, nobody serves.
    for _ in range(30):
        port = free_port()
        contenders = [
            subprocess.Popen([sys.executable, "-c", CONTENDER, str(port)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        try:
            assert [c.stdout.readline() for c in contenders] == ["ready\n"] * 2
            start = time.monotonic() + 0.05
            for c in contenders:
                c.stdin.write(f"{start}\n")
                c.stdin.flush()
            answers = sorted(c.stdout.readline() for c in contenders)
            assert answers[1] == "listening\n" and "Address already in use" in answers[0], answers
            ping(raw_connection(port, "127.0.0.2"))
        finally:
            for c in contenders:
                c.stdin.close()
                c.wait(30)


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this host has no IPv6 loopback (::1)")
def test_ipv6_loopback():
    with TCPStore("::1", 0, is_master=True, wait_for_workers=False, timeout=30) as store:
        store.set("k", "v")
        assert TCPStore("::1", store.port).get("k") == b"v"
    with TCPStore("localhost", 0, is_master=True, wait_for_workers=False, timeout=30) as store:
        # Every address localhost names is served.
        for family, kind, proto, _, address in socket.getaddrinfo("localhost", store.port, type=socket.SOCK_STREAM):
            with socket.socket(family, kind, proto) as conn:
                conn.connect(address)


def test_multi_tenant_shares_one_server():
    first = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, multi_tenant=True)
    second = TCPStore("127.0.0.1", first.port, is_master=True, wait_for_workers=False, multi_tenant=True)
    assert second.server is first.server
    first.set("k", "v")
    first.close()
    assert second.get("k") == b"v"  # closing one store leaves the shared server up
    second.close()


def test_master_waits_for_its_workers():
    port = free_port()
    code = (
        "import sys; from launcher.store import TCPStore;"
        "TCPStore('127.0.0.1', int(sys.argv[1]), world_size=3, timeout=60).set('joined/' + sys.argv[2], 'y')"
    )
    # The workers start first and retry connecting until the master listens.
    workers = [subprocess.Popen([sys.executable, "-c", code, str(port), str(rank)], cwd=REPO) for rank in (1, 2)]
    master = TCPStore("127.0.0.1", port, world_size=3, is_master=True, timeout=60)
    assert [worker.wait(60) for worker in workers] == [0, 0]
    assert master.get("joined/1") == master.get("joined/2") == b"y"
    assert master.server.wait_count(b"init/", 3, 0) == 3
    master.close()


@pytest.mark.parametrize("call", ["wait", "get", "queue_pop", "connect", "wait_for_workers"])
def test_interrupt_fd_already_readable_ends_blocking_calls_at_once(call):
    readable, writable = os.pipe()
    os.write(writable, b"!")
    started = time.monotonic()
    with TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=120) as host:
        with pytest.raises(StoreInterrupted, match=f"interrupt_fd {readable} became readable"):
            if call == "connect":
                TCPStore("127.0.0.1", free_port(), timeout=120, interrupt_fd=readable)
            elif call == "wait_for_workers":
                TCPStore("127.0.0.1", 0, world_size=2, is_master=True, timeout=120, interrupt_fd=readable)
            else:
                store = TCPStore("127.0.0.1", host.port, timeout=120, interrupt_fd=readable)
                {"wait": lambda: store.wait(["never"]), "get": lambda: store.get("never"),
                 "queue_pop": lambda: store.queue_pop("empty")}[call]()
    assert time.monotonic() - started < 60
    assert os.read(readable, 10) == b"!"  # left for its owner to read
    os.close(readable)
    os.close(writable)


def test_interrupt_fd_ends_a_wait_in_progress_and_the_store_works_on():
    interrupt = os.eventfd(0)
    with TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=120, interrupt_fd=interrupt) as store:
        store.set("before", "v")
        # The trigger comes from elsewhere while the wait blocks; the wait's own timeout is 2 minutes.
        threading.Timer(0.2, os.eventfd_write, (interrupt, 1)).start()
        started = time.monotonic()
        with pytest.raises(StoreInterrupted):
            store.wait(["never"])
        assert time.monotonic() - started < 60
        assert os.eventfd_read(interrupt) == 1
        # The interrupted call left its connection behind; the next call connects again.
        assert store.get("before") == b"v"
        store.set("after", "w")
        assert store.multi_get(["before", "after"]) == [b"v", b"w"]
    os.close(interrupt)


def test_bad_interrupt_fd_is_reported():
    with TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=120) as host:
        readable, writable = os.pipe()
        store = TCPStore("127.0.0.1", host.port, interrupt_fd=readable)
        os.close(readable)
        os.close(writable)
        with pytest.raises(ValueError, match=f"interrupt_fd {readable} is not an open file descriptor"):
            store.wait(["never"])


class TestCreateStore:
    """The behaviours torch's test/distributed/elastic/utils/distributed_test.py checks."""

    def test_single_server(self):
        store = create_store(is_server=True, server_addr="localhost")
        store.set("k", "v")
        assert store.get("k") == b"v"
        store.close()

    def test_no_port_with_several_members(self):
        with pytest.raises(ValueError, match="server_port must be specified"):
            create_store(is_server=True, server_addr="localhost", world_size=2)

    def test_multi(self):
        store = create_store(
            is_server=True, server_addr="localhost", server_port=0, timeout=2, world_size=3, wait_for_workers=False
        )
        code = (
            "import os; from launcher.store import create_store;"
            f"s = create_store(False, 'localhost', {store.port}, 3, timeout=10, wait_for_workers=False);"
            "s.set(f'test_key/{os.getpid()}', b'test_value')"
        )
        workers = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO) for _ in range(2)]
        assert [worker.wait(60) for worker in workers] == [0, 0]
        for worker in workers:
            assert store.get(f"test_key/{worker.pid}") == b"test_value"
        store.close()

    def test_timeout_on_server(self):
        started = time.monotonic()
        with pytest.raises(DistStoreError, match=r"1/2 clients joined"):
            create_store(is_server=True, server_addr="localhost", server_port=0, world_size=2, timeout=1)
        assert time.monotonic() - started < 30

    def test_timeout_on_worker(self):
        with pytest.raises(DistNetworkError):
            create_store(is_server=False, server_addr="localhost", server_port=0, world_size=2, timeout=1)

    def test_port_already_in_use_on_server(self):
        first = create_store(is_server=True, server_addr="localhost", server_port=0, timeout=1)
        with pytest.raises(DistNetworkError, match=f"localhost:{first.port}.*Address already in use"):
            create_store(is_server=True, server_addr="localhost", server_port=first.port)
        first.close()

    def test_port_already_in_use_on_worker(self):
        with get_socket_with_port() as sock:
            port = sock.getsockname()[1]
            started = time.monotonic()
            with pytest.raises(DistNetworkError, match=f"cannot connect to store at localhost:{port} within 1 s"):
                create_store(is_server=False, server_addr="localhost", server_port=port, timeout=1)
            assert time.monotonic() - started < 30
