"""How the nodes of a job find each other: the rendezvous handlers.

One handler per agent. ``create_handler`` picks the backend:

- ``static``: fixed ``--nnodes``; node rank 0 hosts a TCP store at
  ``--master-addr:--master-port`` which the workers use too.
- ``c10d``: elastic membership kept in our TCP store at ``--rdzv-endpoint``.
- ``etcd``: the same elastic rendezvous with its state in etcd (v3 API over
  etcd's HTTP/JSON gateway).

Every round returns a :class:`RendezvousInfo`: this node's group rank, where
its workers' ranks start (:class:`WorkerRanks`), and the workers' store
(``MASTER_ADDR`` / ``MASTER_PORT``), which is fresh for every round of c10d
and etcd and cleared between rounds for static, so a restarted attempt never
sees the keys of the previous one. Every node's address and local world size
(``RendezvousInfo.nodes``) are read on demand: a round of thousands of nodes
does not send each of them the whole list.

While a round runs, ``waiting_fd()`` wakes the agent when the membership may
have changed: a node waits to join (``num_nodes_waiting()``), or a member was
lost (``lost_nodes()``: its heartbeats stopped for ``keep_alive_interval`` x
``keep_alive_max_attempt``, or it left).

The backends' names, options (``--rdzv-conf``) and endpoint syntax are in
``options.py``, which the command line checks its values with. The handlers
(``static.py``; ``dynamic.py`` for ``c10d.py`` and ``etcd.py``) share their
state's key-value interface and the TCP store's implementation of it
(``keyvalue.py``) and their background threads (``background.py``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from launcher.rendezvous.options import BACKENDS, backend_config

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "NodeInfo",
    "RendezvousClosedError",
    "RendezvousConnectionError",
    "RendezvousError",
    "RendezvousHandler",
    "RendezvousInfo",
    "RendezvousParameters",
    "RendezvousTimeoutError",
    "WorkerRanks",
    "create_handler",
    "worker_ranks",
]


class RendezvousError(Exception):
    """A rendezvous failed; the message is one line naming what, where and how long."""


class RendezvousTimeoutError(RendezvousError):
    """The nodes did not meet within the configured timeout."""


class RendezvousClosedError(RendezvousError):
    """The rendezvous was closed: the job finished (or its last node shut down)."""


class RendezvousConnectionError(RendezvousError):
    """The store host or etcd could not be reached or was lost."""


@dataclass
class RendezvousParameters:
    backend: str  # "static", "c10d", "etcd"
    endpoint: str  # host:port; etcd: comma-separated endpoints (http://h:p or h:p)
    run_id: str
    min_nodes: int
    max_nodes: int
    local_world_size: int  # this node's workers (nodes may differ)
    role: str = "default"
    local_addr: str | None = None  # how the other nodes reach this one (default: the FQDN)
    config: dict[str, Any] = field(default_factory=dict)  # parsed --rdzv-conf; static: "rank"
    # The agent's signalfd: every blocking wait ends promptly with
    # launcher.store.StoreInterrupted once it is readable.
    interrupt_fd: int = -1


@dataclass
class NodeInfo:
    addr: str
    local_world_size: int
    role: str


@dataclass(frozen=True)
class WorkerRanks:
    """Where one node's workers sit among every node's: what their RANK, WORLD_SIZE and ROLE_* derive from."""

    world_size: int  # every node's workers together (WORLD_SIZE)
    base_rank: int  # the global rank of the node's local rank 0
    role_base_rank: int  # the same among the nodes of its role
    role_world_size: int  # the workers of the nodes of its role


def worker_ranks(nodes: list[NodeInfo]) -> list[WorkerRanks]:
    """Every node's WorkerRanks, by group rank: its workers follow those of the nodes before it."""
    world_size = sum(node.local_world_size for node in nodes)
    role_sizes: dict[str, int] = {}
    for node in nodes:
        role_sizes[node.role] = role_sizes.get(node.role, 0) + node.local_world_size
    ranks, base, role_bases = [], 0, dict.fromkeys(role_sizes, 0)
    for node in nodes:
        ranks.append(WorkerRanks(world_size, base, role_bases[node.role], role_sizes[node.role]))
        base += node.local_world_size
        role_bases[node.role] += node.local_world_size
    return ranks


@dataclass
class RendezvousInfo:
    round: int
    rank: int  # this node's group rank
    world_size: int  # nodes in the round: the group world size
    workers: WorkerRanks  # this node's
    master_addr: str  # the workers' store (MASTER_ADDR / MASTER_PORT)
    master_port: int
    store: Any  # launcher.store.PrefixStore over the workers' store, for the agents of this round
    read_nodes: Callable[[], list[NodeInfo]] = field(repr=False, compare=False)

    @cached_property
    def nodes(self) -> list[NodeInfo]:
        """Every node of the round, by group rank; read from the rendezvous' state on first use."""
        return self.read_nodes()


class RendezvousHandler(ABC):
    """What the agent calls; one instance per agent (node)."""

    run_id: str

    @abstractmethod
    def next_rendezvous(self) -> RendezvousInfo:
        """Block until a round that includes this node completes.

        Raises RendezvousTimeoutError, RendezvousClosedError,
        RendezvousConnectionError, or StoreInterrupted once the interrupt fd
        is readable.
        """

    @abstractmethod
    def num_nodes_waiting(self) -> int:
        """Nodes waiting to join the next round (they would make the group restart).

        Also consumes the notification of ``waiting_fd()``: call it before ``lost_nodes()``.
        """

    @abstractmethod
    def lost_nodes(self) -> list[str]:
        """The members of this node's round lost since it completed, by address: their heartbeats
        stopped for the keep-alive bound, or they left. The others restart without them.

        Raises RendezvousError when the job cannot go on: a static job's lost node, or the store
        (or etcd) that this node's own heartbeats have not reached for the keep-alive bound.
        """

    @abstractmethod
    def waiting_fd(self) -> int:
        """A file descriptor that is readable once the round's membership may have changed: a node
        started waiting, a member was reported lost, or this node's heartbeats stopped reaching the store.

        It stays readable until ``num_nodes_waiting()`` is called, and becomes
        readable again with the next change.
        """

    @abstractmethod
    def leave(self) -> None:
        """This node leaves (its agent got a signal); the others carry on."""

    @abstractmethod
    def shutdown(self, failed: bool = False) -> None:
        """Leave, and close the rendezvous when no other node of this node's round is left; when this
        node's job ``failed`` for good, close it at once: the others have nothing left to finish."""


# --------------------------------------------------------------------------


def create_handler(params: RendezvousParameters) -> RendezvousHandler:
    """The handler of ``params.backend``; bad parameters raise ValueError saying what is valid."""
    if params.backend not in BACKENDS:
        raise ValueError(f"unknown rendezvous backend '{params.backend}'; valid backends: {', '.join(BACKENDS)}")
    if not params.run_id:
        raise ValueError("the rendezvous run id (--rdzv-id) must not be empty")
    if params.min_nodes < 1:
        raise ValueError(f"the minimum number of nodes must be at least 1, got {params.min_nodes}")
    if params.max_nodes < params.min_nodes:
        raise ValueError(
            f"the minimum number of nodes ({params.min_nodes}) is greater than the maximum ({params.max_nodes}); "
            "use --nnodes=MIN:MAX with MIN <= MAX"
        )
    if params.local_world_size < 1:
        raise ValueError(f"a node needs at least 1 worker, got {params.local_world_size}")
    config = backend_config(params.backend, params.config)
    if params.backend == "static":
        from launcher.rendezvous.static import StaticRendezvousHandler

        return StaticRendezvousHandler.create(params, config)
    if params.backend == "c10d":
        from launcher.rendezvous.c10d import create_c10d_handler

        return create_c10d_handler(params, config)
    from launcher.rendezvous.etcd import create_etcd_handler

    return create_etcd_handler(params, config)
