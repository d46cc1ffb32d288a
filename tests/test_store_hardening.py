"""Bad input, slow and greedy clients: each costs only its own connection, with one log line."""
import os
import re
import socket
import struct
import threading
import time

import pytest
from helpers import REPO, VALIDATE, ping_frame, recv_exactly, wire
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher._native.store import parse_frame
from launcher.store import StoreServer, TCPStore

LOG_LINE = re.compile(
    r"E\d{4} \d\d:\d\d:\d\d\.\d{3} (?P<pid>\d+) launcher\] "
    r"store: closed connection from 127\.0\.0\.1:(?P<port>\d+): (?P<reason>.*)"
)


def connect(port):
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def served(port_or_conn):
    """A PING round trip on a connection (or a new one): the server is serving it."""
    conn = connect(port_or_conn) if isinstance(port_or_conn, int) else port_or_conn
    if isinstance(port_or_conn, int):
        conn.sendall(VALIDATE)
    conn.sendall(ping_frame(99))
    return recv_exactly(conn, 4) == struct.pack("<I", 99)


def read_until_closed(conn):
    """Everything the server sends until it closes conn."""
    data = b""
    try:
        while chunk := conn.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def log_lines(capfd):
    return [line for line in capfd.readouterr().err.splitlines() if "launcher]" in line]


@pytest.fixture
def server():
    server = StoreServer("127.0.0.1")
    yield server
    server.close()


# (what the client sends, a valid PING goes first where it can, the reason logged)
BAD_INPUT = {
    "wrong magic": (b"\x00" + struct.pack("<I", 0x12345678), False, "wrong VALIDATE magic 0x12345678"),
    "no VALIDATE": (ping_frame(1), False, "expected VALIDATE (0x00) first, got command byte 0x0d"),
    "unknown command": (b"\x42", True, "unknown command byte 0x42"),
    "VALIDATE twice": (VALIDATE, True, "unknown command byte 0x00"),
    "length prefix 2^63": (
        b"\x01" + struct.pack("<Q", 1 << 63),
        True,
        "length prefix 9223372036854775808 exceeds the limit of 1073741824 bytes",
    ),
    "key count 2^60": (
        b"\x06" + struct.pack("<Q", 1 << 60),
        True,
        "key count 1152921504606846976 cannot fit in a request of at most 1073807360 bytes",
    ),
    "non-integer ADD": (
        b"\x01" + wire(b"/x") + wire(b"abc") + b"\x04" + wire(b"/x") + struct.pack("<q", 1),
        True,
        "ADD on a value that is not a 64-bit integer (key /x)",
    ),
    "non-integer BARRIER": (
        b"\x01" + wire(b"/b\x01") + wire(b"") + b"\x12" + wire(b"/b\x01") + struct.pack("<q", 2),
        True,
        "BARRIER on a value that is not a 64-bit integer (key /b\\x01)",
    ),
    "truncated frame": (
        b"\x01" + struct.pack("<Q", 10) + b"/abc", True, "closed in the middle of a request (13 bytes of it received)"
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_bad_input_closes_only_that_connection(server, capfd, name):
    data, ping_first, reason = BAD_INPUT[name]
    bystander = connect(server.port)
    bystander.sendall(VALIDATE)
    assert served(bystander)
    bad = connect(server.port)
    if ping_first:
        data = VALIDATE + ping_frame(5) + data
    bad.sendall(data)
    if name == "truncated frame":
        bad.shutdown(socket.SHUT_WR)
    received = read_until_closed(bad)
    # Replies to the valid requests before the bad one are not lost.
    assert received == (struct.pack("<I", 5) if ping_first else b"")
    assert served(bystander) and served(server.port)
    lines = log_lines(capfd)
    assert len(lines) == 1, lines
    logged = LOG_LINE.fullmatch(lines[0])
    assert logged, lines[0]
    assert logged["reason"] == reason
    assert int(logged["port"]) == bad.getsockname()[1] and int(logged["pid"]) == os.getpid()


def test_value_size_limit(capfd):
    server = StoreServer("127.0.0.1", max_value_size=1024)
    try:
        store = TCPStore("127.0.0.1", server.port, timeout=30)
        store.set("fits", b"x" * 1024)
        assert store.get("fits") == b"x" * 1024
        greedy = connect(server.port)
        greedy.sendall(VALIDATE + b"\x01" + wire(b"/big") + struct.pack("<Q", 1025))
        assert read_until_closed(greedy) == b""
        # Many values each within the limit, but more in one request than the limit allows.
        greedy = connect(server.port)
        greedy.sendall(VALIDATE + b"\x0b" + struct.pack("<Q", 100) + (wire(b"/k") + wire(b"v" * 1000)) * 100)
        assert read_until_closed(greedy) == b""
        assert store.get("fits") == b"x" * 1024 and not store.check(["big"])
        reasons = [LOG_LINE.fullmatch(line)["reason"] for line in log_lines(capfd)]
        assert reasons == [
            "length prefix 1025 exceeds the limit of 1024 bytes",
            "request of at least 67197 bytes exceeds the limit of 66560 bytes",
        ]
    finally:
        server.close()


def test_a_reply_past_the_limit_closes_the_connection_before_it_is_built(capfd):
    server = StoreServer("127.0.0.1", max_value_size=1 << 20)
    try:
        store = TCPStore("127.0.0.1", server.port, timeout=30)
        value = os.urandom(1 << 20)
        store.set("big", value)
        assert store.multi_get(["big"]) == [value]  # the largest value fits in a reply
        # 24 times the largest value, asked for in 300 bytes: refused, not built.
        greedy = connect(server.port)
        greedy.sendall(VALIDATE + b"\x0a" + struct.pack("<Q", 24) + wire(b"/big") * 24)
        assert read_until_closed(greedy) == b""
        assert store.get("big") == value and served(server.port)
        [line] = log_lines(capfd)
        reason = LOG_LINE.fullmatch(line)["reason"]
        assert reason == "reply of at least 2097168 bytes exceeds the limit of 1114112 bytes"
    finally:
        server.close()


WAITER_LIMIT = 1 << 18  # the WAIT and BARRIER requests one connection may have waiting (the module text)


def test_a_connection_may_have_so_many_requests_waiting(server, capfd):
    bystander = connect(server.port)
    bystander.sendall(VALIDATE)
    greedy = connect(server.port)
    greedy.sendall(VALIDATE + (b"\x06" + struct.pack("<Q", 1) + wire(b"/k")) * WAITER_LIMIT)
    assert served(greedy)  # all of them waiting
    greedy.sendall(b"\x12" + wire(b"/b") + struct.pack("<q", 2))  # one more: a BARRIER
    assert read_until_closed(greedy) == b""
    [line] = log_lines(capfd)
    assert LOG_LINE.fullmatch(line)["reason"] == "more than 262144 WAIT and BARRIER requests waiting on one connection"
    # Refused before it counted itself; and the others are served.
    bystander.sendall(b"\x05" + struct.pack("<Q", 1) + wire(b"/b"))
    assert recv_exactly(bystander, 1) == b"\x01"
    assert served(bystander)


def trickle(conn, data, pause):
    """Send data one byte at a time, pause seconds apart; False when the server closed conn."""
    for i in range(len(data)):
        try:
            conn.sendall(data[i:i + 1])
        except (BrokenPipeError, ConnectionResetError):
            return False
        time.sleep(pause)
    return True


def test_a_trickling_client_delays_no_one_and_is_closed_past_the_request_timeout(capfd):
    server = StoreServer("127.0.0.1", request_timeout=3.0)
    try:
        store = TCPStore("127.0.0.1", server.port, timeout=30)
        slow_but_in_time = connect(server.port)
        slow_but_in_time.sendall(VALIDATE)
        request = b"\x01" + wire(b"/slow") + wire(b"v")
        assert trickle(slow_but_in_time, request, 0.01)  # 23 bytes in ~0.25 s: within the limit
        too_slow = connect(server.port)
        too_slow.sendall(VALIDATE)
        outcome = []
        sender = threading.Thread(target=lambda: outcome.append(trickle(too_slow, request * 100, 0.3)))
        started = time.monotonic()
        sender.start()
        # Everyone else is served while it trickles.
        for i in range(5):
            store.set(f"meanwhile{i}", "v")
            assert store.get(f"meanwhile{i}") == b"v"
        assert read_until_closed(too_slow) == b""
        assert time.monotonic() - started >= 3.0
        sender.join(30)
        assert outcome == [False]
        assert store.get("slow") == b"v" and served(slow_but_in_time)
        [line] = log_lines(capfd)
        assert re.fullmatch(r"request still incomplete \d+\.\d s after it began \(\d+ bytes buffered\)",
                            LOG_LINE.fullmatch(line)["reason"])
    finally:
        server.close()


def test_thousands_of_idle_connections(server):
    idle = []
    try:
        for _ in range(3000):
            conn = connect(server.port)
            conn.sendall(VALIDATE)
            idle.append(conn)
        store = TCPStore("127.0.0.1", server.port, timeout=30)
        store.set("k", "v")
        assert store.get("k") == b"v"
        assert served(idle[0]) and served(idle[-1])
    finally:
        for conn in idle:
            conn.close()


def test_a_client_that_does_not_read_cannot_grow_the_server(server):
    value = os.urandom(1 << 20)
    store = TCPStore("127.0.0.1", server.port, timeout=30)
    store.set("big", value)
    assert store.get("big") == value  # a round trip: the SET is done before anyone reads it
    hoarder = connect(server.port)
    hoarder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    requests = 64
    hoarder.sendall(VALIDATE + (b"\x03" + wire(b"/big")) * requests)
    # 64 MiB of replies wait on it; the server holds back and keeps serving the others.
    for i in range(5):
        store.set(f"other{i}", "v")
        assert store.get(f"other{i}") == b"v"
    for _ in range(requests):
        size = struct.unpack("<Q", recv_exactly(hoarder, 8))[0]
        assert recv_exactly(hoarder, size) == value
    assert served(hoarder)


# --- the request parser, fuzzed ------------------------------------------

keys = st.binary(max_size=12)
COMMANDS = {
    0x01: [keys, keys], 0x02: [keys, keys, keys], 0x03: [keys], 0x04: [keys, "i64"], 0x05: ["list"],
    0x06: ["list"], 0x07: [], 0x08: [keys], 0x09: [keys, keys], 0x0A: ["list"], 0x0B: ["pairs"],
    0x0C: [], 0x0D: ["u32"], 0x0E: [keys, keys], 0x0F: [keys], 0x10: [keys], 0x11: [], 0x12: [keys, "i64"],
}


@st.composite
def frames(draw):
    """A valid request: (its bytes, the command, its keys and values, its number)."""
    command = draw(st.sampled_from(sorted(COMMANDS)))
    data, strings, number = bytes([command]), [], 0
    for part in COMMANDS[command]:
        if part == "i64":
            number = draw(st.integers(-(1 << 63), (1 << 63) - 1))
            data += struct.pack("<q", number)
        elif part == "u32":
            number = draw(st.integers(0, (1 << 32) - 1))
            data += struct.pack("<I", number)
        elif part in ("list", "pairs"):
            items = draw(st.lists(keys, max_size=4))
            data += struct.pack("<Q", len(items))
            if part == "pairs":
                items *= 2  # as many values as keys: the keys again
            for item in items:
                data += wire(item)
            strings += items
        else:
            value = draw(part)
            data += wire(value)
            strings.append(value)
    return data, command, strings, number


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames(), st.binary(max_size=20), st.integers(1, 9))
def test_parser_takes_exactly_one_valid_frame(frame, tail, chunk):
    data, command, strings, number = frame
    assert parse_frame(data + tail) == (len(data), command, strings, number)
    assert parse_frame(data + tail, chunk=chunk) == (len(data), command, strings, number)
    for cut in range(len(data)):
        assert parse_frame(data[:cut]) is None
        assert parse_frame(data[:cut], chunk=chunk) is None


def parsed_or_refused(data, validated, max_value, chunk=0):
    try:
        return parse_frame(data, validated, max_value, chunk=chunk)
    except ValueError as error:
        return str(error)


@settings(max_examples=2500, deadline=None)
@given(st.binary(max_size=64), st.booleans(), st.integers(1, 64), st.integers(1, 9))
def test_the_parser_finds_the_same_in_chunks_as_at_once(data, validated, max_value, chunk):
    """The server parses on from where it stopped as a request's bytes come, in any chunks."""
    assert parsed_or_refused(data, validated, max_value, chunk) == parsed_or_refused(data, validated, max_value)


@settings(max_examples=2500, deadline=None)
@given(st.binary(max_size=64), st.booleans(), st.integers(1, 64))
def test_parser_never_oversteps_on_arbitrary_bytes(data, validated, max_value):
    try:
        parsed = parse_frame(data, validated, max_value)
    except ValueError as error:
        assert str(error)
        return
    if parsed is not None:
        assert 0 < parsed[0] <= len(data)
        assert all(len(value) <= max_value for value in parsed[2])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.binary(max_size=40), frames().map(lambda frame: frame[0])), max_size=6))
def test_server_survives_arbitrary_input(server, chunks):
    conn = connect(server.port)
    conn.settimeout(0.5)
    try:
        conn.sendall(VALIDATE + b"".join(chunks) + ping_frame(3))
        conn.recv(65536)
    except (socket.timeout, ConnectionResetError):
        pass  # waiting forever on a key, or closed: both fine for it
    conn.close()
    assert served(server.port)


SERVE_WITH_FEW_DESCRIPTORS = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
from launcher.store import StoreServer
server = StoreServer("127.0.0.1")
print(server.port, flush=True)
sys.stdin.read()
"""


def test_out_of_descriptors_refuses_connections_and_recovers():
    import subprocess
    import sys

    host = subprocess.Popen(
        [sys.executable, "-c", SERVE_WITH_FEW_DESCRIPTORS],
        cwd=REPO,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    port = int(host.stdout.readline())
    conns, served_count, refused = [], 0, 0
    try:
        for _ in range(60):
            conn = connect(port)
            conn.sendall(VALIDATE + ping_frame(1))
            try:
                if conn.recv(4) == struct.pack("<I", 1):
                    served_count += 1
                    conns.append(conn)
                    continue
            except ConnectionResetError:
                pass
            refused += 1
            conn.close()
        assert served_count > 10 and refused > 0
        for conn in conns[1:]:
            conn.close()
        # Once a request sent after those closes is answered, the server has seen them and
        # given their descriptors back: a new connection is served again.
        assert served(conns[0])
        assert served(port)
    finally:
        host.stdin.close()
        host.wait(30)
    stderr = host.stderr.read()
    refusals = [line for line in stderr.splitlines() if "launcher]" in line]
    assert len(refusals) == refused
    assert all(re.search(r"store: refused a connection from 127\.0\.0\.1:\d+: Too many open files$", line)
               for line in refusals)
