"""The c10d backend: the dynamic rendezvous with its state in our TCP store.

The store at ``--rdzv-endpoint`` is hosted by the agent whose machine the
endpoint names (or that says ``is_host=true``); when its port is taken (another
agent on the same machine was first) it is a client like the others.

Keys, below ``launcher/rdzv/<run id>/``::

    r/<round>/join             the join records, one line each (append)
    r/<round>/count            how many joined (add)
    r/<round>/arrived/<n>      set by the n-th joiner: what a watcher waits for
    hb/<node>                  the node's last heartbeat (wall clock), or "left"
    done/<round>, last_call/<round>, latest   (see dynamic.py)

The static backend keeps its state with the same class below its own prefix.
"""
from __future__ import annotations

import ipaddress
import socket
import time
from typing import Any, Callable

from launcher.rendezvous import RendezvousConnectionError, RendezvousHandler, RendezvousParameters
from launcher.rendezvous.dynamic import DynamicRendezvousHandler, KeyValueBackend, Settings
from launcher.rendezvous.options import parse_rdzv_endpoint
from launcher.store import DistError, DistNetworkError, DistStoreError, StoreInterrupted, TCPStore

LEFT = b"left"
# compare_set with an expected value no key holds reads without waiting, in one
# round trip: it returns the value, or (torch's rule) this very value for a missing key.
_ABSENT = b"\0absent"


class StoreBackend(KeyValueBackend):
    """The rendezvous state of one run in a TCP store, below ``prefix``."""

    def __init__(self, store: TCPStore, prefix: str, where: str, liveness: float):
        self._store = store
        self._prefix = prefix
        self._where = where  # "c10d store 127.0.0.1:29400"
        self._liveness = liveness

    def _call(self, operation: Callable, *args) -> Any:
        started = time.monotonic()
        try:
            return operation(*args)
        except StoreInterrupted:
            raise
        except DistStoreError as exc:
            raise RendezvousConnectionError(
                f"the {self._where} did not answer ({exc}); waited {time.monotonic() - started:.0f} s"
            ) from None
        except DistError as exc:
            raise RendezvousConnectionError(
                f"lost the {self._where} ({exc}) after {time.monotonic() - started:.0f} s"
            ) from None

    def _key(self, key: str) -> str:
        return self._prefix + key

    def get(self, key: str) -> bytes | None:
        value = self._call(self._store.compare_set, self._key(key), _ABSENT, _ABSENT)
        return None if value == _ABSENT else value

    def set(self, key: str, value: bytes) -> None:
        self._call(self._store.set, self._key(key), value)

    def compare_set(self, key: str, expected: bytes | None, value: bytes) -> bytes:
        return self._call(self._store.compare_set, self._key(key), expected or b"", value)

    def wait(self, key: str, timeout: float) -> bytes | None:
        full = self._key(key)
        try:
            self._store.wait([full], timeout)
        except StoreInterrupted:
            raise
        except DistStoreError:
            return None  # not there in time
        except DistError as exc:
            raise RendezvousConnectionError(f"lost the {self._where} ({exc})") from None
        return self.get(key)

    def join(self, round: int, node_id: str, record: bytes) -> int:
        # Append before counting: a node that sees count n finds n records.
        self._call(self._store.append, self._key(f"r/{round}/join"), record + b"\n")
        position = self._call(self._store.add, self._key(f"r/{round}/count"), 1)
        self._call(self._store.set, self._key(f"r/{round}/arrived/{position}"), b"")
        return position

    def joined(self, round: int) -> list[bytes]:
        if self._call(self._store.add, self._key(f"r/{round}/count"), 0) == 0:
            return []
        return self.get(f"r/{round}/join").splitlines()

    def wait_joined(self, round: int, count: int, timeout: float) -> int:
        if self.wait(f"r/{round}/arrived/{count + 1}", timeout) is None:
            return count
        return self._call(self._store.add, self._key(f"r/{round}/count"), 0)

    def heartbeat(self, node_id: str) -> None:
        self._call(self._store.set, self._key(f"hb/{node_id}"), f"{time.time():.3f}".encode())

    def mark_left(self, node_id: str) -> None:
        self._call(self._store.set, self._key(f"hb/{node_id}"), LEFT)

    def alive(self, node_ids: list[str]) -> set[str]:
        if not node_ids:
            return set()
        # Every node heartbeats before its first join record, so these keys exist.
        beats = self._call(self._store.multi_get, [self._key(f"hb/{i}") for i in node_ids])
        oldest = time.time() - self._liveness
        return {i for i, beat in zip(node_ids, beats) if beat != LEFT and float(beat) >= oldest}

    def set_timeout(self, timeout: float) -> None:
        self._store.set_timeout(timeout)

    def close(self) -> None:
        self._store.close()


def _is_this_machine(host: str) -> bool:
    """Whether ``host`` names this machine (torch's _matches_machine_hostname)."""
    if host == "localhost":
        return True
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass
    if host in (socket.gethostname(), socket.getfqdn()):
        return True
    try:
        theirs = {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
        ours = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, proto=socket.IPPROTO_TCP)}
    except OSError:
        return False
    return bool(theirs & ours)


def create_c10d_handler(params: RendezvousParameters, config: dict[str, Any]) -> RendezvousHandler:
    (endpoint,) = parse_rdzv_endpoint("c10d", params.endpoint)
    host, port = endpoint.host, endpoint.port
    settings = Settings.from_config(params, config)
    is_host = config["is_host"] if config["is_host"] is not None else _is_this_machine(host)
    owned = []
    if is_host:
        try:
            hosted = TCPStore(
                host, port, is_master=True, multi_tenant=True, wait_for_workers=False, timeout=settings.read_timeout
            )
            owned.append(hosted)
            port = hosted.port  # the real one when the endpoint says port 0
        except DistNetworkError as exc:
            # Another agent on this machine hosts it (torch falls back the same way),
            # unless the user said this one must.
            if config["is_host"]:
                raise RendezvousConnectionError(
                    f"cannot host the c10d rendezvous store at {host}:{port}: {exc}"
                ) from None
    where = f"c10d store {host}:{port}"
    prefix = f"launcher/rdzv/{params.run_id}/"

    def connect(interrupt_fd: int, timeout: float) -> StoreBackend:
        try:
            store = TCPStore(host, port, timeout=timeout, interrupt_fd=interrupt_fd)
        except StoreInterrupted:
            raise
        except DistError as exc:
            raise RendezvousConnectionError(f"cannot reach the {where} ({exc}); tried for {timeout:g} s") from None
        return StoreBackend(store, prefix, where, settings.liveness)

    try:
        return DynamicRendezvousHandler("c10d", where, settings, connect, params, owned=owned)
    except BaseException:
        for store in owned:
            store.close()
        raise
