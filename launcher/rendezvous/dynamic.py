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

Group rank 0 hosts the workers' store. Every node keeps a store server ready
(its port is in its join record), so the members learn MASTER_ADDR/MASTER_PORT
from the ``done`` record without another round trip; rank 0's server is closed
when the next round begins and replaced by a fresh one, so a restarted attempt
never sees the keys of the previous one.
"""
from __future__ import annotations

import json
import logging
import select
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from launcher.rendezvous import (
    NodeInfo,
    RendezvousClosedError,
    RendezvousError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousTimeoutError,
)
from launcher.rendezvous.background import BackgroundThread, WaitingNodes
from launcher.rendezvous.keyvalue import (
    STATUS_INTERVAL,
    Connect,
    KeyValueBackend,
    agents_store,
    node_address,
    node_id,
)
from launcher.store import DistNetworkError, StoreInterrupted, StoreServer, TCPStore

log = logging.getLogger("launcher.rendezvous")


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


class Member(NamedTuple):
    """A node in a round; encoded as a JSON array, which every node decodes fast."""

    id: str  # unique per handler: addr_pid_random
    addr: str
    local_world_size: int
    role: str
    port: int  # of the workers' store this node hosts if it becomes rank 0

    def encode(self) -> bytes:
        return json.dumps(self, separators=(",", ":")).encode()


CLOSED = b'{"closed":true}'


def _done_key(round: int) -> str:
    return f"done/{round}"


def _deadline_key(round: int) -> str:
    return f"last_call/{round}"


_NO_DEADLINE = b"none"


def _left_key(round: int, node: str) -> str:
    return f"left/{round}/{node}"


# What left/<round>/<node> says: DONE, the node will ask nothing more of the rendezvous' store;
# HOSTING, the node hosts that store and waits for the others (hosts share it: they need not
# wait for each other).
_DONE = b"done"
_HOSTING = b"hosting"
_LEAVE_POLL = 0.05  # seconds between two looks at who has left, while the nodes we serve finish


def _decode_round(data: bytes) -> list[list] | None:
    """The members of a completed round as rows of Member's fields; None when it is the closed marker.

    Rows, not Members: every node decodes the whole list, and at scale making no
    object per member but the NodeInfo the agent needs is what keeps it cheap.
    """
    record = json.loads(data)
    if record.get("closed"):
        return None
    return record["nodes"]


def _addresses(members: list) -> str:
    return ", ".join(m[1] for m in members) or "none"  # Members or rows: addr is field 1


@dataclass
class _RoundView:
    """What one read of the shared state says about an open round."""

    live: list[Member]  # joined and alive, in join order
    pending: list[Member]  # live members of the previous round that have not rejoined
    no_place: bool  # we are a newcomer and the running round has max_nodes live members


class _Heartbeat(BackgroundThread):
    def __init__(self, connect: Connect, node_id: str, settings: Settings):
        super().__init__(connect, settings.heartbeat_timeout, f"rendezvous-heartbeat-{node_id}")
        self._node_id = node_id
        self._interval = settings.keep_alive_interval

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


class _LazyStore:
    """A client of the workers' store that connects on first use: most rounds never use it."""

    def __init__(self, host: str, port: int, timeout: float, interrupt_fd: int):
        self._args = (host, port)
        self._timeout = timeout
        self._interrupt_fd = interrupt_fd
        self._store: TCPStore | None = None

    def __getattr__(self, name: str):
        if self._store is None:
            self._store = TCPStore(*self._args, timeout=self._timeout, interrupt_fd=self._interrupt_fd)
        return getattr(self._store, name)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


class DynamicRendezvousHandler(RendezvousHandler):
    def __init__(
        self,
        where: str,
        settings: Settings,
        connect: Connect,
        params: RendezvousParameters,
        owned: list | None = None,
    ):
        self.run_id = settings.run_id
        self._where = where  # for messages: "c10d store 127.0.0.1:29400"
        self._settings = settings
        self._connect = connect
        addr = node_address(params.local_addr)
        self._bind_addr = params.local_addr
        self._me = Member(
            id=node_id(addr),
            addr=addr,
            local_world_size=params.local_world_size,
            role=params.role,
            port=0,
        )
        self._interrupt_fd = params.interrupt_fd
        self._kv = connect(params.interrupt_fd, settings.read_timeout)
        self._owned = owned or []  # closed with the handler: the c10d host's store
        self._closed = False
        self._waiting = WaitingNodes()
        self._round: int | None = None  # the latest round this node is a member of
        self._next_round = 0  # the round to join next
        self._members: list[list] = []  # rows of the round's done record
        self._agent_store: _LazyStore | None = None
        # Ready before any round, so that joining costs neither a connection nor a server:
        # the heartbeat (this agent is alive from now until it leaves), and the server
        # this node hosts the workers' store on if it becomes rank 0.
        self._heartbeat: _Heartbeat | None = None
        self._server: StoreServer | None = None
        self._serving = False  # the workers of the current round use self._server
        try:
            self._start_heartbeat()
            self._server = self._listen()
            self._next_round = self._kv.open_round()
        except BaseException:
            self._leave(close_if_last=False)
            self._close()
            raise

    # -- the agent's API --------------------------------------------------

    def next_rendezvous(self) -> RendezvousInfo:
        self._end_round()
        settings = self._settings
        started = time.monotonic()
        deadline = started + settings.join_timeout
        if self._heartbeat is None:  # it left after a timeout: back again
            self._start_heartbeat()
        if self._server is None:  # the last round's workers used it: a fresh one
            self._server = self._listen()
        round = self._next_round
        me = self._me._replace(port=self._server.port)
        try:
            while True:
                # Joining a round that completed meanwhile costs little: its done record says so at once.
                position = self._kv.join(round, me.id, me.encode())
                log.debug("rendezvous '%s': joined round %d as #%d", self.run_id, round, position)
                done, deadline = self._await_round(round, position, deadline, started)
                members = _decode_round(done)
                if members is None:
                    raise RendezvousClosedError(
                        f"rendezvous '{self.run_id}' ({self._where}) is closed: the job finished "
                        "or its nodes shut down; start a new job with another --rdzv-id"
                    )
                rank = next((i for i, row in enumerate(members) if row[0] == self._me.id), None)
                if rank is not None:
                    break
                round = max(round + 1, self._kv.open_round())  # completed without us
        except (RendezvousTimeoutError, RendezvousClosedError):
            self._leave(close_if_last=False)  # given up: do not let a round count on us
            raise
        self._serving = rank == 0
        self._round, self._members, self._next_round = round, members, round + 1
        master = Member._make(members[0])
        self._agent_store = _LazyStore(master.addr, master.port, settings.read_timeout, self._interrupt_fd)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "rendezvous '%s' round %d complete: rank %d of %d nodes (%s) after %.1f s",
                self.run_id, round, rank, len(members), _addresses(members), time.monotonic() - started,
            )
        return RendezvousInfo(
            round=round,
            rank=rank,
            nodes=[NodeInfo(addr, size, role) for _, addr, size, role, _ in members],
            master_addr=master.addr,
            master_port=master.port,
            store=agents_store(round, self._agent_store),
        )

    def num_nodes_waiting(self) -> int:
        self._waiting.clear()
        if self._round is None:
            return 0
        records = self._records(self._round + 1)
        if not records:
            return 0
        previous = {row[0] for row in self._members}
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
        # The watcher starts when the agent first asks, after the round: joining need not wait for it.
        if not self._waiting.watching and self._round is not None:
            self._waiting.watch(self._connect, self._round + 1, self._settings.read_timeout)
        return self._waiting.fd

    def leave(self) -> None:
        self._end_round()
        self._leave(close_if_last=False)
        self._close()

    def shutdown(self) -> None:
        # Leave before the round ends: a node that serves the others waits in _leave until they have
        # left, and its workers' store must outlast their exit barrier. Our watcher stops first: it
        # reads the store the others are leaving.
        self._waiting.stop()
        self._leave(close_if_last=True)
        self._end_round()
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
            if now >= status_at:  # a warning: visible at the launcher's default log level
                log.warning(
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
        record = json.dumps({"nodes": members}, separators=(",", ":")).encode()
        held = self._kv.compare_set(_done_key(round), None, record)
        if held == record:
            self._kv.round_completed(round)
        return held

    def _records(self, round: int) -> list[Member]:
        """The round's join records in join order, each node once."""
        seen: dict[str, Member] = {}
        for data in self._kv.joined(round):
            member = Member._make(json.loads(data))
            seen.setdefault(member.id, member)
        return list(seen.values())

    def _previous_members(self, round: int) -> list[Member]:
        if round == 0:
            return []
        rows = self._members if self._round == round - 1 else None
        if rows is None:
            done = self._kv.get(_done_key(round - 1))
            rows = (done and _decode_round(done)) or []
        return [Member._make(row) for row in rows]

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
        self._waiting.stop()
        if self._agent_store is not None:
            self._agent_store.close()
            self._agent_store = None
        if self._serving:
            self._server.close()
            self._server, self._serving = None, False

    def _start_heartbeat(self) -> None:
        self._kv.heartbeat(self._me.id)  # alive before any join record of ours can be read
        self._heartbeat = _Heartbeat(self._connect, self._me.id, self._settings)
        self._heartbeat.start()

    def _leave(self, close_if_last: bool) -> None:
        """Stop heartbeating and mark this node gone; at shutdown (close_if_last) close the rendezvous
        once no member of our round is left.

        Uses the heartbeat's connection, which the agent's signal does not interrupt.

        At shutdown a node that serves the others waits, up to close_timeout, until they no
        longer need it: rank 0 until they have left (their exit barrier on its workers' store
        is over), the c10d store's host until each has written its left record, the last
        request a node makes. Closing either under them turned a successful job's end into
        warnings ("exit barrier ended", "could not leave cleanly"); waiting for them, rather
        than letting them ignore a lost store, keeps a real loss visible. A member that died
        writes no record: it stops counting a liveness period after its heartbeat ended.
        Marking ourselves gone before waiting keeps rank 0 and the host from waiting for
        each other.
        """
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is None:
            return
        heartbeat.stop()
        kv = heartbeat.kv
        try:
            kv.set_timeout(self._settings.close_timeout)
            kv.mark_left(self._me.id)
            if self._round is not None:
                if close_if_last:
                    others = [row[0] for row in self._members if row[0] != self._me.id]
                    if self._owned:
                        kv.set(_left_key(self._round, self._me.id), _HOSTING)
                        self._wait_for_others(kv, others, until_done=True)
                    elif self._serving:
                        self._wait_for_others(kv, others, until_done=False)
                    if not kv.alive(others) and kv.compare_set(_done_key(self._round + 1), None, CLOSED) == CLOSED:
                        log.info("rendezvous '%s' closed: no node of round %d is left", self.run_id, self._round)
                kv.set(_left_key(self._round, self._me.id), _DONE)
        except (RendezvousError, StoreInterrupted) as exc:
            log.warning("rendezvous '%s': could not leave cleanly: %s", self.run_id, exc)
        finally:
            heartbeat.close()

    def _wait_for_others(self, kv: KeyValueBackend, others: list[str], until_done: bool) -> None:
        """Until every one of ``others`` has left (until_done: and written its left record, or died),
        close_timeout passes, or the agent's signal arrives."""
        settings = self._settings
        deadline = time.monotonic() + settings.close_timeout
        signal_fd = [self._interrupt_fd] if self._interrupt_fd >= 0 else []
        silent_since: dict[str, float] = {}  # when each node was first seen gone without a record
        pending = others
        while True:
            alive = kv.alive(pending)
            now = time.monotonic()
            pending = [
                node for node in pending
                if node in alive or (until_done and kv.get(_left_key(self._round, node)) is None
                                     and now - silent_since.setdefault(node, now) < settings.liveness)
            ]
            if not pending:
                return
            if now >= deadline:
                log.debug("rendezvous '%s': closing while %d node(s) of round %d may still need us",
                          self.run_id, len(pending), self._round)
                return
            if select.select(signal_fd, [], [], min(deadline - now, _LEAVE_POLL))[0]:
                return  # a signal: the agent has more urgent things to do

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
            self._server = None
        self._kv.close()
        for resource in self._owned:
            resource.close()
        self._owned = []  # a shared (multi-tenant) server stops with its last reference
        self._waiting.close()
