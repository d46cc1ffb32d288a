"""The c10d backend: the dynamic rendezvous with its state in our TCP store.

The store at ``--rdzv-endpoint`` is hosted by the agent whose machine the
endpoint names (or that says ``is_host=true``); when its port is taken (another
agent on the same machine was first) it is a client like the others.

Its keys are below ``launcher/rdzv/<run id>/`` (see keyvalue.py's StoreBackend).
"""
from __future__ import annotations

import socket

from launcher.rendezvous import RendezvousConnectionError, RendezvousHandler, RendezvousParameters
from launcher.rendezvous.dynamic import DynamicRendezvousHandler, Settings
from launcher.rendezvous.keyvalue import AGENT_KEY_PREFIX, StoreBackend, fqdn
from launcher.rendezvous.options import parse_rdzv_endpoint
from launcher.store import DistError, DistNetworkError, StoreInterrupted, TCPStore

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def _is_this_machine(host: str) -> bool:
    """Whether ``host`` names this machine (torch's _matches_machine_hostname)."""
    if host == "localhost":
        return True
    import ipaddress  # here: "localhost", --standalone's endpoint, does without it

    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass
    if host in (socket.gethostname(), fqdn()):
        return True
    try:
        theirs = {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
        ours = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, proto=socket.IPPROTO_TCP)}
    except OSError:
        return False
    return bool(theirs & ours)


def create_c10d_handler(params: RendezvousParameters, config: dict[str, Any]) -> RendezvousHandler:
    (endpoint,) = parse_rdzv_endpoint("c10d", params.endpoint)
    host, port = endpoint.host, endpoint.port
    settings = Settings.from_config(params, config)
    is_host = config["is_host"] if config["is_host"] is not None else _is_this_machine(host)
    owned = []
    if is_host:
        try:
            hosted = TCPStore(
                host, port, is_master=True, multi_tenant=True, wait_for_workers=False, timeout=settings.read_timeout
            )
            owned.append(hosted)
            port = hosted.port  # the real one when the endpoint says port 0
        except DistNetworkError as exc:
            # Another agent on this machine hosts it (torch falls back the same way),
            # unless the user said this one must.
            if config["is_host"]:
                raise RendezvousConnectionError(
                    f"cannot host the c10d rendezvous store at {host}:{port}: {exc}"
                ) from None
    where = f"c10d store {host}:{port}"
    prefix = f"{AGENT_KEY_PREFIX}/rdzv/{params.run_id}/"

    def connect(interrupt_fd: int, timeout: float) -> StoreBackend:
        try:
            store = TCPStore(host, port, timeout=timeout, interrupt_fd=interrupt_fd)
        except StoreInterrupted:
            raise
        except DistError as exc:
            raise RendezvousConnectionError(f"cannot reach the {where} ({exc}); tried for {timeout:g} s") from None
        return StoreBackend(store, prefix, where, settings.liveness)

    try:
        return DynamicRendezvousHandler(where, settings, connect, params, owned=owned)
    except BaseException:
        for store in owned:
            store.close()
        raise
