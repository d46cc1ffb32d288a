"""The launcher's key-value store: torch's TCPStore, wire-compatible, without torch.

``TCPStore`` speaks the c10d TCPStore protocol of PyTorch 2.13, as a client and
(``is_master=True``) as a server, so torch's workers can use a launcher's store
(``TORCHELASTIC_USE_AGENT_STORE=True``) and a launcher can join a store torch
hosts. Names, signatures and error classes are torch's::

    store = TCPStore("localhost", 0, world_size=2, is_master=True, interrupt_fd=signal_fd)
    store.set("key", b"value")
    store.get("key")                     # waits for the key, up to the store's timeout
    store.server.clear(b"/rdzv/")        # between attempts: drop every key but /rdzv/...

The server runs on a native thread that never takes the GIL. Every blocking
client call also watches ``interrupt_fd`` (say the agent's signalfd) and raises
``StoreInterrupted`` as soon as it is readable, without reading it.
"""
from __future__ import annotations

import socket
import threading
import weakref
from datetime import timedelta

from launcher._native.store import (
    Client,
    DistError,
    DistNetworkError,
    DistStoreError,
    QueueEmptyError,
    StoreInterrupted,
)
from launcher._native.store import Server as StoreServer

__all__ = [
    "DistError",
    "DistNetworkError",
    "DistStoreError",
    "PrefixStore",
    "QueueEmptyError",
    "StoreInterrupted",
    "StoreServer",
    "TCPStore",
    "create_store",
    "get_free_port",
    "get_socket_with_port",
]

KEY_PREFIX = "/"  # torch's client sends every user key behind it
INIT_KEY = b"init/"  # the count of clients that joined (torch's key, sent without the prefix)

# multi_tenant: one server per (host, port) in this process, shared while any store uses it.
_shared_servers: "weakref.WeakValueDictionary[tuple[str, int], StoreServer]" = weakref.WeakValueDictionary()
_shared_servers_lock = threading.Lock()


def _seconds(timeout) -> float:
    if isinstance(timeout, timedelta):
        return timeout.total_seconds()
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        return float(timeout)
    raise TypeError(f"timeout must be a timedelta or a number of seconds, got {type(timeout).__name__}")


def _value(value) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"store values are str or bytes, got {type(value).__name__}")


def _serve(host: str, port: int, multi_tenant: bool) -> StoreServer:
    if not multi_tenant:
        return StoreServer(host, port)
    with _shared_servers_lock:
        server = _shared_servers.get((host, port)) if port else None
        if server is None:
            server = StoreServer(host, port)
            _shared_servers[(host, server.port)] = server
        return server


class TCPStore:
    """torch.distributed.TCPStore's API over the launcher's native client and server.

    With ``is_master`` this process hosts the server on ``host_name:port`` (port 0:
    a free port, see ``.port``); every instance connects a client to it. With
    ``world_size`` and ``wait_for_workers`` each instance adds itself to the
    ``init/`` count and the master waits until ``world_size`` have joined.
    """

    def __init__(
        self,
        host_name: str,
        port: int,
        world_size: int | None = None,
        is_master: bool = False,
        timeout: timedelta | float = timedelta(seconds=300),
        wait_for_workers: bool = True,
        multi_tenant: bool = False,
        *,
        interrupt_fd: int = -1,
    ):
        seconds = _seconds(timeout)
        self.host = host_name
        self.server: StoreServer | None = None
        self._owns_server = is_master and not multi_tenant
        self._client: Client | None = None
        if is_master:
            self.server = _serve(host_name, port, multi_tenant)
            port = self.server.port
        self.port = port
        try:
            self._client = Client(host_name, port, seconds, interrupt_fd)
            if world_size is not None and wait_for_workers:
                self._client.add(INIT_KEY, 1)
                if self.server is not None:
                    joined = self.server.wait_count(INIT_KEY, world_size, seconds, interrupt_fd)
                    if joined < world_size:
                        raise DistStoreError(
                            f"Timed out after {seconds:g} seconds waiting for clients. "
                            f"{joined}/{world_size} clients joined."
                        )
        except BaseException:
            self.close()
            raise

    @property
    def timeout(self) -> timedelta:
        return timedelta(seconds=self._client.timeout)

    def set_timeout(self, timeout: timedelta | float) -> None:
        self._client.timeout = _seconds(timeout)

    def close(self) -> None:
        """Disconnect; the master also stops its server (a shared one stops with its last user)."""
        if self._client is not None:
            self._client.close()
        if self._owns_server and self.server is not None:
            self.server.close()

    def __enter__(self) -> "TCPStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TCPStore({self.host}:{self.port}{', master' if self.server is not None else ''})"

    @staticmethod
    def _key(key: str) -> bytes:
        if not isinstance(key, str):
            raise TypeError(f"store keys are str, got {type(key).__name__}")
        return (KEY_PREFIX + key).encode("utf-8", "surrogateescape")

    def set(self, key: str, value: str | bytes) -> None:
        self._client.set(self._key(key), _value(value))

    def get(self, key: str) -> bytes:
        """The value at key, once it exists (waits up to the store's timeout)."""
        wire = self._key(key)
        self._client.wait([wire], self._client.timeout)
        return self._client.get(wire)

    def add(self, key: str, value: int) -> int:
        return self._client.add(self._key(key), value)

    def compare_set(self, key: str, expected_value: str | bytes, desired_value: str | bytes) -> bytes:
        return self._client.compare_set(self._key(key), _value(expected_value), _value(desired_value))

    def check(self, keys: list[str]) -> bool:
        return self._client.check([self._key(key) for key in keys])

    def wait(self, keys: list[str], timeout: timedelta | float | None = None) -> None:
        seconds = self._client.timeout if timeout is None else _seconds(timeout)
        self._client.wait([self._key(key) for key in keys], seconds)

    def num_keys(self) -> int:
        """Every key in the store, the ``init/`` count included (torch counts it too)."""
        return self._client.num_keys()

    def delete_key(self, key: str) -> bool:
        return self._client.delete_key(self._key(key))

    def append(self, key: str, value: str | bytes) -> None:
        self._client.append(self._key(key), _value(value))

    def multi_get(self, keys: list[str]) -> list[bytes]:
        """The values at keys, once they all exist (waits up to the store's timeout)."""
        wire = [self._key(key) for key in keys]
        self._client.wait(wire, self._client.timeout)
        return self._client.multi_get(wire)

    def multi_set(self, keys: list[str], values: list[str | bytes]) -> None:
        self._client.multi_set([self._key(key) for key in keys], [_value(value) for value in values])

    def queue_push(self, key: str, value: str | bytes) -> None:
        self._client.queue_push(self._key(key), _value(value))

    def queue_pop(self, key: str, block: bool = True) -> bytes:
        """The first item; with block, waits for one up to the store's timeout, else raises
        QueueEmptyError on an empty queue."""
        wire = self._key(key)
        if block:
            self._client.wait([wire], self._client.timeout)
        item = self._client.queue_pop(wire)
        if item is None:
            raise QueueEmptyError("queue is empty")
        return item

    def queue_len(self, key: str) -> int:
        return self._client.queue_len(self._key(key))

    def list_keys(self) -> list[str]:
        """User keys (without torch's "/" in front); ``init/`` and queues are not keys here."""
        return [
            wire.decode("utf-8", "surrogateescape")[len(KEY_PREFIX):]
            for wire in self._client.list_keys()
            if wire.startswith(KEY_PREFIX.encode())
        ]


class PrefixStore:
    """torch's PrefixStore: the same API on ``store``, every key becoming ``prefix/key``."""

    def __init__(self, prefix: str, store):
        self.prefix = prefix
        self._store = store

    @property
    def underlying_store(self):
        return self._store

    @property
    def timeout(self) -> timedelta:
        return self._store.timeout

    def set_timeout(self, timeout: timedelta | float) -> None:
        self._store.set_timeout(timeout)

    def _key(self, key: str) -> str:
        if not isinstance(key, str):
            raise TypeError(f"store keys are str, got {type(key).__name__}")
        return f"{self.prefix}/{key}"

    def set(self, key: str, value: str | bytes) -> None:
        self._store.set(self._key(key), value)

    def get(self, key: str) -> bytes:
        return self._store.get(self._key(key))

    def add(self, key: str, value: int) -> int:
        return self._store.add(self._key(key), value)

    def compare_set(self, key: str, expected_value: str | bytes, desired_value: str | bytes) -> bytes:
        return self._store.compare_set(self._key(key), expected_value, desired_value)

    def check(self, keys: list[str]) -> bool:
        return self._store.check([self._key(key) for key in keys])

    def wait(self, keys: list[str], timeout: timedelta | float | None = None) -> None:
        self._store.wait([self._key(key) for key in keys], timeout)

    def num_keys(self) -> int:
        """Every key of the underlying store, as torch's PrefixStore counts."""
        return self._store.num_keys()

    def delete_key(self, key: str) -> bool:
        return self._store.delete_key(self._key(key))

    def append(self, key: str, value: str | bytes) -> None:
        self._store.append(self._key(key), value)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return self._store.multi_get([self._key(key) for key in keys])

    def multi_set(self, keys: list[str], values: list[str | bytes]) -> None:
        self._store.multi_set([self._key(key) for key in keys], values)

    def queue_push(self, key: str, value: str | bytes) -> None:
        self._store.queue_push(self._key(key), value)

    def queue_pop(self, key: str, block: bool = True) -> bytes:
        return self._store.queue_pop(self._key(key), block)

    def queue_len(self, key: str) -> int:
        return self._store.queue_len(self._key(key))

    def list_keys(self) -> list[str]:
        mine = self.prefix + "/"
        return [key[len(mine):] for key in self._store.list_keys() if key.startswith(mine)]


def create_store(
    is_server: bool,
    server_addr: str,
    server_port: int = -1,
    world_size: int = 1,
    timeout: float = 60,
    wait_for_workers: bool = True,
) -> TCPStore:
    """torch's create_c10d_store: the server (is_server) or a client of server_addr:server_port.

    server_port -1 lets the server pick a free port (only for world_size 1). With
    wait_for_workers every member also waits, up to timeout seconds, until all
    world_size have joined.
    """
    if server_port == -1 and world_size > 1:
        raise ValueError(
            f"server_port must be specified when world_size > 1, got server_port={server_port}, world_size={world_size}"
        )
    store = TCPStore(
        server_addr,
        max(server_port, 0),
        world_size,
        is_server,
        timedelta(seconds=timeout),
        wait_for_workers,
    )
    if wait_for_workers:
        try:
            # torch's full-rank check, on its keys: every member, not only the master, waits for the others.
            if store.add("_tcp_store/num_members/num_members", 1) == world_size:
                store.set("_tcp_store/num_members/last_member", "<val_ignored>")
            store.wait(["_tcp_store/num_members/last_member"])
        except BaseException:
            store.close()
            raise
    return store


def get_socket_with_port() -> socket.socket:
    """A listening socket on a free localhost port; close it right before handing the port on."""
    for family, kind, proto, _, _ in socket.getaddrinfo("localhost", None, socket.AF_UNSPEC, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.bind(("localhost", 0))
            sock.listen(0)
            return sock
        except OSError:
            sock.close()
    raise RuntimeError("Failed to create a socket")


def get_free_port() -> int:
    """A localhost port free right now (not reserved: another process may take it)."""
    with get_socket_with_port() as sock:
        return sock.getsockname()[1]
