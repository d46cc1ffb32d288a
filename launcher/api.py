"""The Python launch API, torch.distributed.launcher.api's shape without torch."""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from launcher import agent, rendezvous
from launcher.config import LaunchConfig, parse_signals, random_uuid
from launcher.errors import ChildFailedError, SignalException, write_summary_json
from launcher.supervisor import SignalWatch

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["LaunchConfig", "elastic_launch", "launch_agent"]

log = logging.getLogger("launcher")


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
    if not config.run_id:
        config.run_id = str(int(random_uuid().replace("-", ""), 16))  # torch's form: the UUID's integer
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
        shutdown, failed = True, True
        try:
            result = node.run()
            if result.failed:
                write_summary_json(os.path.join(result.attempt_dir, "failure.json"), name, result.failures)
                raise ChildFailedError(name, result.failures)
            failed = False
            return result.return_values
        except SignalException:
            shutdown = False
            handler.leave()
            raise
        finally:
            if shutdown:
                handler.shutdown(failed=failed)
