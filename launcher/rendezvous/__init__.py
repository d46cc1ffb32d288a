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
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = [
    "NodeInfo",
    "RendezvousClosedError",
    "RendezvousConnectionError",
    "RendezvousError",
    "RendezvousHandler",
    "RendezvousInfo",
    "RendezvousParameters",
    "RendezvousTimeoutError",
    "BACKENDS",
    "create_handler",
    "parse_endpoint",
    "parse_rdzv_conf",
]

BACKENDS = ("c10d", "etcd", "static")
C10D_DEFAULT_PORT = 29400  # torchrun's, for a c10d endpoint given without a port

# Wire prefix of every key the agents (not the workers) keep in the workers'
# store: the static backend clears everything else between rounds.
AGENT_KEY_PREFIX = "launcher"


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

    backend: str
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
# --rdzv-conf


def _positive_int(key: str, value: Any) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        number = 0
    if number <= 0:
        raise ValueError(f"--rdzv-conf {key}={value}: expected a positive whole number of seconds or times")
    return number


def _non_negative_int(key: str, value: Any) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        number = -1
    if number < 0:
        raise ValueError(f"--rdzv-conf {key}={value}: expected a whole number >= 0")
    return number


def _bool(key: str, value: Any) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "t", "yes", "y"):
        return True
    if text in ("0", "false", "f", "no", "n"):
        return False
    raise ValueError(f"--rdzv-conf {key}={value}: expected true or false (also 1/0, yes/no)")


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def parse(key: str, value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"--rdzv-conf {key}={value}: expected one of {', '.join(choices)}")
        return text

    return parse


def _text(key: str, value: Any) -> str:
    return str(value).strip()


@dataclass(frozen=True)
class _Option:
    backends: tuple[str, ...]
    default: Any  # None: unset unless given
    parse: Callable[[str, Any], Any]
    help: str


_DYNAMIC = ("c10d", "etcd")

# torchrun 2.13's keys (dynamic_rendezvous.py, c10d_rendezvous_backend.py,
# etcd_rendezvous.py, static_tcp_rendezvous.py) with their defaults.
OPTIONS: dict[str, _Option] = {
    "join_timeout": _Option(_DYNAMIC, 600, _positive_int, "seconds a node waits for a round to complete"),
    "last_call_timeout": _Option(
        _DYNAMIC, 30, _positive_int, "seconds to wait for more nodes once the minimum has joined"
    ),
    "close_timeout": _Option(_DYNAMIC, 30, _positive_int, "seconds shutdown() may take to close the rendezvous"),
    "heartbeat_timeout": _Option(_DYNAMIC, 5, _positive_int, "seconds one keep-alive heartbeat may take"),
    "keep_alive_interval": _Option(_DYNAMIC, 5, _positive_int, "seconds between a node's heartbeats"),
    "keep_alive_max_attempt": _Option(
        _DYNAMIC, 3, _positive_int, "missed heartbeats after which a node counts as dead"
    ),
    "read_timeout": _Option(
        _DYNAMIC, 60, _positive_int, "seconds to reach the store or etcd, and for one operation on it"
    ),
    "timeout": _Option(
        ("static",) + _DYNAMIC,
        600,
        _positive_int,
        "static: seconds to wait for every node; c10d/etcd: accepted, no effect (use join_timeout)",
    ),
    "is_host": _Option(("c10d",), None, _bool, "whether this node hosts the c10d store (default: guessed)"),
    "store_type": _Option(("c10d",), "tcp", _choice("tcp"), "the c10d store: tcp"),
    "protocol": _Option(("etcd",), None, _choice("http", "https"), "etcd scheme for endpoints given without one"),
    "cacert": _Option(("etcd",), None, _text, "CA certificate file to verify etcd (https)"),
    "cert": _Option(("etcd",), None, _text, "client certificate file for etcd (https)"),
    "key": _Option(("etcd",), None, _text, "private key file of the client certificate"),
    "etcd_prefix": _Option(("etcd",), "/launcher/rendezvous", _text, "etcd key prefix; the run id goes below it"),
}

# Set by the launcher itself from --node-rank, not through --rdzv-conf.
_STATIC_RANK = "rank"


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def parse_rdzv_conf(text: str) -> dict[str, str]:
    """Parse ``--rdzv-conf`` (``key1=value1,key2=value2``), torchrun's syntax.

    One pair of quotes around the whole or around a value is dropped (torch's
    tests pass ``--rdzv-conf='timeout=5'`` without a shell). Unknown keys raise
    ValueError listing the valid ones.
    """
    config: dict[str, str] = {}
    text = _unquote(text.strip())
    if not text:
        return config
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), _unquote(value.strip())
        if not key:
            raise ValueError(f"--rdzv-conf '{text}': expected key1=value1,...,keyN=valueN")
        if not sep or not value:
            raise ValueError(f"--rdzv-conf option '{key}' has no value; expected {key}=VALUE")
        if key not in OPTIONS:
            raise ValueError(f"unknown --rdzv-conf key '{key}'; valid keys: {', '.join(sorted(OPTIONS))}")
        config[key] = value
    return config


def backend_config(backend: str, config: dict[str, Any]) -> dict[str, Any]:
    """Every option of ``backend``: the given ones parsed and checked, the others at their default."""
    valid = sorted(name for name, option in OPTIONS.items() if backend in option.backends)
    for key in config:
        if key == _STATIC_RANK and backend == "static":
            continue
        if key not in valid:
            raise ValueError(
                f"--rdzv-conf key '{key}' does not apply to the {backend} rendezvous backend; "
                f"valid keys for {backend}: {', '.join(valid)}"
            )
    return {
        name: OPTIONS[name].parse(name, config[name]) if name in config else OPTIONS[name].default
        for name in valid
    }


# --------------------------------------------------------------------------
# Endpoints

_HOST = re.compile(r"^[\w.:-]+$")


def parse_endpoint(endpoint: str, default_port: int | None, what: str = "--rdzv-endpoint") -> tuple[str, int]:
    """``host[:port]`` or ``[v6]:port`` -> (host, port), torchrun's syntax.

    ``default_port`` None means the port is required.
    """
    text = endpoint.strip()
    example = "HOST:PORT such as node1:29400 or [::1]:29400"
    if not text:
        raise ValueError(f"{what} is empty; expected {example}")
    if text.startswith("[") and text.endswith("]"):
        host, port_text = text[1:-1], None
    elif text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"malformed {what} '{endpoint}'; expected {example}")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:  # "::1:29400" could be either: say how to write it
        raise ValueError(f"{what} '{endpoint}': put an IPv6 address in brackets; expected {example}")
    else:
        host, port_text = text, None
    if not host or not _HOST.match(host):
        raise ValueError(f"malformed {what} '{endpoint}': bad host '{host}'; expected {example}")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{what} '{endpoint}' has no port; expected {example}")
        return host, default_port
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or int(port_text) > 65535:
        raise ValueError(f"malformed {what} '{endpoint}': port '{port_text}' is not 0-65535; expected {example}")
    return host, int(port_text)


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
