"""A run's rendezvous state as key-value operations, and the keys and ids every handler shares.

``KeyValueBackend`` is what a handler needs of the place its nodes meet; the
TCP store implements it here (``StoreBackend``: the c10d and static
backends), etcd in etcd.py. A round's news are the joins and the loss reports
it receives: what a node watching for membership changes waits on. Keys of
``StoreBackend``, below its prefix::

    r/<round>/join             the join records, one line each (append)
    r/<round>/lost             members of the round before reported lost, one record a line (append)
    r/<round>/left             members of the round before that left, one id a line (append)
    r/<round>/left_count       how many of them (add, after the append: a node's last request)
    r/<round>/news             how many joins and loss reports the round has (add)
    r/<round>/news/<n>         set by the n-th of them: what a watcher waits for
    hb/<node>                  the node's last heartbeat (wall clock), or "left"
    latest                     the number of the latest completed round

and the handler's own keys (dynamic.py's ``done/``, ``seat/``... and
static.py's ``rank/`` and ``ready/``).
"""
from __future__ import annotations

import os
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from launcher.rendezvous import RendezvousConnectionError
from launcher.store import DistError, DistStoreError, PrefixStore, StoreInterrupted, TCPStore

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Prefix of every key the agents (not the workers) keep in a store: in the
# workers' store, the static backend clears everything else between rounds.
AGENT_KEY_PREFIX = "launcher"
STATUS_INTERVAL = 5.0  # seconds between two "still waiting" lines
_LATEST = "latest"  # a hint for a node that arrives: rounds up to this one are complete


def agents_store(round: int, store: Any) -> PrefixStore:
    """The agents' part of the workers' store in ``round`` (``RendezvousInfo.store``)."""
    return PrefixStore(f"{AGENT_KEY_PREFIX}/agent/{round}", store)


def fqdn() -> str:
    """This machine's fully qualified name as ``socket.getfqdn()`` finds it (torch's node address), an ASCII
    host name looked up as bytes: a str goes through the IDNA codec, whose first use imports stringprep and
    unicodedata (about 1 ms of every start)."""
    name = socket.gethostname()
    try:
        hostname, aliases, _ = socket.gethostbyaddr(name.encode() if name.isascii() else name)
    except OSError:
        return name
    return next((alias for alias in (hostname, *aliases) if "." in alias), hostname)


def node_address(local_addr: str | None) -> str:
    """How the other nodes reach this one: ``--local-addr``, else this machine's FQDN."""
    return local_addr or fqdn()


def node_id(addr: str) -> str:
    """A node's id in the records, unique per handler: ``<addr>_<pid>_<random>``."""
    return f"{addr}_{os.getpid()}_{os.urandom(4).hex()}"


def node_pid(node: str) -> str:
    """The pid in a ``node_id``."""
    return node.split("_")[-2]


class KeyValueBackend(ABC):
    """One connection to the state of one run (keys are relative to the run).

    Every call may block up to the read timeout and raises
    RendezvousConnectionError when the state cannot be reached, or
    StoreInterrupted when the connection's interrupt fd becomes readable.
    """

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The value of ``key``, None when it does not exist (never waits for it)."""

    @abstractmethod
    def compare_set(self, key: str, expected: bytes | None, value: bytes) -> bytes:
        """Set ``key`` to ``value`` if it holds ``expected`` (None: absent); return what it holds now."""

    @abstractmethod
    def set(self, key: str, value: bytes) -> None:
        """Set ``key`` unconditionally."""

    @abstractmethod
    def wait(self, key: str, timeout: float) -> bytes | None:
        """The value of ``key`` once it exists; None if it does not within ``timeout`` seconds."""

    @abstractmethod
    def set_many(self, values: dict[str, bytes]) -> None:
        """Set every key of ``values``."""

    @abstractmethod
    def join(self, round: int, node_id: str, record: bytes) -> None:
        """Add a record to the round's join list (one piece of news)."""

    @abstractmethod
    def joined(self, round: int) -> list[bytes]:
        """The round's join records, in join order."""

    @abstractmethod
    def report_lost(self, round: int, node_id: str, record: bytes) -> None:
        """Report ``node_id``, a member of the round before ``round``, lost (one piece of news)."""

    @abstractmethod
    def lost(self, round: int) -> list[bytes]:
        """The records of the members of the round before ``round`` reported lost."""

    @abstractmethod
    def news(self, round: int) -> int:
        """How many joins and loss reports ``round`` has received."""

    @abstractmethod
    def wait_news(self, round: int, count: int, timeout: float) -> int:
        """Wait until ``round`` has more than ``count`` pieces of news; return how many it has."""

    @abstractmethod
    def heartbeat(self, node_id: str) -> None:
        """Mark ``node_id`` alive for the next liveness period (keep-alive interval x attempts)."""

    @abstractmethod
    def mark_left(self, node_id: str, round: int | None) -> None:
        """Mark ``node_id`` gone now; with a round, record it among the members of the round
        before that left (quietly: no news)."""

    @abstractmethod
    def left(self, round: int) -> list[str]:
        """The ids of the members of the round before ``round`` that left."""

    @abstractmethod
    def left_count(self, round: int) -> int:
        """How many members of the round before ``round`` left: ``len(left(round))``, in one small read."""

    @abstractmethod
    def alive(self, node_ids: list[str]) -> set[str]:
        """Those of ``node_ids`` whose heartbeat is fresh and that have not left."""

    @abstractmethod
    def set_timeout(self, timeout: float) -> None:
        """From now on every call may take at most ``timeout`` seconds."""

    @abstractmethod
    def close(self) -> None:
        """Close the connection."""

    def open_round(self) -> int:
        """The round after the latest completed one: the first a node arriving now may join."""
        latest = self.get(_LATEST)
        return 0 if latest is None else int(latest) + 1

    def round_completed(self, round: int) -> None:
        """Record ``round`` as the latest completed one."""
        self.set(_LATEST, str(round).encode())


# Opens a connection whose calls take at most timeout seconds and end once interrupt_fd is readable.
Connect = Callable[[int, float], KeyValueBackend]

_LEFT = b"left"
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

    def set_many(self, values: dict[str, bytes]) -> None:
        self._call(self._store.multi_set, [self._key(key) for key in values], list(values.values()))

    def _appeared(self, key: str, timeout: float) -> bool:
        """Whether ``key`` exists within ``timeout`` seconds."""
        try:
            self._store.wait([self._key(key)], timeout)
        except StoreInterrupted:
            raise
        except DistStoreError:
            return False  # not there in time
        except DistError as exc:
            raise RendezvousConnectionError(f"lost the {self._where} ({exc})") from None
        return True

    def wait(self, key: str, timeout: float) -> bytes | None:
        return self.get(key) if self._appeared(key, timeout) else None

    def _lines(self, key: str) -> list[bytes]:
        value = self.get(key)
        return value.splitlines() if value else []

    def _add_news(self, round: int) -> None:
        # After the record it announces: a node that counts n pieces of news finds their records.
        count = self._call(self._store.add, self._key(f"r/{round}/news"), 1)
        self._call(self._store.set, self._key(f"r/{round}/news/{count}"), b"")

    def join(self, round: int, node_id: str, record: bytes) -> None:
        self._call(self._store.append, self._key(f"r/{round}/join"), record + b"\n")
        self._add_news(round)

    def joined(self, round: int) -> list[bytes]:
        return self._lines(f"r/{round}/join")

    def report_lost(self, round: int, node_id: str, record: bytes) -> None:
        self._call(self._store.append, self._key(f"r/{round}/lost"), record + b"\n")
        self._add_news(round)

    def lost(self, round: int) -> list[bytes]:
        return self._lines(f"r/{round}/lost")

    def news(self, round: int) -> int:
        return self._call(self._store.add, self._key(f"r/{round}/news"), 0)

    def wait_news(self, round: int, count: int, timeout: float) -> int:
        return self.news(round) if self._appeared(f"r/{round}/news/{count + 1}", timeout) else count

    def heartbeat(self, node_id: str) -> None:
        self._call(self._store.set, self._key(f"hb/{node_id}"), f"{time.time():.3f}".encode())

    def mark_left(self, node_id: str, round: int | None) -> None:
        self._call(self._store.set, self._key(f"hb/{node_id}"), _LEFT)
        if round is not None:
            self._call(self._store.append, self._key(f"r/{round}/left"), node_id.encode() + b"\n")
            self._call(self._store.add, self._key(f"r/{round}/left_count"), 1)

    def left(self, round: int) -> list[str]:
        return [line.decode() for line in self._lines(f"r/{round}/left")]

    def left_count(self, round: int) -> int:
        return self._call(self._store.add, self._key(f"r/{round}/left_count"), 0)

    def alive(self, node_ids: list[str]) -> set[str]:
        if not node_ids:
            return set()
        if len(node_ids) == 1:  # a heartbeat watching one member: one round trip
            beats = [self.get(f"hb/{node_ids[0]}") or _LEFT]
        else:  # every node heartbeats before its first join record, so these keys exist
            beats = self._call(self._store.multi_get, [self._key(f"hb/{i}") for i in node_ids])
        return {i for i, beat in zip(node_ids, beats) if self._fresh(beat)}

    def running(self, node_id: str) -> bool:
        """Whether ``node_id`` of a completed round still runs: alive, or not beating yet (a static
        node's heartbeat starts just after its first round completes)."""
        beat = self.get(f"hb/{node_id}")
        return beat is None or self._fresh(beat)

    def _fresh(self, beat: bytes) -> bool:
        return beat != _LEFT and float(beat) >= time.time() - self._liveness

    def set_timeout(self, timeout: float) -> None:
        self._store.set_timeout(timeout)

    def close(self) -> None:
        self._store.close()
