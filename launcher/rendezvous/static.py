"""The static backend: a fixed number of nodes with fixed ranks (``--node-rank``).

Node rank 0 hosts a TCP store at ``--master-addr:--master-port``; it is also
the workers' store (MASTER_PORT == --master-port, as users expect). Each round
is a barrier in that store: every node records its address and local world
size, and once all have arrived node 0 clears every key outside the agents'
``/launcher/`` prefix, so the workers of the new attempt find an empty store
(none of them can have started: their agents are all waiting for the barrier).

A node that arrives for the next round while the others still run counts in
their ``num_nodes_waiting()``, so its agent's restart restarts everyone.

The nodes heartbeat as the elastic ones do, each watching the next by rank
(background.py's Heartbeat): a node lost while the job runs (no heartbeat for
keep_alive_interval x keep_alive_max_attempt, or gone) ends the job on every
other node with one line naming it, since a static job cannot go on without
it; losing node 0 is losing the store, which ends the others' heartbeats.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from launcher.rendezvous import (
    NodeInfo,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousTimeoutError,
    worker_ranks,
)
from launcher.rendezvous.background import Heartbeat, MembershipWatch
from launcher.rendezvous.keyvalue import (
    AGENT_KEY_PREFIX,
    STATUS_INTERVAL,
    StoreBackend,
    agents_store,
    node_address,
    node_id,
    node_pid,
)
from launcher.rendezvous.options import parse_rdzv_endpoint
from launcher.store import DistError, DistNetworkError, StoreInterrupted, TCPStore

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger("launcher.rendezvous")


class StaticRendezvousHandler(RendezvousHandler):
    @classmethod
    def create(cls, params: RendezvousParameters, config: dict[str, Any]) -> "StaticRendezvousHandler":
        if params.min_nodes != params.max_nodes:
            raise ValueError(
                f"the static rendezvous needs a fixed number of nodes, got --nnodes={params.min_nodes}:"
                f"{params.max_nodes}; use --nnodes=N or an elastic backend (c10d, etcd)"
            )
        nnodes = params.max_nodes
        try:
            rank = int(str(params.config.get("rank", "")).strip())
        except ValueError:
            raise ValueError(f"static rendezvous: --node-rank must be a number from 0 to {nnodes - 1}") from None
        if not 0 <= rank < nnodes:
            raise ValueError(f"static rendezvous: --node-rank={rank} is not in 0..{nnodes - 1} (--nnodes={nnodes})")
        (endpoint,) = parse_rdzv_endpoint("static", params.endpoint)
        if endpoint.port == 0 and nnodes > 1:
            raise ValueError("--master-port=0 only works with a single node: the others could not know the port")
        return cls(params, endpoint.host, endpoint.port, rank, nnodes, config)

    def __init__(self, params: RendezvousParameters, host: str, port: int, rank: int, nnodes: int,
                 config: dict[str, Any]):
        self.run_id = params.run_id
        self._host = host
        self._port = port
        self._rank = rank
        self._nnodes = nnodes
        self._timeout = config["timeout"]
        self._interval = config["keep_alive_interval"]
        self._liveness = config["keep_alive_interval"] * config["keep_alive_max_attempt"]
        self._heartbeat_timeout = config["heartbeat_timeout"]
        self._interrupt_fd = params.interrupt_fd
        addr = node_address(params.local_addr)
        self._record = {
            "id": node_id(addr),
            "addr": addr,
            "local_world_size": params.local_world_size,
            "role": params.role,
            "rank": rank,
        }
        self._prefix = f"{AGENT_KEY_PREFIX}/static/{params.run_id}/"
        self._hosted: TCPStore | None = None  # node 0's server
        self._store: TCPStore | None = None  # this node's client (interrupted by the agent's signal)
        self._kv: StoreBackend | None = None
        self._round: int | None = None
        self._membership = MembershipWatch()
        self._heartbeat: Heartbeat | None = None
        self._closed = False

    @property
    def _where(self) -> str:
        return f"store {self._host}:{self._port}"

    # -- the agent's API --------------------------------------------------

    def next_rendezvous(self) -> RendezvousInfo:
        self._membership.stop()
        if self._heartbeat is not None:
            self._heartbeat.unwatch()
        started = time.monotonic()
        deadline = started + self._timeout
        if self._kv is None:
            self._connect_first(started, deadline)
        kv = self._kv
        round = max(0 if self._round is None else self._round + 1, kv.open_round())
        record = json.dumps(self._record, separators=(",", ":")).encode()
        held = None
        if self._round is None and round > 0:
            # Arriving while a round runs: its node of this rank, if alive, holds the rank (checked before
            # claiming it in the next round, which would keep that node out of it).
            running = kv.get(f"rank/{round - 1}/{self._rank}")
            if running is not None and kv.running(json.loads(running)["id"]):
                held = running
        held = held or kv.compare_set(f"rank/{round}/{self._rank}", None, record)
        if held != record:
            other = json.loads(held)
            raise RendezvousError(
                f"static rendezvous '{self.run_id}' ({self._where}): node rank {self._rank} is already taken by "
                f"{other['addr']} (pid {node_pid(other['id'])}); give every node its own --node-rank"
            )
        kv.join(round, self._record["id"], record)
        if self._rank == 0:
            def everyone_arrived(timeout: float) -> bool:
                expected = self._nnodes + len(kv.lost(round))  # loss reports are news too, not arrivals
                return kv.wait_news(round, expected - 1, timeout) >= expected

            self._wait(round, started, deadline, everyone_arrived)
            # Everyone is here, so no worker of the new attempt runs yet: drop the old attempt's keys.
            self._hosted.server.clear(keep_prefix=f"/{AGENT_KEY_PREFIX}/".encode())
            kv.set(f"ready/{round}", b"")
            kv.round_completed(round)
        else:
            self._wait(round, started, deadline, lambda t: kv.wait(f"ready/{round}", t) is not None)
        arrived = sorted(self._arrived(round), key=lambda r: r["rank"])
        self._round = round
        if self._nnodes > 1:  # the ring: each node's heartbeat watches the next node's
            if self._heartbeat is None:  # from the first round on (before it, nobody watches)
                kv.heartbeat(self._record["id"])
                self._heartbeat = Heartbeat(self._connect, self._record["id"], self._interval, self._liveness,
                                            self._heartbeat_timeout, self._membership.signal)
                self._heartbeat.start()
            watched = arrived[(self._rank + 1) % self._nnodes]
            self._heartbeat.watch(round, watched["id"], json.dumps(watched).encode())
        self._membership.watch(self._connect, round + 1, STATUS_INTERVAL * 12)
        log.info(
            "static rendezvous '%s' round %d complete: node rank %d of %d after %.1f s",
            self.run_id, round, self._rank, self._nnodes, time.monotonic() - started,
        )
        nodes = [NodeInfo(n["addr"], n["local_world_size"], n["role"]) for n in arrived]
        return RendezvousInfo(
            round=round,
            rank=self._rank,
            world_size=len(nodes),
            workers=worker_ranks(nodes)[self._rank],
            master_addr=self._host,
            master_port=self._port,
            store=agents_store(round, self._store),
            read_nodes=lambda: nodes,
        )

    def num_nodes_waiting(self) -> int:
        self._membership.clear()
        if self._round is None:
            return 0
        return len(self._arrived(self._round + 1))

    def lost_nodes(self) -> list[str]:
        if self._heartbeat is not None and self._heartbeat.unreachable is not None:
            raise RendezvousConnectionError(
                f"static rendezvous '{self.run_id}': no heartbeat of this node reached node rank 0's store at "
                f"{self._host}:{self._port} for {self._liveness:g} s ({self._heartbeat.unreachable})"
            )
        if self._round is not None:
            self._fail_if_lost(self._round + 1)
        return []

    def waiting_fd(self) -> int:
        return self._membership.fd

    def leave(self) -> None:
        self._close()

    def shutdown(self, failed: bool = False) -> None:
        self._close()

    # -- internals ----------------------------------------------------------

    def _connect(self, interrupt_fd: int, timeout: float) -> StoreBackend:
        store = TCPStore(self._host, self._port, timeout=timeout, interrupt_fd=interrupt_fd)
        return StoreBackend(store, self._prefix, self._where, self._liveness)

    def _fail_if_lost(self, round: int) -> None:
        """Raise, naming the node, if a member of the round before ``round`` was reported lost."""
        reports = self._kv.lost(round)
        if reports:
            node = json.loads(reports[0])
            raise RendezvousError(
                f"static rendezvous '{self.run_id}' ({self._where}): lost node rank {node['rank']} ({node['addr']}): "
                f"no heartbeat for {self._liveness:g} s, or it left; a static job cannot go on without it"
            )

    def _connect_first(self, started: float, deadline: float) -> None:
        if self._rank == 0:
            try:
                self._hosted = TCPStore(
                    self._host, self._port, is_master=True, multi_tenant=True, wait_for_workers=False,
                    timeout=self._timeout,
                )
            except StoreInterrupted:
                raise
            except DistError as exc:
                raise RendezvousConnectionError(
                    f"static rendezvous '{self.run_id}': node rank 0 cannot host the store at "
                    f"{self._host}:{self._port} ({exc})"
                ) from None
            self._port = self._hosted.port  # the real one when --master-port=0 (one node)
        while True:
            left = deadline - time.monotonic()
            try:
                self._store = TCPStore(
                    self._host,
                    self._port,
                    timeout=max(0.1, min(left, STATUS_INTERVAL)),
                    interrupt_fd=self._interrupt_fd,
                )
                break
            except StoreInterrupted:
                raise
            except DistNetworkError as exc:
                waited = time.monotonic() - started
                if time.monotonic() >= deadline:
                    raise RendezvousConnectionError(
                        f"static rendezvous '{self.run_id}': cannot reach node rank 0's store at "
                        f"{self._host}:{self._port} ({exc}); waited {waited:.0f} s (timeout)"
                    ) from None
                log.warning(
                    "static rendezvous '%s': waiting for node rank 0 to host the store at %s:%d; timeout in %.0f s",
                    self.run_id, self._host, self._port, deadline - time.monotonic(),
                )
        self._store.set_timeout(self._timeout)
        self._kv = StoreBackend(self._store, self._prefix, self._where, self._liveness)

    def _arrived(self, round: int) -> list[dict]:
        return [json.loads(r) for r in self._kv.joined(round)]

    def _wait(self, round: int, started: float, deadline: float, done: Callable[[float], bool]) -> None:
        """Wait until ``done(timeout)`` says the barrier passed, with a status line every STATUS_INTERVAL."""
        status_at = time.monotonic() + STATUS_INTERVAL
        while True:
            now = time.monotonic()
            # At least a millisecond: the store counts in whole ones, and less would return at once,
            # again and again until the deadline.
            if now < deadline and done(max(min(deadline, status_at) - now, 0.001)):
                return
            self._fail_if_lost(round)
            now = time.monotonic()
            if now >= deadline:
                raise RendezvousTimeoutError(
                    f"static rendezvous '{self.run_id}' ({self._where}) timed out after "
                    f"{now - started:.0f} s in round {round}: {self._describe(round)}"
                )
            if now >= status_at:
                log.warning(  # visible at the launcher's default log level
                    "static rendezvous '%s' round %d (%s): %s; timeout in %.0f s",
                    self.run_id, round, self._where, self._describe(round), deadline - now,
                )
                status_at = now + STATUS_INTERVAL

    def _describe(self, round: int) -> str:
        arrived = sorted(self._arrived(round), key=lambda r: r["rank"])
        ranks = {r["rank"] for r in arrived}
        missing = [str(r) for r in range(self._nnodes) if r not in ranks]
        present = ", ".join(f"rank {r['rank']} {r['addr']}" for r in arrived) or "none"
        return f"{len(arrived)} of {self._nnodes} nodes arrived ({present}); missing node rank(s) {', '.join(missing)}"

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._membership.close()
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.stop()
            try:  # so that the node watching this one sees it gone at once
                heartbeat.kv.mark_left(self._record["id"], None if self._round is None else self._round + 1)
            except (RendezvousError, StoreInterrupted):
                pass  # node 0's store is gone (it ended first): nobody is left to tell
            finally:
                heartbeat.close()
        for store in (self._store, self._hosted):
            if store is not None:
                store.close()
