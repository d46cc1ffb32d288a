"""The agent's events in torchelastic's schema, without torch: what ``--event-log-handler=console`` prints.

One JSON object a line on stderr, torch's ``Event`` (torch.distributed.elastic.events.api)::

    {"name": "torchelastic.worker.status.<STATE>", "source": "AGENT" | "WORKER", "timestamp": <ms>,
     "metadata": {"run_id", "global_rank", "group_rank", "worker_id", "role", "hostname", "state",
                  "total_run_time", "rdzv_backend", "raw_error", "metadata", "agent_restarts", "duration_ms"}}

The inner ``"metadata"`` is itself JSON: ``group_world_size`` and
``entry_point``, and for a worker ``local_rank``, ``role_rank``,
``role_world_size``, ``exit_code`` and ``worker_pid``, each a one-element
list. The agent records them in ``SimpleElasticAgent``'s order (see
launcher.agent). torch's console handler is a logging handler at
``$LOGLEVEL`` (default INFO) writing INFO records, so ``LOGLEVEL=WARNING``
silences the events, here as under torchrun.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from enum import Enum

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["AgentEvent", "EventLog", "EventSource", "WorkerStatus"]

EVENT_NAME_PREFIX = "torchelastic.worker.status."


class EventSource(str, Enum):
    AGENT = "AGENT"
    WORKER = "WORKER"


class AgentEvent(Enum):
    """The state an event records; torch's, then ours in the same shape."""

    RENDEZVOUS = "RENDEZVOUS"  # the agent: a rendezvous round ended (duration_ms)
    ASSIGN_WORKER_RANKS = "ASSIGN_WORKER_RANKS"  # the agent: this node's workers got their ranks (duration_ms)
    START = "START"  # a worker started
    SUCCEEDED = "SUCCEEDED"  # a worker exited 0; the agent: every worker succeeded
    FAILED = "FAILED"  # a worker failed (exit_code, raw_error); the agent: its workers or itself (raw_error)
    TERMINATED = "TERMINATED"  # a worker the agent stopped because another failed
    RESTARTING = "RESTARTING"  # ours: the group failed and restarts (raw_error: the root cause)
    MEMBERSHIP_CHANGED = "MEMBERSHIP_CHANGED"  # ours: a node waits to join; the group restarts with it
    NODE_LOST = "NODE_LOST"  # ours: a member's heartbeats stopped; the group restarts without it (lost_nodes)
    HUNG = "HUNG"  # ours: a worker the launcher ended for a hang (raw_error: {"hang": why, "stack": where it was})


@dataclass(frozen=True)
class WorkerStatus:
    """One worker as its event names it."""

    local_rank: int
    global_rank: int
    role_rank: int
    role_world_size: int
    pid: int
    exit_code: int | None = None  # torchrun's: minus the signal number for a signal death


class EventLog:
    """Records one agent's events to ``handler`` (``console``: stderr; anything else: nowhere)."""

    def __init__(self, handler: str, *, run_id: str, role: str, hostname: str, rdzv_backend: str, entry_point: str):
        level = logging.getLevelName(os.environ.get("LOGLEVEL", "INFO").upper())
        self.enabled = handler == "console" and isinstance(level, int) and level <= logging.INFO
        self.run_id = run_id
        self.role = role
        self.hostname = hostname
        self.rdzv_backend = rdzv_backend
        self.entry_point = entry_point
        self.started = time.monotonic()

    def record(
        self,
        state: AgentEvent,
        *,
        group_rank: int | None,
        group_world_size: int | None,
        agent_restarts: int,
        worker: WorkerStatus | None = None,
        raw_error: str | None = None,
        duration_ms: float | None = None,
        **extra: Any,
    ) -> None:
        """Print one event; ``extra`` goes into the inner metadata after torch's keys."""
        if not self.enabled:
            return
        inner: dict[str, Any] = {"group_world_size": group_world_size, "entry_point": self.entry_point}
        if worker is not None:
            inner.update(
                local_rank=[worker.local_rank],
                role_rank=[worker.role_rank],
                role_world_size=[worker.role_world_size],
                exit_code=[worker.exit_code],
                worker_pid=[worker.pid],
            )
        inner.update(extra)
        event = {
            "name": EVENT_NAME_PREFIX + state.value,
            "source": (EventSource.WORKER if worker is not None else EventSource.AGENT).value,
            "timestamp": int(time.time() * 1000),  # torch's field is milliseconds, though torch leaves it 0
            "metadata": {
                "run_id": self.run_id,
                "global_rank": worker.global_rank if worker is not None else None,
                "group_rank": group_rank,
                "worker_id": str(worker.pid) if worker is not None else None,
                "role": self.role,
                "hostname": self.hostname,
                "state": state.value,
                "total_run_time": int(time.monotonic() - self.started),
                "rdzv_backend": self.rdzv_backend,
                "raw_error": raw_error,
                "metadata": json.dumps(inner),
                "agent_restarts": agent_restarts,
                "duration_ms": duration_ms,
            },
        }
        print(json.dumps(event), file=sys.stderr, flush=True)
