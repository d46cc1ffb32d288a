"""What to launch on a node and how its nodes meet: ``LaunchConfig``, torch's name and fields, without torch.

The command line (launcher.cli) builds one; the Python API (launcher.api)
and the agent (launcher.agent) run it.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

from launcher.logs import LogsSpecs

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_RDZV_TIMEOUT = 900


@dataclass
class LaunchConfig:
    """What to launch on this node and how to meet the other nodes.

    Field names and defaults are torch's ``LaunchConfig``'s. Two differ in
    type because torch's are torch objects: ``logs_specs`` is
    :class:`launcher.logs.LogsSpecs` and ``numa_binding`` is the mode name
    torchrun's ``--numa-binding`` takes (``node``, ``socket``, ``exclusive``,
    ``core-complex``).
    """

    min_nodes: int
    max_nodes: int
    nproc_per_node: int
    logs_specs: LogsSpecs | None = None
    run_id: str = ""
    role: str = "default_role"
    rdzv_endpoint: str = ""
    rdzv_backend: str = "etcd"
    rdzv_configs: dict[str, Any] = field(default_factory=dict)
    rdzv_timeout: int = -1
    max_restarts: int = 3
    monitor_interval: float = 0.1
    start_method: str = "spawn"
    log_line_prefix_template: str | None = None
    metrics_cfg: dict[str, str] = field(default_factory=dict)
    local_addr: str | None = None
    event_log_handler: str = "null"
    numa_binding: str | None = None
    signals_to_handle: str = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
    duplicate_stdout_filters: list[str] | None = None
    duplicate_stderr_filters: list[str] | None = None
    virtual_local_rank: bool = False
    shutdown_timeout: int | None = None

    def __post_init__(self):
        if self.rdzv_timeout != -1:
            self.rdzv_configs["timeout"] = self.rdzv_timeout
        elif "timeout" not in self.rdzv_configs:
            self.rdzv_configs["timeout"] = DEFAULT_RDZV_TIMEOUT
        if self.logs_specs is None:
            self.logs_specs = LogsSpecs()
        if self.shutdown_timeout is None:
            self.shutdown_timeout = int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))
        elif self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be non-negative, got {self.shutdown_timeout}")


# Handled signals that are forwarded to the workers without ending the job: they notify (Slurm's
# --signal=USR1@90 before a time limit) and the workers decide what follows. Every other handled
# signal ends the job, as under torchrun (which ends it on these too).
NOTIFYING_SIGNALS = frozenset({signal.SIGUSR1, signal.SIGUSR2})


def parse_signals(names: str) -> list[signal.Signals]:
    """``"SIGTERM,SIGINT"`` to signals; ValueError naming the ones the launcher cannot handle."""
    handled = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        sig = getattr(signal.Signals, name, None)
        if sig is None or sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD):
            raise ValueError(
                f"--signals-to-handle: cannot handle '{name}'; "
                "use names such as SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"
            )
        handled.append(sig)
    return handled


def random_uuid() -> str:
    """A random UUID as ``str(uuid.uuid4())`` writes it (torchrun's run ids; unique file names), made without
    the uuid module, whose import (platform, _uuid) is about 2 ms of every start."""
    data = bytearray(os.urandom(16))
    data[6] = data[6] & 0x0F | 0x40  # version 4
    data[8] = data[8] & 0x3F | 0x80  # RFC 4122's variant
    digits = data.hex()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"
