"""Memory: a request whose reply or value cannot be had costs its connection, with one log line,
and leaves the store as it was; the server serves the others on, and never grows past its limit.

The server runs in a process of its own under an address-space limit (RLIMIT_AS), with some room
to spare above what it uses at the start. AddressSanitizer's allocator reserves its address space up
front and aborts when it runs out, so `make asan` leaves these tests out (marker address_space_limit).
"""
import os
import re
import socket
import struct
import subprocess
import sys

import pytest
from helpers import REPO, VALIDATE, ping_frame, recv_exactly, wire

from launcher.store import TCPStore

ROOM = 256 << 20  # bytes of address space the server may take beyond what it holds at the start

SERVE_WITHIN_ROOM = f"""
import resource, sys
from launcher.store import StoreServer
server = StoreServer("127.0.0.1")
with open("/proc/self/status") as status:
    size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + {ROOM}, resource.getrlimit(resource.RLIMIT_AS)[1]))
print(server.port, flush=True)
sys.stdin.read()
"""

CLOSED = re.compile(r"E\d{4} [\d:.]+ \d+ launcher\] store: closed connection from 127\.0\.0\.1:\d+: (?P<reason>.*)")


@pytest.fixture
def confined():
    """A server process within ROOM (see start and stderr_of)."""
    host = subprocess.Popen([sys.executable, "-c", SERVE_WITHIN_ROOM], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield host
    finally:
        host.stdin.close()
        host.wait(60)


def start(host):
    """The port, once the server process listens; a TCPStore client of it."""
    port = int(host.stdout.readline())
    return port, TCPStore("127.0.0.1", port, timeout=60)


def stderr_of(host):
    host.stdin.close()
    assert host.wait(60) == 0
    return host.stderr.read()


def connect(port):
    conn = socket.create_connection(("127.0.0.1", port), timeout=60)
    conn.sendall(VALIDATE)
    return conn


def read_until_closed(conn):
    data = b""
    try:
        while chunk := conn.recv(1 << 20):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def multi_get(port, key, times):
    """A MULTI_GET naming key times over; what the server sends before it closes the connection."""
    conn = connect(port)
    conn.sendall(b"\x0a" + struct.pack("<Q", times) + wire(key) * times)
    return read_until_closed(conn)


@pytest.mark.address_space_limit
def test_a_reply_past_the_limit_or_past_memory_costs_only_its_connection(confined):
    port, store = start(confined)
    value = os.urandom(16 << 20)
    store.set("big", value)
    # As a user found it: 512 times 16 MiB asked for, 8 GiB, refused before any of it is built.
    assert multi_get(port, b"/big", 512) == b""
    # 60 times 16 MiB: within the reply limit (1 GiB), but not within the room the server has.
    assert multi_get(port, b"/big", 60) == b""
    assert store.get("big") == value
    assert store.multi_get(["big", "big"]) == [value, value]
    lines = stderr_of(confined).splitlines()
    assert [CLOSED.fullmatch(line)["reason"] for line in lines] == [
        "reply of at least 1090519560 bytes exceeds the limit of 1073807360 bytes",
        "out of memory for a reply of 1006633440 bytes",
    ], lines


@pytest.mark.address_space_limit
def test_a_value_past_memory_costs_only_its_connection(confined):
    port, store = start(confined)
    store.set("small", "v")
    bystander = connect(port)
    greedy = connect(port)
    block = b"x" * (1 << 20)
    try:
        greedy.sendall(b"\x01" + wire(b"/big") + struct.pack("<Q", 512 << 20))
        for _ in range(512):
            greedy.sendall(block)
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed before it was all sent: the point
    assert read_until_closed(greedy) == b""
    bystander.sendall(ping_frame(5))
    assert recv_exactly(bystander, 4) == struct.pack("<I", 5)
    assert not store.check(["big"]) and store.get("small") == b"v"
    [line] = stderr_of(confined).splitlines()
    assert re.fullmatch(r"out of memory for \d+ bytes of a request", CLOSED.fullmatch(line)["reason"]), line


def test_no_cpp_exception_becomes_a_python_one_without_the_gil():
    """Cython turns a C++ exception (std::bad_alloc) from a call declared `except +` into a Python
    one, taking the GIL first where the code runs without it: the store's loop thread would wait
    on the hosting process's Python, and in a noexcept function print "Exception ignored" and
    carry on half done. The store's code without the GIL allocates through store_alloc.h instead,
    so the C++ Cython generates for it has no such conversion."""
    with open(os.path.join(REPO, "_native", "store.cpp")) as f:
        generated = f.read()
    assert not re.search(r"__Pyx_PyGILState_Ensure\(\);\s*__Pyx_CppExn2PyErr\(\);", generated)
