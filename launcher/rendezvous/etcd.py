"""The etcd backend: the dynamic rendezvous with its state in etcd.

etcd is spoken through its v3 HTTP/JSON gateway (``/v3/...``, etcd >= 3.4)
with the standard library only: a small HTTP/1.1 client whose every wait is a
select() on the socket and the interrupt fd, so the agent's signal ends any
call at once, and whose calls fail over between the listed endpoints until
``read_timeout`` has passed. ``ssl`` is imported for https endpoints only:
the single binary (dist/launcher) carries no TLS library.

Keys, below ``<etcd_prefix>/<run id>/``::

    lease                     the run's lease id; every key of the run is
                              attached to it (TTL 2 h, kept alive by the
                              nodes' heartbeats), so a run's keys disappear
                              two hours after its last node, as torch's
                              etcd-v2 state does
    alive/<node>              attached to the node's own lease (TTL: the
                              keep-alive liveness); gone = dead or left
    r/<round>/join/<node>     join records, in create-revision order
    r/<round>/lost/<node>     members of the round before reported lost; a
                              round's news are the keys below r/<round>/
    left/<round>/<node>       members of the round before that left (not news)
    done/<round>, seat/..., latest   (see dynamic.py and keyvalue.py)
"""
from __future__ import annotations

import base64
import errno
import json
import math
import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from launcher.rendezvous import RendezvousConnectionError, RendezvousError, RendezvousHandler, RendezvousParameters
from launcher.rendezvous.dynamic import DynamicRendezvousHandler, Settings
from launcher.rendezvous.keyvalue import KeyValueBackend
from launcher.rendezvous.options import Endpoint, parse_rdzv_endpoint
from launcher.store import StoreInterrupted

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl  # imported for https endpoints only (see above)
    from typing import Any

RUN_TTL = 7200  # seconds the run's keys outlive its last heartbeat
RUN_KEEPALIVE_INTERVAL = 60.0
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops: the most puts one transaction may hold


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _prefix_end(prefix: str) -> str:
    """The range_end that selects every key starting with ``prefix``."""
    raw = prefix.encode()
    return _b64(raw[:-1] + bytes([raw[-1] + 1]))


class EtcdError(RendezvousError):
    """etcd answered with an error (not a connection problem)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class _Connection:
    """One HTTP/1.1 connection whose every wait also watches the interrupt fd."""

    def __init__(self, endpoint: Endpoint, context: ssl.SSLContext | None, deadline: float, interrupt_fd: int):
        self.endpoint = endpoint
        self._interrupt_fd = interrupt_fd
        self._buffer = b""
        # What a non-blocking call raises while it must wait to read or to write.
        self._wait_to_read: tuple[type[BaseException], ...] = (BlockingIOError,)
        self._wait_to_write: tuple[type[BaseException], ...] = ()
        family, kind, proto, _, address = socket.getaddrinfo(
            endpoint.host, endpoint.port, type=socket.SOCK_STREAM
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = sock.connect_ex(address)
            if code not in (0, errno.EINPROGRESS):
                raise OSError(code, os.strerror(code))
            self._sock = sock
            self._select(write=True, deadline=deadline)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, os.strerror(code))
            if context is not None:
                import ssl

                self._wait_to_read = (ssl.SSLWantReadError, BlockingIOError)
                self._wait_to_write = (ssl.SSLWantWriteError,)
                self._sock = context.wrap_socket(
                    sock, server_hostname=endpoint.host, do_handshake_on_connect=False
                )
                self._io(self._sock.do_handshake, deadline)
        except BaseException:
            sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def _select(self, write: bool, deadline: float) -> None:
        fds = [self._interrupt_fd] if self._interrupt_fd >= 0 else []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer")
            readable, writable, _ = select.select(
                fds + ([] if write else [self._sock]), [self._sock] if write else [], [], left
            )
            if self._interrupt_fd in readable:
                raise StoreInterrupted("interrupted while talking to etcd")
            if readable or writable:
                return

    def _io(self, operation, deadline: float, *args):
        while True:
            try:
                return operation(*args)
            except self._wait_to_read:
                self._select(write=False, deadline=deadline)
            except self._wait_to_write:
                self._select(write=True, deadline=deadline)

    def send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            sent = self._io(self._sock.send, deadline, view)
            view = view[sent:]

    def _fill(self, deadline: float) -> None:
        data = self._io(self._sock.recv, deadline, 65536)
        if not data:
            raise ConnectionError("connection closed by etcd")
        self._buffer += data

    def _line(self, deadline: float) -> bytes:
        while b"\r\n" not in self._buffer:
            self._fill(deadline)
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        return line

    def _exact(self, size: int, deadline: float) -> bytes:
        while len(self._buffer) < size:
            self._fill(deadline)
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def request(self, path: str, body: bytes, deadline: float) -> tuple[int, dict[str, str]]:
        """Send a POST and read the status and headers of its response."""
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.endpoint.host}:{self.endpoint.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.send(head.encode() + body, deadline)
        status_line = self._line(deadline).decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise ConnectionError(f"not an HTTP answer: {status_line[:80]!r}")
        headers = {}
        while line := self._line(deadline):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    def chunks(self, headers: dict[str, str], deadline: float) -> Iterator[bytes]:
        """The body, piece by piece as it arrives."""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self._line(deadline).split(b";")[0], 16)
                if size == 0:
                    while self._line(deadline):  # trailers
                        pass
                    return
                yield self._exact(size, deadline)
                self._exact(2, deadline)
        else:
            yield self._exact(int(headers.get("content-length", "0")), deadline)


class EtcdClient:
    """Calls to etcd's JSON gateway, failing over between endpoints for up to ``timeout`` seconds."""

    def __init__(
        self, endpoints: list[Endpoint], context: ssl.SSLContext | None, timeout: float, interrupt_fd: int
    ):
        self.endpoints = endpoints
        self._context = context
        self.timeout = timeout  # seconds one call may take, failing over included
        self._interrupt_fd = interrupt_fd
        self._connection: _Connection | None = None
        self._next = 0  # the endpoint to try first

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def where(self) -> str:
        return _where(self.endpoints)

    def _connect(self, deadline: float) -> _Connection:
        endpoint = self.endpoints[self._next % len(self.endpoints)]
        return _Connection(endpoint, self._context, deadline, self._interrupt_fd)

    def _pause(self, seconds: float) -> None:
        fds = [self._interrupt_fd] if self._interrupt_fd >= 0 else []
        if select.select(fds, [], [], seconds)[0]:
            raise StoreInterrupted("interrupted while waiting for etcd")

    def call(self, path: str, body: dict) -> dict:
        """One unary request; its JSON answer."""
        return self._attempts(path, body, None)

    def watch(self, body: dict, timeout: float) -> list[dict]:
        """The events of the first watch response that has some; [] after ``timeout`` seconds."""
        return self._attempts("/v3/watch", body, time.monotonic() + timeout)

    def _attempts(self, path: str, body: dict, watch_until: float | None) -> Any:
        started = time.monotonic()
        payload = json.dumps(body).encode()
        pause = 0.1
        while True:
            deadline = time.monotonic() + self.timeout
            try:
                if watch_until is not None:
                    return self._watch_once(payload, watch_until)
                if self._connection is None:
                    self._connection = self._connect(deadline)
                status, headers = self._connection.request(path, payload, deadline)
                data = b"".join(self._connection.chunks(headers, deadline))
                if headers.get("connection", "").lower() == "close":
                    self.close()
                return self._answer(status, data)
            except (OSError, ConnectionError, TimeoutError, ValueError) as exc:  # ssl.SSLError is an OSError
                self.close()
                if self._context is not None and _tls_verification_failed(exc):
                    raise RendezvousConnectionError(f"{self.where()}: TLS verification failed: {exc}") from None
                self._next += 1
                elapsed = time.monotonic() - started
                if elapsed >= self.timeout:
                    reason = (
                        exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
                    )
                    raise RendezvousConnectionError(
                        f"cannot reach {self.where()} ({reason}); tried for {elapsed:.0f} s"
                    ) from None
                self._pause(min(pause, self.timeout - elapsed))
                pause = min(pause * 2, 1.0)

    def _answer(self, status: int, data: bytes) -> dict:
        try:
            answer = json.loads(data) if data else {}
        except ValueError:
            answer = None
        if status == 200 and isinstance(answer, dict):
            return answer
        if isinstance(answer, dict) and "code" in answer:
            raise EtcdError(int(answer["code"]), answer.get("message") or answer.get("error", ""))
        text = data[:80].decode("latin-1").strip()
        raise RendezvousConnectionError(
            f"{self.where()} answered HTTP {status} ({text}); is it etcd 3.4 or newer with its /v3 gateway?"
        )

    def _watch_once(self, payload: bytes, until: float) -> list[dict]:
        # A watch is a stream: it gets a connection of its own, closed when done.
        connection = self._connect(time.monotonic() + self.timeout)
        try:
            status, headers = connection.request("/v3/watch", payload, time.monotonic() + self.timeout)
            if status != 200:
                return self._answer(status, b"".join(connection.chunks(headers, time.monotonic() + self.timeout)))
            pending = b""
            try:
                for chunk in connection.chunks(headers, until):
                    pending += chunk
                    while b"\n" in pending:
                        line, _, pending = pending.partition(b"\n")
                        if not line.strip():
                            continue
                        message = json.loads(line)
                        if "error" in message:
                            error = message["error"]
                            raise EtcdError(int(error.get("grpc_code", error.get("code", 0))), error.get("message", ""))
                        result = message.get("result", {})
                        if result.get("canceled") or result.get("compact_revision"):
                            return [{"compacted": True}]
                        if result.get("events"):
                            return result["events"]
            except TimeoutError:
                if time.monotonic() >= until:
                    return []
                raise
            raise ConnectionError("etcd ended the watch")
        finally:
            connection.close()


@dataclass
class _Session:
    """What the connections of one handler share: its leases."""

    ttl: int  # of the node's lease
    node_lease: int | None = None
    run_lease: int | None = None
    run_keepalive_at: float = 0.0

    def __post_init__(self):
        self.lock = threading.Lock()


class EtcdBackend(KeyValueBackend):
    def __init__(self, client: EtcdClient, prefix: str, session: _Session):
        self._client = client
        self._prefix = prefix  # "<etcd_prefix>/<run id>/"
        self._session = session

    # -- plumbing -----------------------------------------------------------

    def _key(self, key: str) -> str:
        return self._prefix + key

    def _range(self, key: str, prefix: bool = False, **options) -> dict:
        body = {"key": _b64(self._key(key)), **options}
        if prefix:
            body["range_end"] = _prefix_end(self._key(key))
        return self._client.call("/v3/kv/range", body)

    def _run_lease(self) -> int:
        """The lease every key of the run is attached to, granted by the first node."""
        session = self._session
        with session.lock:
            if session.run_lease is not None:
                return session.run_lease
        kvs = self._range("lease").get("kvs")
        if kvs:
            lease = int(base64.b64decode(kvs[0]["value"]))
        else:
            lease = int(self._client.call("/v3/lease/grant", {"TTL": RUN_TTL})["ID"])
            key = _b64(self._key("lease"))
            answer = self._client.call(
                "/v3/kv/txn",
                {
                    "compare": [{"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
                    "success": [{"request_put": {"key": key, "value": _b64(str(lease)), "lease": str(lease)}}],
                    "failure": [{"request_range": {"key": key}}],
                },
            )
            if not answer.get("succeeded"):
                self._client.call("/v3/lease/revoke", {"ID": str(lease)})
                lease = int(base64.b64decode(answer["responses"][0]["response_range"]["kvs"][0]["value"]))
        with session.lock:
            session.run_lease = lease
            session.run_keepalive_at = time.monotonic() + RUN_KEEPALIVE_INTERVAL
        return lease

    def _write(self, build) -> dict:
        """Run a request built for the run's lease, renewing the lease once if etcd lost it."""
        try:
            return self._client.call(*build(self._run_lease()))
        except EtcdError as exc:
            if "lease not found" not in str(exc):
                raise
            with self._session.lock:
                self._session.run_lease = None
            return self._client.call(*build(self._run_lease()))

    def _put_op(self, key: str, value: bytes, lease: int) -> dict:
        return {"key": _b64(self._key(key)), "value": _b64(value), "lease": str(lease)}

    # -- KeyValueBackend ----------------------------------------------------

    def get(self, key: str) -> bytes | None:
        kvs = self._range(key).get("kvs")
        return base64.b64decode(kvs[0].get("value", "")) if kvs else None

    def set(self, key: str, value: bytes) -> None:
        self._write(lambda lease: ("/v3/kv/put", self._put_op(key, value, lease)))

    def compare_set(self, key: str, expected: bytes | None, value: bytes) -> bytes:
        full = _b64(self._key(key))
        if expected is None:
            compare = {"key": full, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
        else:
            compare = {"key": full, "target": "VALUE", "result": "EQUAL", "value": _b64(expected)}
        answer = self._write(
            lambda lease: (
                "/v3/kv/txn",
                {
                    "compare": [compare],
                    "success": [{"request_put": self._put_op(key, value, lease)}],
                    "failure": [{"request_range": {"key": full}}],
                },
            )
        )
        if answer.get("succeeded"):
            return value
        kvs = answer["responses"][0]["response_range"].get("kvs")
        return base64.b64decode(kvs[0].get("value", "")) if kvs else b""

    def wait(self, key: str, timeout: float) -> bytes | None:
        until = time.monotonic() + timeout
        while True:
            answer = self._range(key)
            if answer.get("kvs"):
                return base64.b64decode(answer["kvs"][0].get("value", ""))
            left = until - time.monotonic()
            if left <= 0:
                return None
            revision = int(answer["header"]["revision"]) + 1
            events = self._client.watch(
                {"create_request": {"key": _b64(self._key(key)), "start_revision": str(revision)}}, left
            )
            for event in events:
                if event.get("type", "PUT") == "PUT" and "kv" in event:
                    return base64.b64decode(event["kv"].get("value", ""))

    def set_many(self, values: dict[str, bytes]) -> None:
        items = list(values.items())
        for start in range(0, len(items), MAX_TXN_OPS):
            batch = items[start:start + MAX_TXN_OPS]
            self._write(
                lambda lease, batch=batch: (
                    "/v3/kv/txn",
                    {"success": [{"request_put": self._put_op(key, value, lease)} for key, value in batch]},
                )
            )

    def _values(self, prefix: str) -> list[bytes]:
        """The values of the keys below ``prefix``, in the order they were created."""
        found = self._range(prefix, prefix=True, sort_target="CREATE", sort_order="ASCEND")
        return [base64.b64decode(kv.get("value", "")) for kv in found.get("kvs", [])]

    def join(self, round: int, node_id: str, record: bytes) -> None:
        self.set(f"r/{round}/join/{node_id}", record)

    def joined(self, round: int) -> list[bytes]:
        return self._values(f"r/{round}/join/")

    def report_lost(self, round: int, node_id: str, record: bytes) -> None:
        self.set(f"r/{round}/lost/{node_id}", record)

    def lost(self, round: int) -> list[bytes]:
        return self._values(f"r/{round}/lost/")

    def news(self, round: int) -> int:
        return int(self._range(f"r/{round}/", prefix=True, count_only=True).get("count", 0))

    def wait_news(self, round: int, count: int, timeout: float) -> int:
        until = time.monotonic() + timeout
        prefix = f"r/{round}/"
        while True:
            answer = self._range(prefix, prefix=True, count_only=True)
            now = int(answer.get("count", 0))
            left = until - time.monotonic()
            if now > count or left <= 0:
                return now
            revision = int(answer["header"]["revision"]) + 1
            self._client.watch(
                {
                    "create_request": {
                        "key": _b64(self._key(prefix)),
                        "range_end": _prefix_end(self._key(prefix)),
                        "start_revision": str(revision),
                    }
                },
                left,
            )

    def heartbeat(self, node_id: str) -> None:
        session = self._session
        with session.lock:
            lease = session.node_lease
            renew_run = session.run_lease is not None and time.monotonic() >= session.run_keepalive_at
        if lease is not None:
            answer = self._client.call("/v3/lease/keepalive", {"ID": str(lease)})
            if int(answer.get("result", {}).get("TTL", 0)) <= 0:
                lease = None  # expired: others already count us dead; come back with a new one
        if lease is None:
            lease = int(self._client.call("/v3/lease/grant", {"TTL": session.ttl})["ID"])
            self._client.call("/v3/kv/put", {"key": _b64(self._key(f"alive/{node_id}")), "lease": str(lease)})
            with session.lock:
                session.node_lease = lease
        if renew_run:
            self._client.call("/v3/lease/keepalive", {"ID": str(session.run_lease)})
            with session.lock:
                session.run_keepalive_at = time.monotonic() + RUN_KEEPALIVE_INTERVAL

    def mark_left(self, node_id: str, round: int | None) -> None:
        with self._session.lock:
            lease, self._session.node_lease = self._session.node_lease, None
        if lease is not None:
            try:
                self._client.call("/v3/lease/revoke", {"ID": str(lease)})
            except EtcdError:
                pass  # already expired: gone anyway
        if round is not None:
            self.set(f"left/{round}/{node_id}", b"")

    def left(self, round: int) -> list[str]:
        prefix = self._key(f"left/{round}/")
        kvs = self._range(f"left/{round}/", prefix=True, keys_only=True).get("kvs", [])
        return [base64.b64decode(kv["key"]).decode()[len(prefix):] for kv in kvs]

    def left_count(self, round: int) -> int:
        return int(self._range(f"left/{round}/", prefix=True, count_only=True).get("count", 0))

    def alive(self, node_ids: list[str]) -> set[str]:
        if len(node_ids) == 1:  # a heartbeat watching one member: its key alone
            return set(node_ids) if self._range(f"alive/{node_ids[0]}", count_only=True).get("count") else set()
        kvs = self._range("alive/", prefix=True, keys_only=True).get("kvs", [])
        present = {base64.b64decode(kv["key"]).decode()[len(self._key("alive/")):] for kv in kvs}
        return present.intersection(node_ids)

    def set_timeout(self, timeout: float) -> None:
        self._client.timeout = timeout

    def close(self) -> None:
        self._client.close()


def _where(endpoints: list[Endpoint]) -> str:
    return "etcd " + ",".join(map(str, endpoints))


def _tls_verification_failed(error: BaseException) -> bool:
    import ssl  # loaded with the TLS context

    return isinstance(error, ssl.SSLCertVerificationError)


def ssl_context(config: dict[str, Any]) -> ssl.SSLContext | None:
    """The TLS settings for https endpoints (cacert, cert, key)."""
    try:
        import ssl
    except ImportError:  # a Python without TLS: the single binary
        raise RendezvousError(
            "https etcd endpoints need TLS, which this launcher does not carry: run `python -m launcher` "
            "from a Python installation for them"
        ) from None
    for name in ("cacert", "cert", "key"):
        path = config[name]
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"--rdzv-conf {name}={path}: no such file")
    if config["key"] and not config["cert"]:
        raise ValueError("--rdzv-conf key= needs cert= (the client certificate it belongs to)")
    context = ssl.create_default_context(cafile=config["cacert"])
    if config["cert"]:
        context.load_cert_chain(config["cert"], config["key"])
    return context


def create_etcd_handler(params: RendezvousParameters, config: dict[str, Any]) -> RendezvousHandler:
    endpoints = parse_rdzv_endpoint("etcd", params.endpoint, config["protocol"])
    https = any(e.scheme == "https" for e in endpoints)
    if not https and any(config[name] for name in ("cacert", "cert", "key")):
        raise ValueError("--rdzv-conf cacert/cert/key need https etcd endpoints (https://HOST:PORT or protocol=https)")
    context = ssl_context(config) if https else None
    settings = Settings.from_config(params, config)
    prefix = f"{config['etcd_prefix'].rstrip('/')}/{params.run_id}/"
    session = _Session(ttl=max(1, math.ceil(settings.liveness)))

    def connect(interrupt_fd: int, timeout: float) -> EtcdBackend:
        return EtcdBackend(EtcdClient(endpoints, context, timeout, interrupt_fd), prefix, session)

    return DynamicRendezvousHandler(_where(endpoints), settings, connect, params)
