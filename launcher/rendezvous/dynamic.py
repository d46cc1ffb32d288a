"""The elastic rendezvous shared by the c10d and etcd backends.

Rounds are numbered 0, 1, 2... A round is open until its ``done/<round>``
record exists (written once, by compare-and-set). Round r+1 opens when round
r completes, so a node that arrives while round r runs joins round r+1 at
once: it is a waiting node, and the agents of round r see it through
``num_nodes_waiting()``.

A node joins a round with one append to the round's join list. The first to
join (by compare-and-set on ``coordinator/<round>``) completes the round: it
alone reads the round's state, when the joins it waits for have arrived, when
a last call ends, and once a keep-alive interval, and publishes what it sees
in ``status/<round>`` for the others' status lines. The others only wait for
the ``done`` record; once an interval each checks that the coordinator is
alive, and the first to find it gone takes its place. So the store serves
O(N) requests and bytes per round of N nodes, and per keep-alive period while
it waits.

A round completes (torch's dynamic rendezvous semantics) when:
- every live member of the previous round has rejoined (a member whose agent
  is still running keeps the next round from completing without it), and
- the maximum has joined (at once), or the minimum has joined and the
  last-call window has passed.

Liveness comes from heartbeats (a daemon thread per node): a node whose
heartbeat is older than keep_alive_interval * keep_alive_max_attempt, or
that left, is not counted. The members are the previous round's live ones,
then newcomers in join order up to the maximum; ranks follow torch's rule:
by address, then pid (so under Slurm the first node is rank 0).

The coordinator completes the round by writing, under its own id, each
member's seat (``seat/<round>/<coordinator>/<node>``: its rank, where its
workers' ranks start, and the member its heartbeat watches) and the member
list (``members/<round>/<coordinator>``), then the small ``done`` record
(node count, worker count, the workers' store, who wrote the seats). Each
node reads the record and its own seat: nobody but the next coordinator reads
the whole list, so a round's bytes grow linearly with its nodes.

While a round runs, each member's heartbeat watches the next member by rank
(a ring: background.py's Heartbeat) and reports it lost in the round after;
every member's watcher sees that news and its agent restarts without it.

Group rank 0 hosts the workers' store. Every node keeps a store server ready
(its port is in its join record), so the members learn MASTER_ADDR/MASTER_PORT
from the ``done`` record without another round trip; rank 0's server is closed
when the next round begins and replaced by a fresh one, so a restarted attempt
never sees the keys of the previous one.
"""
from __future__ import annotations

import functools
import json
import logging
import select
import time
from collections import namedtuple
from dataclasses import dataclass

from launcher.rendezvous import (
    NodeInfo,
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousTimeoutError,
    WorkerRanks,
    worker_ranks,
)
from launcher.rendezvous.background import Heartbeat, MembershipWatch
from launcher.rendezvous.keyvalue import (
    STATUS_INTERVAL,
    Connect,
    KeyValueBackend,
    agents_store,
    node_address,
    node_id,
    node_pid,
)
from launcher.store import DistNetworkError, StoreInterrupted, StoreServer, TCPStore

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

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


class Member(namedtuple("Member", "id addr local_world_size role port last_round")):
    """A node in a round; encoded as a JSON array, which the coordinator decodes fast.

    id: unique per handler (addr_pid_random); port: of the workers' store this node hosts if it becomes rank 0;
    last_round: the round this node last ran in (-1: none): a rejoining member, or a newcomer.
    """

    __slots__ = ()

    def encode(self) -> bytes:
        return json.dumps(self, separators=(",", ":")).encode()


CLOSED = b'{"closed":true}'


def _done_key(round: int) -> str:
    return f"done/{round}"


def _deadline_key(round: int) -> str:
    return f"last_call/{round}"


def _coordinator_key(round: int) -> str:
    return f"coordinator/{round}"


def _status_key(round: int) -> str:
    return f"status/{round}"


def _seat_key(round: int, coordinator: str, node: str) -> str:
    return f"seat/{round}/{coordinator}/{node}"


def _members_key(round: int, coordinator: str) -> str:
    return f"members/{round}/{coordinator}"


_NO_DEADLINE = b"none"
_SHOWN_ADDRESSES = 8  # a status line names this many nodes, then counts the others
_LEAVE_POLL = 0.05  # seconds between two looks at how many have left, while the nodes we serve finish


def _addresses(members: list[Member]) -> str:
    shown = ", ".join(m.addr for m in members[:_SHOWN_ADDRESSES]) or "none"
    more = len(members) - _SHOWN_ADDRESSES
    return f"{shown} and {more} more" if more > 0 else shown


def _read_members(kv: KeyValueBackend, round: int) -> list[Member]:
    """The members of a completed round, by rank ([] if it never completed, or was the closing one)."""
    done = kv.get(_done_key(round))
    record = json.loads(done) if done else {}
    if "by" not in record:
        return []
    return [Member._make(row) for row in json.loads(kv.get(_members_key(round, record["by"])))]


@dataclass
class _RoundView:
    """What one read of the shared state says about an open round (the coordinator's)."""

    news: int  # joins and loss reports counted before the records were read
    live: list[Member]  # joined and alive, in join order
    pending: list[Member]  # live members of the previous round that have not rejoined
    no_place: bool  # we are a newcomer and the running round has max_nodes live members


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
            last_round=-1,
        )
        self._interrupt_fd = params.interrupt_fd
        self._kv = connect(params.interrupt_fd, settings.read_timeout)
        self._owned = owned or []  # closed with the handler: the c10d host's store
        self._closed = False
        self._membership = MembershipWatch()
        self._round: int | None = None  # the latest round this node is a member of
        self._world_size = 0  # of that round
        self._next_round = 0  # the round to join next
        self._previous: tuple[int, list[Member]] = (-1, [])  # a completed round's members, as read last
        self._own_seat: tuple[int, bytes | None] = (-1, None)  # this node's seat in the round it completed last
        self._agent_store: _LazyStore | None = None
        # Ready before any round, so that joining costs neither a connection nor a server:
        # the heartbeat (this agent is alive from now until it leaves), and the server
        # this node hosts the workers' store on if it becomes rank 0.
        self._heartbeat: Heartbeat | None = None
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
        me = self._me._replace(port=self._server.port, last_round=-1 if self._round is None else self._round)
        try:
            while True:
                # Joining a round that completed meanwhile costs little: its done record says so at once.
                self._kv.join(round, me.id, me.encode())
                coordinator = self._kv.compare_set(_coordinator_key(round), None, me.id.encode()).decode()
                log.debug("rendezvous '%s': joined round %d (completed by %s)", self.run_id, round, coordinator)
                done, deadline = self._await_round(round, coordinator, deadline, started)
                record = json.loads(done)
                if record.get("closed"):
                    raise RendezvousClosedError(
                        f"rendezvous '{self.run_id}' ({self._where}) is closed: the job finished "
                        "or its nodes shut down; start a new job with another --rdzv-id"
                    )
                seat = self._seat(round, record["by"])
                if seat is not None:
                    break
                round = max(round + 1, self._kv.open_round())  # completed without us
        except (RendezvousTimeoutError, RendezvousClosedError):
            self._leave(close_if_last=False)  # given up: do not let a round count on us
            raise
        rank, base_rank, role_base_rank, role_world_size, watched = json.loads(seat)
        self._serving = rank == 0
        self._round, self._world_size, self._next_round = round, record["nodes"], round + 1
        master_addr, master_port = record["master"]
        self._agent_store = _LazyStore(master_addr, master_port, settings.read_timeout, self._interrupt_fd)
        if watched is not None:
            self._heartbeat.watch(round, watched[0], json.dumps(watched).encode())
        log.info(
            "rendezvous '%s' round %d complete: rank %d of %d nodes (rank 0: %s) after %.1f s",
            self.run_id, round, rank, record["nodes"], master_addr, time.monotonic() - started,
        )
        return RendezvousInfo(
            round=round,
            rank=rank,
            world_size=record["nodes"],
            workers=WorkerRanks(record["workers"], base_rank, role_base_rank, role_world_size),
            master_addr=master_addr,
            master_port=master_port,
            store=agents_store(round, self._agent_store),
            read_nodes=functools.partial(self._read_nodes, round),
        )

    def num_nodes_waiting(self) -> int:
        self._membership.clear()
        if self._round is None:
            return 0
        round = self._round + 1
        records = self._records(round)
        if not records:
            return 0
        alive = self._kv.alive([r.id for r in records])
        max_nodes = self._settings.max_nodes
        # While our round is full a newcomer cannot get in, so it is no reason
        # to restart (torch's redundancy list); a member that rejoined is.
        full = self._world_size >= max_nodes and self._world_size - len(self._gone(round)) >= max_nodes
        return sum(
            1
            for r in records
            if r.id in alive and r.id != self._me.id and (not full or r.last_round == self._round)
        )

    def lost_nodes(self) -> list[str]:
        heartbeat = self._heartbeat
        if heartbeat is not None and heartbeat.unreachable is not None:
            raise RendezvousConnectionError(
                f"rendezvous '{self.run_id}': no heartbeat of this node reached the {self._where} for "
                f"{self._settings.liveness:g} s ({heartbeat.unreachable})"
            )
        if self._round is None:
            return []
        lost: dict[str, str] = {}
        for data in self._kv.lost(self._round + 1):
            node, addr = json.loads(data)
            lost.setdefault(node, addr)
        return list(lost.values())

    def waiting_fd(self) -> int:
        # The watcher starts when the agent first asks, after the round: joining need not wait for it.
        # A job of one node at most has no news to wait for (no other member to lose, none can join, and
        # this node's own heartbeat signals its lost store): a restart then starts no thread nor connection.
        alone = self._settings.max_nodes == 1 and self._world_size == 1
        if not self._membership.watching and self._round is not None and not alone:
            self._membership.watch(self._connect, self._round + 1, self._settings.read_timeout)
        return self._membership.fd

    def leave(self) -> None:
        self._end_round()
        self._leave(close_if_last=False)
        self._close()

    def shutdown(self, failed: bool = False) -> None:
        # Leave before the round ends: a node that serves the others waits in _leave until they have
        # left, and its workers' store must outlast their exit barrier. Our watcher stops first: it
        # reads the store the others are leaving.
        self._membership.stop()
        self._leave(close_if_last=True, failed=failed)
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

    def _await_round(self, round: int, coordinator: str, deadline: float, started: float) -> tuple[bytes, float]:
        """Wait for the round's done record, completing the round if this node is its coordinator.

        Returns the record and the join deadline (pushed back while the running
        round is full, as torch does not time out nodes waiting for a place).
        """
        if coordinator == self._me.id:
            return self._coordinate(round, deadline, started)
        settings = self._settings
        kv = self._kv
        now = time.monotonic()
        status_at = now + STATUS_INTERVAL
        while True:
            wait = min(now + settings.keep_alive_interval, deadline) - now
            done = kv.wait(_done_key(round), wait) if wait > 0 else kv.get(_done_key(round))
            if done is not None:
                return done, deadline
            if not kv.alive([coordinator]):  # it died or left: the first to notice takes its place
                coordinator = kv.compare_set(_coordinator_key(round), coordinator.encode(), self._me.id.encode())
                coordinator = coordinator.decode()
                if coordinator == self._me.id:
                    log.info("rendezvous '%s' round %d: its coordinator is gone; this node takes over",
                             self.run_id, round)
                    return self._coordinate(round, deadline, started)
            now = time.monotonic()
            # The coordinator's status: read for a status line, or near the deadline (a full running round
            # pushes it back).
            if now < status_at and now + settings.keep_alive_interval < deadline:
                continue
            published = kv.get(_status_key(round))
            status, no_place = json.loads(published) if published else ("no state published yet", False)
            if no_place:
                deadline = max(deadline, now + settings.join_timeout)
            if now >= deadline:
                raise self._timed_out(round, now - started, status)
            if now >= status_at:
                self._log_status(round, status, deadline - now)
                status_at = now + STATUS_INTERVAL

    def _coordinate(self, round: int, deadline: float, started: float) -> tuple[bytes, float]:
        """Complete the round when it is due: read its state when enough news may have made it due,
        when a last call ends, and once a keep-alive interval."""
        settings = self._settings
        kv = self._kv
        status_at = time.monotonic() + STATUS_INTERVAL
        while True:
            done = kv.get(_done_key(round))  # completed by a node that took over (we seemed dead)
            if done is not None:
                return done, deadline
            now = time.monotonic()
            quiet = now < status_at and now + settings.keep_alive_interval < deadline  # no line, no deadline due
            news = kv.news(round) if quiet else None
            if news is not None and news < settings.min_nodes:
                # Fewer joins than the minimum: who they are is not needed yet.
                kv.wait_news(round, settings.min_nodes - 1, min(settings.keep_alive_interval, status_at - now))
                continue
            view = self._view(round, news)
            done, last_call_left = self._advance(round, view)
            if done is not None:
                return done, deadline
            now = time.monotonic()
            if view.no_place:
                deadline = max(deadline, now + settings.join_timeout)
            status = self._describe(view)
            kv.set(_status_key(round), json.dumps([status, view.no_place]).encode())
            if now >= deadline:
                raise self._timed_out(round, now - started, status)
            if now >= status_at:
                self._log_status(round, status, deadline - now)
                status_at = now + STATUS_INTERVAL
            until = min(now + settings.keep_alive_interval, deadline)
            if last_call_left is not None:
                until = min(until, now + last_call_left)
            kv.wait_news(round, view.news + self._needed(view) - 1, until - now)

    def _needed(self, view: _RoundView) -> int:
        """The fewest joins that can make the round due, or complete it during its last call."""
        s = self._settings
        live = len(view.live)
        if view.pending or live < s.min_nodes:
            return max(s.min_nodes - live, len(view.pending), 1)
        return max(s.max_nodes - live, 1)

    def _view(self, round: int, news: int | None = None) -> _RoundView:
        # News first (``news``, if just read): whatever arrives after this count wakes the coordinator, even
        # if read below.
        if news is None:
            news = self._kv.news(round)
        records = self._records(round)
        previous = self._previous_members(round)
        alive = self._kv.alive(list({m.id for m in records} | {m.id for m in previous}))
        live = [m for m in records if m.id in alive]
        joined = {m.id for m in live}
        previous_live = [m for m in previous if m.id in alive]
        return _RoundView(
            news=news,
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
        """Write every member's seat and the member list under our id, then the done record."""
        previous = self._previous_members(round)
        live = {m.id: m for m in view.live}
        # Who: the previous round's members, then newcomers, up to the maximum. Their ranks: torch's
        # (sorted node descriptors, address then pid).
        members = [live.pop(m.id) for m in previous if m.id in live]
        members += list(live.values())
        members = sorted(members[: self._settings.max_nodes], key=lambda m: (m.addr, int(node_pid(m.id))))
        ranks = worker_ranks([NodeInfo(m.addr, m.local_world_size, m.role) for m in members])
        me, count = self._me.id, len(members)
        writes = {_members_key(round, me): json.dumps(members, separators=(",", ":")).encode()}
        for rank, (member, place) in enumerate(zip(members, ranks)):
            watched = members[(rank + 1) % count] if count > 1 else None  # the ring of heartbeats
            seat = [rank, place.base_rank, place.role_base_rank, place.role_world_size,
                    watched and [watched.id, watched.addr]]
            writes[_seat_key(round, me, member.id)] = json.dumps(seat, separators=(",", ":")).encode()
        self._kv.set_many(writes)
        record = json.dumps(
            {"by": me, "nodes": count, "workers": ranks[0].world_size, "master": [members[0].addr, members[0].port]},
            separators=(",", ":"),
        ).encode()
        held = self._kv.compare_set(_done_key(round), None, record)
        if held == record:
            self._kv.round_completed(round)
            # What this node wrote needs no reading back: its own seat now, the members in the next round.
            self._own_seat = (round, writes.get(_seat_key(round, me, me)))
            self._previous = (round, members)
        return held

    def _seat(self, round: int, completed_by: str) -> bytes | None:
        """This node's seat in ``round``, which ``completed_by`` completed (None: it is not a member)."""
        if completed_by == self._me.id and self._own_seat[0] == round:
            return self._own_seat[1]
        return self._kv.get(_seat_key(round, completed_by, self._me.id))

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
        if self._previous[0] != round - 1:  # read once per round: a completed round's members do not change
            self._previous = (round - 1, _read_members(self._kv, round - 1))
        return self._previous[1]

    def _read_nodes(self, round: int) -> list[NodeInfo]:
        return [NodeInfo(m.addr, m.local_world_size, m.role) for m in _read_members(self._kv, round)]

    def _gone(self, round: int) -> set[str]:
        """The members of the round before ``round`` reported lost or that left."""
        return {json.loads(data)[0] for data in self._kv.lost(round)} | set(self._kv.left(round))

    def _describe(self, view: _RoundView) -> str:
        s = self._settings
        text = f"{len(view.live)} of min {s.min_nodes}, max {s.max_nodes} nodes joined ({_addresses(view.live)})"
        if view.pending:
            text += f"; waiting for {len(view.pending)} running node(s) to rejoin ({_addresses(view.pending)})"
        if view.no_place:
            text += "; the running round is full, waiting for a place"
        return text

    def _log_status(self, round: int, status: str, left: float) -> None:
        # a warning: visible at the launcher's default log level
        log.warning("rendezvous '%s' round %d (%s): %s; timeout in %.0f s", self.run_id, round, self._where,
                    status, left)

    def _timed_out(self, round: int, waited: float, status: str) -> RendezvousTimeoutError:
        return RendezvousTimeoutError(
            f"rendezvous '{self.run_id}' ({self._where}) timed out after {waited:.0f} s "
            f"waiting for round {round} to complete: {status}"
        )

    # -- teardown -----------------------------------------------------------

    def _end_round(self) -> None:
        """Stop what belongs to the current round: the watchers and the workers' store."""
        self._membership.stop()
        if self._heartbeat is not None:
            self._heartbeat.unwatch()
        if self._agent_store is not None:
            self._agent_store.close()
            self._agent_store = None
        if self._serving:
            self._server.close()
            self._server, self._serving = None, False

    def _start_heartbeat(self) -> None:
        settings = self._settings
        self._kv.heartbeat(self._me.id)  # alive before any join record of ours can be read
        self._heartbeat = Heartbeat(self._connect, self._me.id, settings.keep_alive_interval, settings.liveness,
                                    settings.heartbeat_timeout, self._membership.signal)
        self._heartbeat.start()

    def _leave(self, close_if_last: bool, failed: bool = False) -> None:
        """Stop heartbeating and mark this node gone; at shutdown (close_if_last) a node that serves
        the others closes the rendezvous once no other member of our round is left, and a node
        whose job failed closes it at once.

        Uses the heartbeat's connection, which the agent's signal does not interrupt.

        Marking this node gone (``mark_left``: its departure counted last) is the last request a
        node that serves nobody makes. A node that serves the others waits, up to close_timeout,
        until they no longer need it: rank 0 until they have left (their exit barrier on its
        workers' store is over), the c10d store's host likewise. Closing either under them turned
        a successful job's end into warnings ("exit barrier ended", "could not leave cleanly");
        waiting for them, rather than letting them ignore a lost store, keeps a real loss visible.
        Each look costs one count; a member that died never counts itself, so the members still
        missing are checked for a heartbeat once a keep-alive interval. Marking ourselves gone
        before waiting keeps rank 0 and the host from waiting for each other. After a failure the
        rendezvous is closed at once (as torch's agent closes it): the others' workers run on until
        that tells them the job is over, and the store's host alone waits, until they have read it.
        """
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is None:
            return
        heartbeat.stop()
        kv = heartbeat.kv
        try:
            kv.set_timeout(self._settings.close_timeout)
            if self._round is None:
                kv.mark_left(self._me.id, None)
                return
            kv.mark_left(self._me.id, self._round + 1)
            if not close_if_last or not (failed or self._owned or self._serving):
                return
            done = _done_key(self._round + 1)
            if failed:  # the closed rendezvous tells the others; the store's host serves until they have read it
                closed = kv.compare_set(done, None, CLOSED) == CLOSED
                if self._owned:
                    self._others_gone(kv)
            else:
                closed = self._others_gone(kv) and kv.compare_set(done, None, CLOSED) == CLOSED
            if closed:
                log.info("rendezvous '%s' closed: %s", self.run_id,
                         "this node's job failed" if failed else f"no node of round {self._round} is left")
        except (RendezvousError, StoreInterrupted) as exc:
            log.warning("rendezvous '%s': could not leave cleanly: %s", self.run_id, exc)
        finally:
            heartbeat.close()

    def _others_gone(self, kv: KeyValueBackend) -> bool:
        """Wait until every other member of our round has left or died (True), or close_timeout passes or
        the agent's signal arrives (False). One cheap count per look; the members still missing are read,
        and their heartbeats checked, once a keep-alive interval."""
        settings = self._settings
        deadline = time.monotonic() + settings.close_timeout
        signal_fd = [self._interrupt_fd] if self._interrupt_fd >= 0 else []
        check_at = time.monotonic() + settings.keep_alive_interval
        while kv.left_count(self._round + 1) < self._world_size:
            now = time.monotonic()
            if now >= check_at:
                gone = set(kv.left(self._round + 1)) | {self._me.id}
                missing = [m.id for m in _read_members(kv, self._round) if m.id not in gone]
                if not kv.alive(missing):
                    return True  # the others left or died
                check_at = now + settings.keep_alive_interval
            if now >= deadline:
                log.debug("rendezvous '%s': leaving while node(s) of round %d may still need us",
                          self.run_id, self._round)
                return False
            if select.select(signal_fd, [], [], min(deadline - now, _LEAVE_POLL))[0]:
                return False  # a signal: the agent has more urgent things to do
        return True

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
        self._membership.close()
