"""The Python launch API, torch.distributed.launcher.api's shape without torch."""
from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from launcher.logs import LogsSpecs

__all__ = ["LaunchConfig", "elastic_launch", "launch_agent"]

log = logging.getLogger("launcher")

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


class elastic_launch:
    """Launch ``entrypoint`` on this node as torch's ``elastic_launch`` does.

    ``entrypoint`` is a program (``sys.executable`` with a script in the
    arguments, a script path, a binary) or a picklable Python function; a
    function's return values come back as ``{global_rank: value}``::

        elastic_launch(LaunchConfig(1, 1, 4, rdzv_backend="c10d", rdzv_endpoint="localhost:0"), train)(lr)
    """

    def __init__(self, config: LaunchConfig, entrypoint: Callable | str):
        self._config = config
        self._entrypoint = entrypoint

    def __call__(self, *args) -> dict[int, Any]:
        return launch_agent(self._config, self._entrypoint, list(args))


def _get_entrypoint_name(entrypoint: Callable | str | None, args: list[Any]) -> str:
    """The name failure reports use: a function's name, a Python worker's script or module, or the program.

    A Python worker is recognised as torch does (``sys.executable``) and also
    by name (``--python``, ``PYTHON_EXEC``); ``-c CODE`` (``--run-path``) is
    skipped so the script behind it names the job.
    """
    if callable(entrypoint):
        return entrypoint.__name__
    if isinstance(entrypoint, str):
        if entrypoint == sys.executable or os.path.basename(entrypoint).startswith("python"):
            rest = iter(args)
            for arg in rest:
                if arg == "-c":
                    next(rest, None)
                elif not arg.startswith("-"):
                    return arg
            return ""
        return entrypoint
    return ""


def launch_agent(config: LaunchConfig, entrypoint: Callable | str, args: list[Any]) -> dict[int, Any]:
    """Run this node's agent to the end: return values on success, else raise.

    Raises ``ChildFailedError`` (with the failure summary) when workers failed
    and ``SignalException`` when the launcher was signalled. The rendezvous is
    shut down on success and on errors; on a signal this node only leaves it,
    so the other nodes can carry on (torchrun's rule).
    """
    from launcher import agent, rendezvous
    from launcher.errors import ChildFailedError, SignalException, write_summary_json
    from launcher.supervisor import SignalWatch

    if not config.run_id:
        config.run_id = str(uuid.uuid4().int)
        log.warning("config has no run_id, generated a random run_id: %s", config.run_id)
    name = _get_entrypoint_name(entrypoint, args)
    with SignalWatch(parse_signals(config.signals_to_handle)) as signals:
        params = rendezvous.RendezvousParameters(
            backend=config.rdzv_backend,
            endpoint=config.rdzv_endpoint,
            run_id=config.run_id,
            min_nodes=config.min_nodes,
            max_nodes=config.max_nodes,
            local_world_size=config.nproc_per_node,
            role=config.role,
            local_addr=config.local_addr,
            config=dict(config.rdzv_configs),
            interrupt_fd=signals.fileno(),
        )
        handler = rendezvous.create_handler(params)
        node = agent.Agent(config, entrypoint, args, handler, signals)
        shutdown = True
        try:
            result = node.run()
            if result.failed:
                write_summary_json(os.path.join(result.attempt_dir, "failure.json"), name, result.failures)
                raise ChildFailedError(name, result.failures)
            return result.return_values
        except SignalException:
            shutdown = False
            handler.leave()
            raise
        finally:
            if shutdown:
                handler.shutdown()
