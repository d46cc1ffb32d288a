"""The rendezvous' options: its backends, ``--nnodes``, ``--rdzv-endpoint`` and ``--rdzv-conf``.

The command line checks its values with these parsers before the launch, and
the handlers parse them again with the same ones, so a value the command line
accepts is one the handlers understand.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

BACKENDS = ("c10d", "etcd", "static")
C10D_DEFAULT_PORT = 29400  # torchrun's, for a c10d endpoint given without a port
ETCD_DEFAULT_PORT = 2379

# --------------------------------------------------------------------------
# --nnodes


def parse_min_max_nnodes(nnodes: str) -> tuple[int, int]:
    """``N`` or ``MIN:MAX`` to (min, max); RuntimeError for more parts, as torch's."""
    parts = nnodes.split(":")
    if len(parts) == 1:
        return int(parts[0]), int(parts[0])
    if len(parts) == 2:
        return int(parts[0]), int(parts[1])
    raise RuntimeError(f'nnodes={nnodes} is not in "MIN:MAX" format')


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


_DYNAMIC = ("c10d", "etcd")
_ALL = ("static",) + _DYNAMIC

# torchrun 2.13's keys (dynamic_rendezvous.py, c10d_rendezvous_backend.py,
# etcd_rendezvous.py, static_tcp_rendezvous.py) with their defaults; README.md
# says what each one does.
OPTIONS: dict[str, _Option] = {
    "join_timeout": _Option(_DYNAMIC, 600, _positive_int),
    "last_call_timeout": _Option(_DYNAMIC, 30, _positive_int),
    "close_timeout": _Option(_DYNAMIC, 30, _positive_int),
    "heartbeat_timeout": _Option(_ALL, 5, _positive_int),
    "keep_alive_interval": _Option(_ALL, 5, _positive_int),  # static: ours (torch's static nodes do not heartbeat)
    "keep_alive_max_attempt": _Option(_ALL, 3, _positive_int),
    "read_timeout": _Option(_DYNAMIC, 60, _positive_int),
    "timeout": _Option(_ALL, 600, _positive_int),  # c10d, etcd: accepted, no effect
    "is_host": _Option(("c10d",), None, _bool),
    "store_type": _Option(("c10d",), "tcp", _choice("tcp")),
    "protocol": _Option(("etcd",), None, _choice("http", "https")),
    "cacert": _Option(("etcd",), None, _text),
    "cert": _Option(("etcd",), None, _text),
    "key": _Option(("etcd",), None, _text),
    "etcd_prefix": _Option(("etcd",), "/launcher/rendezvous", _text),
}

# Set by the launcher itself from --node-rank, not through --rdzv-conf.
_STATIC_RANK = "rank"


def _unquote(text: str) -> str:
    """``text`` without the quotes around it, nested pairs too (``'"timeout=5"'``), and the blanks."""
    text = text.strip()
    while len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1].strip()
    return text


def parse_rdzv_conf(text: str) -> dict[str, str]:
    """Parse ``--rdzv-conf`` (``key1=value1,key2=value2``), torchrun's syntax.

    Quotes around the whole or around a value are dropped: torch's tests pass
    ``--rdzv-conf='timeout=5'`` without a shell to remove them, and a program
    that quotes for a shell may add a second pair. Unknown keys raise
    ValueError listing the valid ones.
    """
    config: dict[str, str] = {}
    text = _unquote(text)
    if not text:
        return config
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), _unquote(value)
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
# Hosts and endpoints

_HOST_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a name or an IPv4 address
_IPV6_ADDRESS = re.compile(r"[0-9A-Fa-f]*:[0-9A-Fa-f:.]+")


def host_ok(host: str, bare_ipv6: bool = False) -> bool:
    """A host name, an IPv4 address, or an IPv6 address in brackets (also without them if ``bare_ipv6``).

    Where a port may follow the host, an IPv6 address needs its brackets.
    """
    if host.startswith("[") and host.endswith("]"):
        return bool(_IPV6_ADDRESS.fullmatch(host[1:-1]))
    return bool(_HOST_NAME.fullmatch(host) or (bare_ipv6 and _IPV6_ADDRESS.fullmatch(host)))


def parse_endpoint(endpoint: str, default_port: int | None, what: str = "--rdzv-endpoint") -> tuple[str, int]:
    """``host[:port]`` or ``[v6][:port]`` -> (host, port), torchrun's syntax.

    ``default_port`` None means the port is required.
    """
    text = endpoint.strip()
    example = "HOST:PORT such as node1:29400 or [::1]:29400"
    if not text:
        raise ValueError(f"{what} is empty; expected {example}")
    if text.startswith("["):
        host, bracket, rest = text.partition("]")
        host += bracket
        if not bracket or rest[:1] not in ("", ":"):
            raise ValueError(f"malformed {what} '{endpoint}'; expected {example}")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:  # "::1:29400" could be either: say how to write it
        raise ValueError(f"{what} '{endpoint}': put an IPv6 address in brackets; expected {example}")
    else:
        host, port_text = text, None
    if not host_ok(host):
        raise ValueError(f"malformed {what} '{endpoint}': bad host '{host}'; expected {example}")
    host = host.strip("[]")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{what} '{endpoint}' has no port; expected {example}")
        return host, default_port
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or int(port_text) > 65535:
        raise ValueError(f"malformed {what} '{endpoint}': port '{port_text}' is not 0-65535; expected {example}")
    return host, int(port_text)


@dataclass(frozen=True)
class Endpoint:
    """Where a backend's nodes meet: a TCP store's address, or one of etcd's endpoints."""

    host: str
    port: int
    scheme: str = ""  # etcd's: "http" or "https"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}" if self.scheme else f"{host}:{self.port}"


def parse_rdzv_endpoint(backend: str, text: str, protocol: str | None = None) -> list[Endpoint]:
    """``--rdzv-endpoint`` of ``backend``: where its nodes meet.

    static: one ``host:port`` (built from --master-addr and --master-port when
    not given). c10d: one ``host[:port]``, port 29400, empty for localhost.
    etcd: a comma list of ``[http(s)://]host[:port]``, port 2379, scheme
    ``protocol`` (--rdzv-conf) or else http. Every other input raises
    ValueError saying what is expected.
    """
    if backend == "etcd":
        return [_etcd_endpoint(item.strip(), text, protocol) for item in text.split(",")]
    if "," in text or "://" in text:
        raise ValueError(f"{backend} takes one <host>[:<port>] (lists and URLs are for etcd), got {text!r}")
    if backend == "static":
        host, port = parse_endpoint(text, None, what="--master-addr:--master-port")
    else:
        host, port = parse_endpoint(text or "localhost", C10D_DEFAULT_PORT)
    return [Endpoint(host, port)]


def _etcd_endpoint(item: str, text: str, protocol: str | None) -> Endpoint:
    scheme = protocol or "http"
    if "://" in item:
        scheme, _, item = item.partition("://")
        if scheme not in ("http", "https"):
            raise ValueError(
                f"malformed etcd --rdzv-endpoint '{text}': scheme '{scheme}' is not http or https; "
                "expected comma-separated [http://|https://]HOST[:PORT]"
            )
        if protocol and protocol != scheme:
            raise ValueError(f"etcd endpoint '{scheme}://{item}' contradicts --rdzv-conf protocol={protocol}")
    if item.endswith("/"):
        item = item[:-1]
    if "/" in item:
        raise ValueError(
            f"malformed etcd --rdzv-endpoint '{text}': '{item}' has a path; "
            "expected comma-separated [http://|https://]HOST[:PORT]"
        )
    host, port = parse_endpoint(item, ETCD_DEFAULT_PORT, what="etcd --rdzv-endpoint")
    return Endpoint(host, port, scheme)
