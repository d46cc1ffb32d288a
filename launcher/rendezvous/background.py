"""What a handler runs beside the agent: daemon threads, each on a connection of its own.

``MembershipWatch`` is a handler's ``waiting_fd()``: a pipe made readable by
a ``NewsWatcher`` thread when the round after the current one has news (a
node joined it, or a member of the current round was reported lost), and by
the node's ``Heartbeat`` thread.

The heartbeat is also how members are found lost. The members of a round
form a ring, each watching the next one's heartbeat, so that each keep-alive
period the store serves a constant number of small requests per node, however
many nodes there are: the member that finds the next one dead or gone reports
it once, as news of the round after, which every other member's watcher is
waiting for.
"""
from __future__ import annotations

import logging
import os
import threading
import time

from launcher.rendezvous import RendezvousError
from launcher.rendezvous.keyvalue import Connect
from launcher.store import StoreInterrupted

log = logging.getLogger("launcher.rendezvous")


class Signal:
    """A pipe whose read end (``fd``) is readable once set, until cleared."""

    def __init__(self):
        self.fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def set(self) -> None:
        try:
            os.write(self._write_fd, b"!")
        except BlockingIOError:
            pass  # full: readable anyway

    def clear(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)
        os.close(self._write_fd)


class BackgroundThread(threading.Thread):
    """A daemon thread on a connection of its own, stopped through that connection's interrupt fd."""

    def __init__(self, connect: Connect, timeout: float, name: str):
        super().__init__(name=name, daemon=True)
        self._wake = Signal()
        try:
            self.kv = connect(self._wake.fd, timeout)
        except BaseException:
            self._wake.close()
            raise
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self.is_alive():
            self.join()
        self._wake.clear()

    def close(self) -> None:
        self.kv.close()
        self._wake.close()


class Heartbeat(BackgroundThread):
    """Marks this node alive every keep-alive interval; while a round runs, watches one other member.

    The watched member is reported lost (``KeyValueBackend.report_lost``, in
    the round after the watched one) when two checks an interval apart find it
    dead or gone: a heartbeat that is only late is no loss. ``notify`` is set
    when this thread reports a loss, and when this node's own heartbeats have
    not reached the store for the liveness bound (``unreachable`` says why; by
    then the others count this node dead).
    """

    def __init__(self, connect: Connect, node_id: str, interval: float, liveness: float, timeout: float,
                 notify: Signal):
        super().__init__(connect, timeout, f"rendezvous-heartbeat-{node_id}")
        self._node_id = node_id
        self._interval = interval
        self._liveness = liveness
        self._notify = notify
        self._lock = threading.Lock()
        self._watched: tuple[int, str, bytes] | None = None  # (round, node id, its record for the report)
        self._missing = False  # the last check found the watched member dead or gone
        self.unreachable: str | None = None

    def watch(self, round: int, node_id: str, record: bytes) -> None:
        """Watch ``node_id``, a member of ``round``, until ``unwatch()``."""
        with self._lock:
            self._watched, self._missing = (round, node_id, record), False

    def unwatch(self) -> None:
        with self._lock:
            self._watched = None

    def run(self) -> None:
        reached = time.monotonic()
        while not self._stopping.wait(self._interval):
            try:
                self.kv.heartbeat(self._node_id)
                reached, self.unreachable = time.monotonic(), None
                self._check()
            except StoreInterrupted:
                return
            except RendezvousError as exc:
                if self.unreachable is None and time.monotonic() - reached >= self._liveness:
                    self.unreachable = str(exc)
                    self._notify.set()

    def _check(self) -> None:
        with self._lock:
            watched = self._watched
        if watched is None:
            return
        round, node_id, record = watched
        missing = not self.kv.alive([node_id])
        with self._lock:
            if self._watched is not watched:
                return  # the round ended meanwhile
            confirmed, self._missing = missing and self._missing, missing
            if confirmed:
                self._watched = None  # reported once
        if confirmed:
            self.kv.report_lost(round + 1, node_id, record)
            self._notify.set()


class NewsWatcher(BackgroundThread):
    """Sets ``notify`` whenever ``round`` (the round after ours) has news: a node joined it, or a member
    of ours was reported lost; and once, when it loses its connection to the store."""

    def __init__(self, connect: Connect, round: int, notify: Signal, poll: float):
        super().__init__(connect, poll, f"rendezvous-watch-{round}")
        self._round = round
        self._notify = notify
        self._poll = poll

    def run(self) -> None:
        count = 0
        try:
            while not self._stopping.is_set():
                now = self.kv.wait_news(self._round, count, self._poll)
                if now > count:
                    count = now
                    self._notify.set()
        except StoreInterrupted:
            return
        except RendezvousError as exc:
            # The agent looks at once: its own calls say whether the store is gone.
            log.info("rendezvous: stopped watching for membership changes: %s", exc)
            self._notify.set()


class MembershipWatch:
    """``fd`` is readable once the membership of this node's round may have changed, until ``clear()``.

    Set by a ``NewsWatcher`` (``watch()``) and by the node's ``Heartbeat`` (through ``signal``).
    """

    def __init__(self):
        self.signal = Signal()
        self._watcher: NewsWatcher | None = None

    @property
    def fd(self) -> int:
        return self.signal.fd

    @property
    def watching(self) -> bool:
        return self._watcher is not None

    def watch(self, connect: Connect, round: int, poll: float) -> None:
        """Watch ``round``'s news from a thread of its own (on a connection from ``connect``) until ``stop()``."""
        self.stop()
        self._watcher = NewsWatcher(connect, round, self.signal, poll)
        self._watcher.start()

    def clear(self) -> None:
        self.signal.clear()

    def stop(self) -> None:
        """Stop the watcher thread, if one runs, and close its connection."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.close()
            self._watcher = None

    def close(self) -> None:
        self.stop()
        self.signal.close()
