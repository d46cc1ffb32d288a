"""The elastic rendezvous shared by the c10d and etcd backends.

Rounds are numbered 0, 1, 2... A round is open until its ``done/<round>``
record exists; that record (written once, by compare-and-set) lists the
members in rank order. Round r+1 opens when round r completes, so a node
that arrives while round r runs joins round r+1 at once: it is a waiting
node, and the agents of round r see it through ``num_nodes_waiting()``.

A node joins a round with one append to the round's join list (the backend
tells it its position), then blocks on the round's ``done`` record. It only
reads the shared state again when it has a reason to: its position reached
the minimum or maximum, a last-call deadline passed, or a keep-alive interval
went by (to notice dead nodes and print the status line). So a round of N
nodes costs O(N) operations, not the O(N^2) of re-reading one shared blob.

A round completes (torch's dynamic rendezvous semantics) when:
- every live member of the previous round has rejoined (a member whose agent
  is still running keeps the next round from completing without it), and
- the maximum has joined (at once), or the minimum has joined and the
  last-call window has passed.

Liveness comes from heartbeats (a daemon thread per node): a node whose
heartbeat is older than keep_alive_interval * keep_alive_max_attempt, or
that left, is not counted. Ranks are stable: the previous round's members
keep their order, newcomers follow in join order.

Group rank 0 hosts the workers' store. Every node starts a store server
before it joins (its port is in its join record), so the members learn
MASTER_ADDR/MASTER_PORT from the ``done`` record without another round trip;
the others close theirs, and rank 0 closes its one when the next round
begins, so a restarted attempt gets a fresh, empty store.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Callable

from launcher.rendezvous import (
    AGENT_KEY_PREFIX,
    NodeInfo,
    RendezvousClosedError,
    RendezvousError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousTimeoutError,
)
from launcher.store import DistNetworkError, PrefixStore, StoreInterrupted, StoreServer, TCPStore

log = logging.getLogger("launcher.rendezvous")

STATUS_INTERVAL = 5.0  # seconds between two "still waiting" lines


@dataclass(frozen=True)
class Settings:
    run_id: str
    min_nodes: int
    max_nodes: int
    join_timeout: float
    last_call_timeout: float
    close_timeout: float
    heartbeat_timeout: float
    keep_alive_interval: float
    keep_alive_max_attempt: int
    read_timeout: float

    @classmethod
    def from_config(cls, params: RendezvousParameters, config: dict[str, Any]) -> "Settings":
        return cls(
            run_id=params.run_id,
            min_nodes=params.min_nodes,
            max_nodes=params.max_nodes,
            join_timeout=config["join_timeout"],
            last_call_timeout=config["last_call_timeout"],
            close_timeout=config["close_timeout"],
            heartbeat_timeout=config["heartbeat_timeout"],
            keep_alive_interval=config["keep_alive_interval"],
            keep_alive_max_attempt=config["keep_alive_max_attempt"],
            read_timeout=config["read_timeout"],
        )

    @property
    def liveness(self) -> float:
        """Seconds without a heartbeat after which a node is dead."""
        return self.keep_alive_interval * self.keep_alive_max_attempt


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
    def join(self, round: int, node_id: str, record: bytes) -> int:
        """Add a record to the round's join list; return how many records it holds now."""

    @abstractmethod
    def joined(self, round: int) -> list[bytes]:
        """The round's join records, in join order."""

    @abstractmethod
    def wait_joined(self, round: int, count: int, timeout: float) -> int:
        """Wait until the round has more than ``count`` join records; return how many it has."""

    @abstractmethod
    def heartbeat(self, node_id: str) -> None:
        """Mark ``node_id`` alive for the next ``Settings.liveness`` seconds."""

    @abstractmethod
    def mark_left(self, node_id: str) -> None:
        """Mark ``node_id`` gone now."""

    @abstractmethod
    def alive(self, node_ids: list[str]) -> set[str]:
        """Those of ``node_ids`` whose heartbeat is fresh and that have not left."""

    @abstractmethod
    def close(self) -> None:
        """Close the connection."""


# Opens a connection whose blocking calls end once the given fd is readable.
Connect = Callable[[int], KeyValueBackend]


@dataclass(frozen=True)
class Member:
    id: str  # unique per handler: addr_pid_random
    addr: str
    local_world_size: int
    role: str
    port: int  # of the workers' store this node hosts if it becomes rank 0

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes | dict) -> "Member":
        return cls(**(json.loads(data) if isinstance(data, bytes) else data))


CLOSED = b'{"closed":true}'


def _done_key(round: int) -> str:
    return f"done/{round}"


def _deadline_key(round: int) -> str:
    return f"last_call/{round}"


_LATEST = "latest"  # a hint: the number of the latest completed round
_NO_DEADLINE = b"none"


def _decode_round(data: bytes) -> list[Member] | None:
    """The members of a completed round; None when it is the closed marker."""
    record = json.loads(data)
    if record.get("closed"):
        return None
    return [Member.decode(item) for item in record["nodes"]]


def _addresses(members: list[Member]) -> str:
    return ", ".join(m.addr for m in members) or "none"


@dataclass
class _RoundView:
    """What one read of the shared state says about an open round."""

    live: list[Member]  # joined and alive, in join order
    pending: list[Member]  # live members of the previous round that have not rejoined
    no_place: bool  # we are a newcomer and the running round has max_nodes live members


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


class _Background(threading.Thread):
    """A daemon thread on a connection of its own, stopped through that connection's interrupt fd."""

    def __init__(self, connect: Connect, name: str):
        super().__init__(name=name, daemon=True)
        self._wake = Signal()
        self.kv = connect(self._wake.fd)
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


class _Heartbeat(_Background):
    def __init__(self, connect: Connect, node_id: str, interval: float):
        super().__init__(connect, f"rendezvous-heartbeat-{node_id}")
        self._node_id = node_id
        self._interval = interval

    def run(self) -> None:
        failing = False
        while not self._stopping.wait(self._interval):
            try:
                self.kv.heartbeat(self._node_id)
                failing = False
            except StoreInterrupted:
                return
            except RendezvousError as exc:
                if not failing:
                    log.warning("rendezvous heartbeat failed: %s", exc)
                failing = True


class ArrivalWatcher(_Background):
    """Sets ``notify`` whenever a node joins ``round`` (the round after ours)."""

    def __init__(self, connect: Connect, round: int, notify: Signal, poll: float):
        super().__init__(connect, f"rendezvous-watch-{round}")
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


class DynamicRendezvousHandler(RendezvousHandler):
    def __init__(
        self,
        backend: str,
        where: str,
        settings: Settings,
        connect: Connect,
        params: RendezvousParameters,
        owned: list | None = None,
    ):
        self.backend = backend
        self.run_id = settings.run_id
        self._where = where  # for messages: "c10d store 127.0.0.1:29400"
        self._settings = settings
        self._connect = connect
        addr = params.local_addr or socket.getfqdn()
        self._bind_addr = params.local_addr
        self._me = Member(
            id=f"{addr}_{os.getpid()}_{secrets.token_hex(4)}",
            addr=addr,
            local_world_size=params.local_world_size,
            role=params.role,
            port=0,
        )
        self._interrupt_fd = params.interrupt_fd
        self._kv = connect(params.interrupt_fd)
        self._owned = owned or []  # closed with the handler: the c10d host's store
        self._heartbeat: _Heartbeat | None = None
        self._watcher: ArrivalWatcher | None = None
        self._waiting = Signal()
        self._round: int | None = None  # the latest round this node is a member of
        self._members: list[Member] = []
        self._server: StoreServer | None = None  # the workers' store while this node is rank 0
        self._agent_store: TCPStore | None = None
        self._closed = False

    # -- the agent's API --------------------------------------------------

    def next_rendezvous(self) -> RendezvousInfo:
        self._end_round()
        settings = self._settings
        started = time.monotonic()
        deadline = started + settings.join_timeout
        self._kv.heartbeat(self._me.id)
        if self._heartbeat is None:
            self._heartbeat = _Heartbeat(self._connect, self._me.id, settings.keep_alive_interval)
            self._heartbeat.start()
        latest = self._kv.get(_LATEST)
        round = max(0 if self._round is None else self._round + 1, 0 if latest is None else int(latest) + 1)
        server: StoreServer | None = None
        try:
            while True:
                done = self._kv.get(_done_key(round))
                if done is None:
                    if server is None:
                        server = self._listen()
                    me = Member(**{**asdict(self._me), "port": server.port})
                    position = self._kv.join(round, me.id, me.encode())
                    log.debug("rendezvous '%s': joined round %d as #%d", self.run_id, round, position)
                    done, deadline = self._await_round(round, position, deadline, started)
                members = _decode_round(done)
                if members is None:
                    raise RendezvousClosedError(
                        f"rendezvous '{self.run_id}' ({self._where}) is closed: the job finished "
                        "or its nodes shut down; start a new job with another --rdzv-id"
                    )
                ids = [m.id for m in members]
                if self._me.id in ids:
                    break
                round += 1  # completed without us: the next round is the one to wait in
        except BaseException as exc:
            if server is not None:
                server.close()
            if isinstance(exc, (RendezvousTimeoutError, RendezvousClosedError)):
                self._leave(close_if_last=False)  # given up: do not let a round count on us
            raise
        rank = ids.index(self._me.id)
        if rank == 0:
            self._server = server
        elif server is not None:
            server.close()
        self._round, self._members = round, members
        master = members[0]
        self._agent_store = TCPStore(
            master.addr, master.port, timeout=settings.read_timeout, interrupt_fd=self._interrupt_fd
        )
        self._watcher = ArrivalWatcher(self._connect, round + 1, self._waiting, settings.read_timeout)
        self._watcher.start()
        log.info(
            "rendezvous '%s' round %d complete: rank %d of %d nodes (%s) after %.1f s",
            self.run_id, round, rank, len(members), _addresses(members), time.monotonic() - started,
        )
        return RendezvousInfo(
            round=round,
            rank=rank,
            nodes=[NodeInfo(m.addr, m.local_world_size, m.role) for m in members],
            master_addr=master.addr,
            master_port=master.port,
            store=PrefixStore(f"{AGENT_KEY_PREFIX}/agent/{round}", self._agent_store),
        )

    def num_nodes_waiting(self) -> int:
        self._waiting.clear()
        if self._round is None:
            return 0
        records = self._records(self._round + 1)
        if not records:
            return 0
        previous = {m.id for m in self._members}
        alive = self._kv.alive(list(previous | {r.id for r in records}))
        full = len(previous & alive) >= self._settings.max_nodes
        # While our round is full a newcomer cannot get in, so it is no reason
        # to restart (torch's redundancy list); a member that rejoined is.
        return sum(
            1
            for r in records
            if r.id in alive and r.id != self._me.id and (not full or r.id in previous)
        )

    def waiting_fd(self) -> int:
        return self._waiting.fd

    def leave(self) -> None:
        self._end_round()
        self._leave(close_if_last=False)
        self._close()

    def shutdown(self) -> None:
        self._end_round()
        self._leave(close_if_last=True)
        self._close()

    # -- rounds -------------------------------------------------------------

    def _listen(self) -> StoreServer:
        """A server for the workers' store: on the address we were given, else on every address."""
        if self._bind_addr is not None:
            return StoreServer(self._bind_addr, 0)
        try:
            return StoreServer("::", 0)  # IPv6 and IPv4
        except DistNetworkError:
            return StoreServer("0.0.0.0", 0)  # IPv6 is off here

    def _await_round(self, round: int, position: int, deadline: float, started: float) -> tuple[bytes, float]:
        """Wait for the round's done record, completing the round when it is due.

        Returns the record and the join deadline (pushed back while the running
        round is full, as torch does not time out nodes waiting for a place).
        """
        settings = self._settings
        kv = self._kv
        now = time.monotonic()
        # Read the state at once only when our arrival may complete the round
        # or start its last call; otherwise the joins still to come will.
        check_at = now if position >= settings.min_nodes else now + settings.keep_alive_interval
        status_at = now + STATUS_INTERVAL
        while True:
            wait = min(check_at, deadline) - now
            done = kv.wait(_done_key(round), wait) if wait > 0 else kv.get(_done_key(round))
            if done is not None:
                return done, deadline
            now = time.monotonic()
            view = self._view(round)
            done, last_call_left = self._advance(round, view)
            if done is not None:
                return done, deadline
            now = time.monotonic()
            if view.no_place:
                deadline = max(deadline, now + settings.join_timeout)
            if now >= deadline:
                raise RendezvousTimeoutError(
                    f"rendezvous '{self.run_id}' ({self._where}) timed out after {now - started:.0f} s "
                    f"waiting for round {round} to complete: {self._describe(view)}"
                )
            if now >= status_at:
                log.info(
                    "rendezvous '%s' round %d (%s): %s; timeout in %.0f s",
                    self.run_id, round, self._where, self._describe(view), deadline - now,
                )
                status_at = now + STATUS_INTERVAL
            check_at = now + settings.keep_alive_interval
            if last_call_left is not None:
                check_at = min(check_at, now + last_call_left)

    def _view(self, round: int) -> _RoundView:
        records = self._records(round)
        previous = self._previous_members(round)
        alive = self._kv.alive(list({m.id for m in records} | {m.id for m in previous}))
        live = [m for m in records if m.id in alive]
        joined = {m.id for m in live}
        previous_live = [m for m in previous if m.id in alive]
        return _RoundView(
            live=live,
            pending=[m for m in previous_live if m.id not in joined],
            no_place=len(previous_live) >= self._settings.max_nodes
            and self._me.id not in {m.id for m in previous},
        )

    def _advance(self, round: int, view: _RoundView) -> tuple[bytes | None, float | None]:
        """Complete the round if it is due, else start or stop its last call.

        Returns (the done record if the round is now complete, seconds left of
        the last call if one runs).
        """
        settings = self._settings
        kv = self._kv
        key = _deadline_key(round)
        ready = not view.pending and len(view.live) >= settings.min_nodes
        if ready and len(view.live) >= settings.max_nodes:
            return self._complete(round, view), None
        current = kv.get(key)
        if not ready:
            if current not in (None, _NO_DEADLINE):
                kv.compare_set(key, current, _NO_DEADLINE)  # below the minimum again: no last call
            return None, None
        if current in (None, _NO_DEADLINE):
            current = kv.compare_set(key, current, f"{time.time() + settings.last_call_timeout:.3f}".encode())
        if current == _NO_DEADLINE:
            return None, settings.keep_alive_interval  # another node just stopped the last call
        left = float(current) - time.time()
        if left <= 0:
            return self._complete(round, view), None
        return None, left

    def _complete(self, round: int, view: _RoundView) -> bytes:
        previous = self._previous_members(round)
        live = {m.id: m for m in view.live}
        # Stable ranks: the previous round's members in their order, then newcomers.
        members = [live.pop(m.id) for m in previous if m.id in live]
        members += list(live.values())
        members = members[: self._settings.max_nodes]
        record = json.dumps({"nodes": [asdict(m) for m in members]}, separators=(",", ":")).encode()
        held = self._kv.compare_set(_done_key(round), None, record)
        if held == record:
            self._kv.set(_LATEST, str(round).encode())
        return held

    def _records(self, round: int) -> list[Member]:
        """The round's join records in join order, each node once."""
        seen: dict[str, Member] = {}
        for data in self._kv.joined(round):
            member = Member.decode(data)
            seen.setdefault(member.id, member)
        return list(seen.values())

    def _previous_members(self, round: int) -> list[Member]:
        if round == 0:
            return []
        if self._round == round - 1:
            return self._members
        done = self._kv.get(_done_key(round - 1))
        return (done and _decode_round(done)) or []

    def _describe(self, view: _RoundView) -> str:
        s = self._settings
        text = f"{len(view.live)} of min {s.min_nodes}, max {s.max_nodes} nodes joined ({_addresses(view.live)})"
        if view.pending:
            text += f"; waiting for {len(view.pending)} running node(s) to rejoin ({_addresses(view.pending)})"
        if view.no_place:
            text += "; the running round is full, waiting for a place"
        return text

    # -- teardown -----------------------------------------------------------

    def _end_round(self) -> None:
        """Stop what belongs to the current round: the watcher and the workers' store."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.close()
            self._watcher = None
        if self._agent_store is not None:
            self._agent_store.close()
            self._agent_store = None
        if self._server is not None:
            self._server.close()
            self._server = None

    def _leave(self, close_if_last: bool) -> None:
        """Stop heartbeating and mark this node gone; close the rendezvous if asked and no member is left.

        Uses the heartbeat's connection, which the agent's signal does not interrupt.
        """
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is None:
            return
        heartbeat.stop()
        kv = heartbeat.kv
        try:
            kv.mark_left(self._me.id)
            if close_if_last and self._round is not None:
                others = [m.id for m in self._members if m.id != self._me.id]
                if not kv.alive(others) and kv.compare_set(_done_key(self._round + 1), None, CLOSED) == CLOSED:
                    log.info("rendezvous '%s' closed: this node was the last of round %d", self.run_id, self._round)
        except (RendezvousError, StoreInterrupted) as exc:
            log.warning("rendezvous '%s': could not leave cleanly: %s", self.run_id, exc)
        finally:
            heartbeat.close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._kv.close()
        for resource in self._owned:
            resource.close()
        self._waiting.close()
