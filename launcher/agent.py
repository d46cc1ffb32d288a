"""The elastic agent: rendezvous, start the local workers, wait on events, restart or finish.

One loop per launcher process (one per node)::

    rendezvous -> ranks -> start the worker group -> wait for an event:
        every worker exited 0          -> exit barrier with the other nodes, done
        a worker failed                -> stop the group; restart while restarts remain, else report
        a worker hung (launcher.hangs) -> its stack, its end, then as a failed worker (no restart after
                                          a worker stuck in the kernel, as torchrun)
        a node waits to join           -> stop the group, restart with it
        a node was lost                -> stop the group, restart without it (not counted as a restart)
        a handled signal               -> forward it, give the workers the shutdown timeout, exit 128+signum
        SIGUSR1 or SIGUSR2, if handled -> forward it, go on waiting (the workers decide what follows)

The agent never polls: it sleeps in the supervisor's event loop, which wakes
on a worker exit, a signal, the rendezvous' membership descriptor (a node
waiting to join, a member lost), a timer request, or when the hang watch has
something due.

Its events (launcher.events) come in torch's ``SimpleElasticAgent`` order:
per round RENDEZVOUS, ASSIGN_WORKER_RANKS and START per worker; RESTARTING or
MEMBERSHIP_CHANGED (ours) before a restart; at the end per worker SUCCEEDED,
FAILED or TERMINATED, then the agent's SUCCEEDED, or FAILED when its workers
failed for good or the agent itself failed (torch records SUCCEEDED for an agent
whose workers failed: a failed job then reads as a success).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from launcher import LOCAL_RANK_MACRO
from launcher.config import NOTIFYING_SIGNALS, LaunchConfig
from launcher.errors import (
    ERROR_FILE_ENV,
    Failure,
    SignalException,
    failure_error_data,
    signal_name,
    torchrun_exitcode,
)
from launcher.events import AgentEvent, EventLog, WorkerStatus
from launcher.hangs import Ending, HangWatch
from launcher.logs import AttemptLogs
from launcher.rendezvous import RendezvousError, RendezvousHandler, RendezvousInfo
from launcher.rendezvous.keyvalue import fqdn
from launcher.store import StoreInterrupted
from launcher.supervisor import EventKind, SignalWatch, WorkerExit, WorkerGroup, WorkerLaunch

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger("launcher")

EXIT_BARRIER_TIMEOUT = 300.0


class Outcome(Enum):
    """How a run of the worker group ended (a signal raises SignalException instead)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    FAILED_FOR_GOOD = "failed_for_good"  # a worker stuck in the kernel (D state): no restart, as torchrun
    MEMBERSHIP_CHANGED = "membership_changed"  # a node waits to join, or one was lost: restart with the others


@dataclass
class RunResult:
    """How the local worker group ended."""

    failures: list[Failure] = field(default_factory=list)  # empty when every worker succeeded
    return_values: dict[int, Any] = field(default_factory=dict)  # by global rank, for function entrypoints
    attempt_dir: str = ""  # the last attempt's log directory

    @property
    def failed(self) -> bool:
        return bool(self.failures)


@dataclass
class Ranks:
    """This node's place in the world of one rendezvous round."""

    group_rank: int
    group_world_size: int
    world_size: int
    base_rank: int  # global rank of this node's local rank 0
    role_rank_base: int
    role_world_size: int

    @classmethod
    def of(cls, info: RendezvousInfo) -> "Ranks":
        return cls(
            group_rank=info.rank,
            group_world_size=info.world_size,
            world_size=info.workers.world_size,
            base_rank=info.workers.base_rank,
            role_rank_base=info.workers.role_base_rank,
            role_world_size=info.workers.role_world_size,
        )


class Agent:
    """Runs the local worker group of one node until it succeeds, fails for good, or is signalled."""

    def __init__(
        self,
        config: LaunchConfig,
        entrypoint: str | Callable,
        args: list[str],
        handler: RendezvousHandler,
        signals: SignalWatch,
    ):
        self.config = config
        self.entrypoint = entrypoint
        self.args = list(args)
        self.handler = handler
        self.signals = signals
        self.host = fqdn()
        self.restart_count = 0  # every restart, membership changes included (TORCHELASTIC_RESTART_COUNT)
        self.remaining_restarts = config.max_restarts  # failures left to restart after
        self.ranks: Ranks | None = None  # this node's place in the latest round
        self.events = EventLog(
            config.event_log_handler,
            run_id=handler.run_id,
            role=config.role,
            hostname=self.host,
            rdzv_backend=config.rdzv_backend,
            # torch's WorkerSpec.get_entrypoint_name (a callable without a name, a partial, by its type's)
            entry_point=os.path.basename(entrypoint)
            if isinstance(entrypoint, str)
            else getattr(entrypoint, "__qualname__", type(entrypoint).__qualname__),
        )

    def run(self) -> RunResult:
        self.hangs = HangWatch(self.config.role)
        try:
            result = self._run()
        except Exception as error:  # a signal, a rendezvous or store failure, anything of the agent's own
            self._event(AgentEvent.FAILED, raw_error="".join(traceback.format_exception(error)))
            raise
        finally:
            self.hangs.close()
        if result.failed:  # the root cause's record, as the launcher's error file holds it
            self._event(AgentEvent.FAILED, raw_error=json.dumps(failure_error_data(result.failures[0])))
        else:
            self._event(AgentEvent.SUCCEEDED)
        return result

    def _run(self) -> RunResult:
        while True:
            info, ranks = self._rendezvous()
            attempt_logs = self.config.logs_specs.attempt(
                self.handler.run_id,
                self.restart_count,
                self.config.role,
                {local: ranks.base_rank + local for local in range(self.config.nproc_per_node)},
                self.config.log_line_prefix_template,
            )
            group = WorkerGroup(
                self._worker_launches(info, ranks, attempt_logs),
                attempt_logs,
                shutdown_timeout=float(self.config.shutdown_timeout),
                signal_watch=self.signals,
                duplicate_stdout_filters=self.config.duplicate_stdout_filters or (),
                duplicate_stderr_filters=self.config.duplicate_stderr_filters or (),
                term_on_failure=True,  # every failure ends the group: start at once
                stack_dumps=self.hangs.stack_dumps,
            )
            group.start()
            for local_rank, pid in group.pids().items():
                self._worker_event(AgentEvent.START, ranks, local_rank, pid)
            outcome, failed = self._monitor(group, info)
            if outcome is Outcome.SUCCEEDED:
                result = RunResult(
                    return_values=self._return_values(attempt_logs, ranks), attempt_dir=attempt_logs.directory
                )
                self._exit_barrier(info)
                self._final_worker_events(group, ranks, [])
                return result
            if outcome in (Outcome.FAILED, Outcome.FAILED_FOR_GOOD):
                failures = [self._failure(exit, attempt_logs) for exit in failed]
                if outcome is Outcome.FAILED_FOR_GOOD and self.remaining_restarts:
                    log.error("[%s] not restarting: a worker stuck in the kernel may still hold its devices "
                              "(as torchrun)", self.config.role)
                if self.remaining_restarts == 0 or outcome is Outcome.FAILED_FOR_GOOD:
                    self._final_worker_events(group, ranks, failures)
                    return RunResult(failures=failures, attempt_dir=attempt_logs.directory)
                log.warning(
                    "[%s] worker group failed (%s); %d/%d restarts left, restarting",
                    self.config.role,
                    ", ".join(f"rank {f.rank}: {exit.status}" for f, exit in zip(failures, failed)),
                    self.remaining_restarts,
                    self.config.max_restarts,
                )
                self._event(
                    AgentEvent.RESTARTING,
                    raw_error=json.dumps(failure_error_data(failures[0])),
                    failed_ranks=[failure.rank for failure in failures],
                )
                self.remaining_restarts -= 1
            self.restart_count += 1

    def _rendezvous(self) -> tuple[RendezvousInfo, Ranks]:
        """The next round and this node's ranks in it, each step an event with its duration, as torch records them."""
        started = time.perf_counter()
        try:
            info = self.handler.next_rendezvous()
        except BaseException as error:
            self._event(AgentEvent.RENDEZVOUS, duration_ms=_ms_since(started))  # a round that failed too
            if isinstance(error, StoreInterrupted):
                raise SignalException(f"Process {os.getpid()} got signal", self._pending_signal()) from None
            raise
        rendezvous_ms, started = _ms_since(started), time.perf_counter()
        self.ranks = Ranks.of(info)
        assign_ms = _ms_since(started)
        self._event(AgentEvent.RENDEZVOUS, duration_ms=rendezvous_ms)
        self._event(AgentEvent.ASSIGN_WORKER_RANKS, duration_ms=assign_ms)
        return info, self.ranks

    def _pending_signal(self) -> signal.Signals:
        signum = self.signals.read()
        return signal.Signals(signum if signum is not None else signal.SIGTERM)

    def _monitor(self, group: WorkerGroup, info: RendezvousInfo) -> tuple[Outcome, list[WorkerExit]]:
        """Wait for the group to succeed, fail, hang, or be overtaken by a change of the round's membership.

        The failed workers reported are those that failed by themselves and those the launcher ended
        (a hang, or past the shutdown timeout), with their stacks."""
        # readable when the membership may have changed: a node waits to join, or a member was lost
        membership_fd = self.handler.waiting_fd()
        watch = [membership_fd, *self.hangs.watch_fds()]
        while True:
            event = group.wait(timeout=self.hangs.timeout(), watch_fds=watch)
            if event.kind is EventKind.EXITED:
                failed = [exit for exit in event.exits if exit.failed]
                if failed:
                    return Outcome.FAILED, self._stop_failed(group, failed)
                if len(group.exits) == self.config.nproc_per_node:
                    return Outcome.SUCCEEDED, []
            elif event.kind is EventKind.SIGNAL and event.signum in NOTIFYING_SIGNALS:
                log.warning("received %s: forwarding it to the workers, which carry on", signal_name(event.signum))
                group.forward(event.signum)
            elif event.kind is EventKind.SIGNAL:
                sig = signal.Signals(event.signum)
                log.warning("received %s: forwarding it to the workers", sig.name)
                group.stop(first_signal=sig)
                raise SignalException(f"Process {os.getpid()} got signal: {sig.value}", sig)
            elif event.kind is EventKind.FD and event.fd == membership_fd and self._membership_changed(group, info):
                return Outcome.MEMBERSHIP_CHANGED, []
            ending = self.hangs.check(group)
            if ending is not None:
                outcome = Outcome.FAILED_FOR_GOOD if ending is Ending.UNINTERRUPTIBLE else Outcome.FAILED
                ended = self._stop_failed(group, [])
                for exit in ended:
                    self._worker_event(AgentEvent.HUNG, self.ranks, exit.local_rank, exit.pid,
                                       raw_error=json.dumps({"hang": exit.hang, "stack": exit.stack}))
                return outcome, ended

    @staticmethod
    def _stop_failed(group: WorkerGroup, failed: list[WorkerExit]) -> list[WorkerExit]:
        """Stop the group; ``failed`` and the workers the launcher ended meanwhile, which have a hang."""
        seen = {exit.local_rank for exit in failed}
        return failed + [exit for exit in group.stop() if exit.hang is not None and exit.local_rank not in seen]

    def _membership_changed(self, group: WorkerGroup, info: RendezvousInfo) -> bool:
        """Whether a node waits to join or a member was lost; if so the group is stopped.

        A lost member is not a failure: the group restarts without it, whatever restarts are left.
        """
        try:
            waiting = self.handler.num_nodes_waiting()  # first: it consumes the descriptor's notification
            lost = self.handler.lost_nodes()
        except StoreInterrupted:
            return False  # a signal: the next wait reports it
        except RendezvousError:
            group.stop()  # the job cannot go on (a static node lost, the store gone): end the workers first
            raise
        if lost:
            log.warning("[%s] lost node(s) %s; restarting the worker group without them", self.config.role,
                        ", ".join(lost))
            self._event(AgentEvent.NODE_LOST, round=info.round, lost_nodes=lost)
        elif waiting:
            log.warning("[%s] a node is waiting to join; restarting the worker group with it", self.config.role)
            self._event(AgentEvent.MEMBERSHIP_CHANGED, num_nodes_waiting=waiting)
        else:
            return False
        group.stop()
        return True

    def _worker_launches(self, info: RendezvousInfo, ranks: Ranks, attempt_logs: AttemptLogs) -> list[WorkerLaunch]:
        bindings = self._numa_bindings()
        launches = []
        for local_rank in range(self.config.nproc_per_node):
            global_rank = ranks.base_rank + local_rank
            worker_logs = attempt_logs.workers[local_rank]
            env = dict(os.environ)
            self.hangs.arm(env)
            env.update(
                {
                    "RANK": str(global_rank),
                    "GROUP_RANK": str(ranks.group_rank),
                    "ROLE_RANK": str(ranks.role_rank_base + local_rank),
                    "ROLE_NAME": self.config.role,
                    "LOCAL_WORLD_SIZE": str(self.config.nproc_per_node),
                    "WORLD_SIZE": str(ranks.world_size),
                    "GROUP_WORLD_SIZE": str(ranks.group_world_size),
                    "ROLE_WORLD_SIZE": str(ranks.role_world_size),
                    "MASTER_ADDR": info.master_addr,
                    "MASTER_PORT": str(info.master_port),
                    "TORCHELASTIC_RESTART_COUNT": str(self.restart_count),
                    "TORCHELASTIC_MAX_RESTARTS": str(self.config.max_restarts),
                    "TORCHELASTIC_RUN_ID": self.handler.run_id,
                    "TORCHELASTIC_USE_AGENT_STORE": str(True),
                    "TORCHELASTIC_SIGNALS_TO_HANDLE": self.config.signals_to_handle,
                    "TORCH_NCCL_ASYNC_ERROR_HANDLING": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
                    ERROR_FILE_ENV: worker_logs.error_file,
                    "LOCAL_RANK": str(local_rank),
                }
            )
            if self.config.virtual_local_rank:
                env["LOCAL_RANK"] = "0"
                env["CUDA_VISIBLE_DEVICES"] = self._visible_device(local_rank)
            cpus, mem_nodes = bindings.get(local_rank, (None, None))
            launches.append(
                WorkerLaunch(
                    local_rank=local_rank,
                    global_rank=global_rank,
                    argv=self._argv(local_rank, attempt_logs),
                    env=env,
                    logs=worker_logs,
                    cpus=cpus,
                    mem_nodes=mem_nodes,
                )
            )
        return launches

    def _argv(self, local_rank: int, attempt_logs: AttemptLogs) -> list[str]:
        if callable(self.entrypoint):
            return [sys.executable, "-u", "-m", "launcher.run_function", self._function_payload(attempt_logs)]
        args = [arg.replace(LOCAL_RANK_MACRO, str(local_rank)) for arg in self.args]
        return [self.entrypoint, *args]

    def _function_payload(self, attempt_logs: AttemptLogs) -> str:
        """Pickle the function and its arguments once per attempt, with the path to import it from."""
        import pickle  # here: only a function entrypoint needs it

        path = os.path.join(attempt_logs.directory, "function.pkl")
        if not os.path.exists(path):
            with open(path, "wb") as out:
                pickle.dump((list(sys.path), pickle.dumps((self.entrypoint, self.args))), out)
        return path

    def _return_values(self, attempt_logs: AttemptLogs, ranks: Ranks) -> dict[int, Any]:
        if not callable(self.entrypoint):
            return {}
        import pickle

        values = {}
        for local_rank, worker_logs in attempt_logs.workers.items():
            with open(os.path.join(os.path.dirname(worker_logs.error_file), "return_value.pkl"), "rb") as f:
                values[ranks.base_rank + local_rank] = pickle.load(f)
        return values

    def _visible_device(self, local_rank: int) -> str:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            return str(local_rank)
        devices = [d.strip() for d in visible.split(",")]
        if local_rank >= len(devices):
            raise ValueError(f"local rank {local_rank} has no device in CUDA_VISIBLE_DEVICES={visible}")
        return devices[local_rank]

    def _numa_bindings(self) -> dict:
        if not self.config.numa_binding:
            return {}
        from launcher.devices import numa_bindings

        return numa_bindings(self.config.numa_binding, self.config.nproc_per_node) or {}

    def _failure(self, exit: WorkerExit, attempt_logs: AttemptLogs) -> Failure:
        error_file = attempt_logs.workers[exit.local_rank].error_file
        return Failure(
            rank=exit.global_rank,
            local_rank=exit.local_rank,
            role=self.config.role,
            host=self.host,
            pid=exit.pid,
            exitcode=exit.exitcode,
            signal=exit.signal,
            core_dumped=exit.core_dumped,
            ended_at=exit.ended_at,
            error_file=error_file if os.path.exists(error_file) else None,
            stderr_tail=exit.stderr_tail,
            hang=exit.hang,
            stack=exit.stack,
            still_running=exit.still_running,
        )

    def _exit_barrier(self, info: RendezvousInfo) -> None:
        """Keep this node (and the store it may host) up until every node's workers are done."""
        if info.world_size == 1:
            return
        started = time.monotonic()
        try:
            if info.store.add("exit_barrier/count", 1) == info.world_size:
                info.store.set("exit_barrier/done", "1")
            info.store.wait(["exit_barrier/done"], EXIT_BARRIER_TIMEOUT)
        except StoreInterrupted:
            raise SignalException(f"Process {os.getpid()} got signal", self._pending_signal()) from None
        except Exception as error:  # a lost peer must not turn this node's success into a failure
            log.warning("exit barrier ended after %.0f s: %s", time.monotonic() - started, error)

    def _event(
        self, event: AgentEvent, *, raw_error: str | None = None, duration_ms: float | None = None, **metadata
    ) -> None:
        """One of the agent's own events; ``metadata`` goes into the event's inner metadata."""
        self.events.record(
            event,
            group_rank=self.ranks.group_rank if self.ranks else None,
            group_world_size=self.ranks.group_world_size if self.ranks else None,
            agent_restarts=self.config.max_restarts - self.remaining_restarts,
            raw_error=raw_error,
            duration_ms=duration_ms,
            **metadata,
        )

    def _worker_event(
        self,
        event: AgentEvent,
        ranks: Ranks,
        local_rank: int,
        pid: int,
        exit_code: int | None = None,
        raw_error: str | None = None,
    ) -> None:
        self.events.record(
            event,
            group_rank=ranks.group_rank,
            group_world_size=ranks.group_world_size,
            agent_restarts=self.config.max_restarts - self.remaining_restarts,
            worker=WorkerStatus(
                local_rank=local_rank,
                global_rank=ranks.base_rank + local_rank,
                role_rank=ranks.role_rank_base + local_rank,
                role_world_size=ranks.role_world_size,
                pid=pid,
                exit_code=exit_code,
            ),
            raw_error=raw_error,
        )

    def _final_worker_events(self, group: WorkerGroup, ranks: Ranks, failures: list[Failure]) -> None:
        """Each worker's end: FAILED with its error data; SUCCEEDED if it exited 0; else TERMINATED (stopped by us)."""
        failed = {failure.local_rank: failure for failure in failures}
        for exit in group.stop():  # every worker has exited: this only returns their exits
            code = torchrun_exitcode(exit.exitcode, exit.signal)
            if exit.local_rank in failed:
                event, raw_error = AgentEvent.FAILED, json.dumps(failure_error_data(failed[exit.local_rank]))
            else:
                event, raw_error = (AgentEvent.SUCCEEDED if code == 0 else AgentEvent.TERMINATED), None
            self._worker_event(event, ranks, exit.local_rank, exit.pid, code, raw_error)


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
