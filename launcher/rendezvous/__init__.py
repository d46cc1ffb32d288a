"""How the nodes of a job find each other: the rendezvous handlers.

One handler per agent. ``create_handler`` picks the backend:

- ``static``: fixed ``--nnodes``; node rank 0 hosts a TCP store at
  ``--master-addr:--master-port`` which the workers use too.
- ``c10d``: elastic membership kept in our TCP store at ``--rdzv-endpoint``.
- ``etcd``: the same elastic rendezvous with its state in etcd (v3 API over
  etcd's HTTP/JSON gateway).

Every round returns a :class:`RendezvousInfo`: this node's group rank, every
node's address and local world size, and the workers' store (``MASTER_ADDR``
/ ``MASTER_PORT``), which is fresh for every round of c10d and etcd and
cleared between rounds for static, so a restarted attempt never sees the
keys of the previous one.

The backends' names, options (``--rdzv-conf``) and endpoint syntax are in
``options.py``, which the command line checks its values with. The handlers
(``static.py``; ``dynamic.py`` for ``c10d.py`` and ``etcd.py``) share their
state's key-value interface and the TCP store's implementation of it
(``keyvalue.py``) and their background threads (``background.py``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from launcher.rendezvous.options import BACKENDS, backend_config

__all__ = [
    "NodeInfo",
    "RendezvousClosedError",
    "RendezvousConnectionError",
    "RendezvousError",
    "RendezvousHandler",
    "RendezvousInfo",
    "RendezvousParameters",
    "RendezvousTimeoutError",
    "create_handler",
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


@dataclass
class RendezvousInfo:
    round: int
    rank: int  # this node's group rank
    nodes: list[NodeInfo]  # by group rank; the group world size is len(nodes)
    master_addr: str  # the workers' store (MASTER_ADDR / MASTER_PORT)
    master_port: int
    store: Any  # launcher.store.PrefixStore over the workers' store, for the agents of this round

    @property
    def world_size(self) -> int:
        return len(self.nodes)


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

        Also consumes the notification of ``waiting_fd()``.
        """

    @abstractmethod
    def waiting_fd(self) -> int:
        """A file descriptor that is readable once a node has started waiting.

        It stays readable until ``num_nodes_waiting()`` is called, and becomes
        readable again when another node starts waiting.
        """

    @abstractmethod
    def leave(self) -> None:
        """This node leaves (its agent got a signal); the others carry on."""

    @abstractmethod
    def shutdown(self) -> None:
        """Leave, and close the rendezvous when no other node of this node's round is left."""


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
