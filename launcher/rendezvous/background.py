"""What a handler runs beside the agent: daemon threads, each on a connection of its own.

``WaitingNodes`` is a handler's ``waiting_fd()``: a pipe that an
``ArrivalWatcher`` thread makes readable when a node joins the round after
the current one.
"""
from __future__ import annotations

import logging
import os
import threading

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


class ArrivalWatcher(BackgroundThread):
    """Sets ``notify`` whenever a node joins ``round`` (the round after ours)."""

    def __init__(self, connect: Connect, round: int, notify: Signal, poll: float):
        super().__init__(connect, poll, f"rendezvous-watch-{round}")
        self._round = round
        self._notify = notify
        self._poll = poll

    def run(self) -> None:
        count = 0
        try:
            while not self._stopping.is_set():
                now = self.kv.wait_joined(self._round, count, self._poll)
                if now > count:
                    count = now
                    self._notify.set()
        except StoreInterrupted:
            return
        except RendezvousError as exc:
            log.warning("rendezvous: stopped watching for waiting nodes: %s", exc)


class WaitingNodes:
    """``fd`` is readable once a node has joined the watched round, until ``clear()``."""

    def __init__(self):
        self._signal = Signal()
        self._watcher: ArrivalWatcher | None = None

    @property
    def fd(self) -> int:
        return self._signal.fd

    @property
    def watching(self) -> bool:
        return self._watcher is not None

    def watch(self, connect: Connect, round: int, poll: float) -> None:
        """Watch ``round`` from a thread of its own (on a connection from ``connect``) until ``stop()``."""
        self.stop()
        self._watcher = ArrivalWatcher(connect, round, self._signal, poll)
        self._watcher.start()

    def clear(self) -> None:
        self._signal.clear()

    def stop(self) -> None:
        """Stop the watcher thread, if one runs, and close its connection."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.close()
            self._watcher = None

    def close(self) -> None:
        self.stop()
        self._signal.close()
