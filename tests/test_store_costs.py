"""What a request costs the server's loop thread grows in proportion to its size, and releasing or
cancelling waiters in proportion to their number: no client can stall the others with a request
that is merely large.

Each test measures the CPU time of the loop thread (from /proc) over the work, and allows a
generous multiple of what that work takes; a cost quadratic in the size takes many times more.
"""
import socket
import struct

import pytest
from helpers import VALIDATE, cpu_seconds, fd_count, ping_frame, recv_exactly, thread_ids, wait_for, wire

from launcher.store import StoreServer

WAITER_LIMIT = 1 << 18  # the WAIT and BARRIER requests one connection may have waiting (the module text)


@pytest.fixture
def served():
    """A server, and the id of its loop thread."""
    threads = thread_ids("launcher-store")
    server = StoreServer("127.0.0.1")
    [loop] = thread_ids("launcher-store") - threads
    yield server, loop
    server.close()


def connect(port):
    conn = socket.create_connection(("127.0.0.1", port), timeout=60)
    conn.sendall(VALIDATE)
    return conn


def ping(conn):
    """A round trip: once it is answered, everything sent before it on conn was handled."""
    conn.sendall(ping_frame(7))
    assert recv_exactly(conn, 4) == struct.pack("<I", 7)


def keys_frame(command, keys):
    return bytes([command]) + struct.pack("<Q", len(keys)) + b"".join(wire(key) for key in keys)


def test_wait_on_many_keys(served):
    server, loop = served
    keys = [b"/k%d" % i for i in range(80_000)]
    waiting, writer = connect(server.port), connect(server.port)
    before = cpu_seconds(loop)
    waiting.sendall(keys_frame(0x06, keys + keys[:1000]))  # a key twice counts once
    ping(waiting)
    writer.sendall(b"\x0b" + struct.pack("<Q", len(keys)) + b"".join(wire(key) + wire(b"v") for key in keys))
    assert recv_exactly(waiting, 1) == b"\x00"  # STOP_WAITING, once the last key is set
    assert cpu_seconds(loop) - before < 2.0  # about 0.05 s; it took seconds when each key was checked
    ping(waiting)  # against those before it in the same WAIT


def test_releasing_many_waiters_of_one_connection(served):
    server, loop = served
    waiting, writer = connect(server.port), connect(server.port)
    waiting.sendall(keys_frame(0x06, [b"/k"]) * WAITER_LIMIT)
    ping(waiting)
    before = cpu_seconds(loop)
    writer.sendall(b"\x01" + wire(b"/k") + wire(b"v"))
    assert recv_exactly(waiting, WAITER_LIMIT) == b"\x00" * WAITER_LIMIT
    assert cpu_seconds(loop) - before < 1.0  # about 0.05 s
    ping(waiting)


def test_cancelling_many_waiters_of_one_connection(served):
    server, loop = served
    waiting = connect(server.port)
    waiting.sendall(keys_frame(0x06, [b"/k"]) * WAITER_LIMIT)
    ping(waiting)
    fds = fd_count()
    before = cpu_seconds(loop)
    waiting.close()
    # The server closes its end once it cancelled every waiter.
    wait_for(lambda: fd_count() == fds - 2, timeout=60, what="the server to close the connection")
    assert cpu_seconds(loop) - before < 1.0  # about 0.05 s
    writer = connect(server.port)
    writer.sendall(b"\x01" + wire(b"/k") + wire(b"v"))
    ping(writer)


def test_a_large_request_is_parsed_once(served):
    server, loop = served
    count = 16 << 20  # 16 Mi empty keys: a 128 MiB CHECK, which arrives in thousands of reads
    conn, bystander = connect(server.port), connect(server.port)
    before = cpu_seconds(loop)
    conn.sendall(b"\x05" + struct.pack("<Q", count) + wire(b"") * count)
    assert recv_exactly(conn, 1) == b"\x01"  # CHECK_NOT_READY: no key "" yet
    assert cpu_seconds(loop) - before < 3.0  # about 0.3 s; minutes when parsed again on each read
    ping(bystander)
