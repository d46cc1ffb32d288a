"""Start the local workers, wake on what they do, and end them: the agent's view.

Guarantees (see ``_native/supervisor.pyx``, the parts it includes, and ``supervisor_spawn.h``):

* Each worker leads its own session and process group, has SIGKILL as its
  parent-death signal, starts with default signal dispositions, an empty
  signal mask, no inherited descriptors but stdin/stdout/stderr, and the
  open-files limit the launcher started with.
* Nothing outlives the launcher: where it can make one, the workers run in a
  cgroup of the group's, killed whole at the end and by a guardian process
  when the launcher is gone, however it went; the guardian also SIGKILLs
  every worker's process group. Without a cgroup, the end of the group kills
  the workers' process groups and what the launcher adopted from them. The
  launcher is the subreaper of the workers' orphans and reaps them, and only
  them, never the embedding program's own children.
* Exits are seen through pidfds, signals through signalfds, output through
  pipes, all in one epoll loop: no timer, no thread.
* A worker's process group id stays taken until the group ends (its exited
  leader is reaped only then), so a signal to a group never reaches a stranger.
* A worker the launcher ends though it did not end by itself (the agent found
  it hung: ``end_hung``; or it outlived ``shutdown_timeout``) has its stack
  captured first (``launcher.stacks``); its exit says why and where it was,
  and the same goes to its stderr (log file, or console) once the group ended.

Where output goes (torchrun's rules, from ``launcher.logs``): a stdout that is
only redirected is the file itself. Everything shown on the console, and
every stderr, goes through the loop, which writes whole lines (never split or
interleaved with another rank's), prefixed on the console when teed, copies
teed lines matching a duplicate filter to the attempt's filtered file, and
keeps the last 20 stderr lines for the failure report. A worker that pauses
mid-line on an unprefixed console (a progress bar) has that part shown at once.
"""
from __future__ import annotations

import enum
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from launcher._native.supervisor import OutputRoute, SignalWatch, Supervisor
from launcher.errors import signal_name
from launcher.logs import AttemptLogs, StreamLogs, WorkerLogs
from launcher.stacks import StackDumps, capture_stacks

__all__ = ["SignalWatch", "WorkerLaunch", "WorkerExit", "EventKind", "Event", "WorkerGroup"]

log = logging.getLogger("launcher")


@dataclass
class WorkerLaunch:
    local_rank: int
    global_rank: int
    argv: list[str]
    env: dict[str, str]  # the complete environment
    logs: WorkerLogs
    cwd: str | None = None
    cpus: set[int] | None = None  # NUMA binding: sched_setaffinity
    mem_nodes: set[int] | None = None  # NUMA binding: set_mempolicy(MPOL_BIND)


@dataclass
class WorkerExit:
    local_rank: int
    global_rank: int
    pid: int
    exitcode: int | None  # set when it exited
    signal: int | None  # set when a signal killed it
    core_dumped: bool
    started_at: float  # time.time()
    ended_at: float
    stderr_tail: list[str] = field(default_factory=list)  # its last 20 stderr lines
    hang: str | None = None  # why the launcher ended it, when it did not end by itself
    stack: str | None = None  # where it was then (launcher.stacks)
    still_running: bool = False  # it outlived SIGKILL (stuck in the kernel): the guardian has it

    @property
    def failed(self) -> bool:
        return self.exitcode != 0

    @property
    def status(self) -> str:
        if self.still_running:
            return "still running after SIGKILL (stuck in the kernel)"
        if self.signal is not None:
            return signal_name(self.signal) + (" (core dumped)" if self.core_dumped else "")
        return f"exitcode {self.exitcode}"


class EventKind(enum.Enum):
    """Why ``WorkerGroup.wait`` returned, in the order it reports them."""

    SIGNAL = "signal"  # a handled signal arrived: ``Event.signum``
    EXITED = "exited"  # workers exited: ``Event.exits``
    FD = "fd"  # a watched descriptor is readable: ``Event.fd``
    TIMEOUT = "timeout"


@dataclass
class Event:
    """Why ``WorkerGroup.wait`` returned.

    ``exits`` holds every exit seen since the previous wait, whatever the kind.
    """

    kind: EventKind
    exits: list[WorkerExit] = field(default_factory=list)
    signum: int | None = None
    fd: int | None = None


class WorkerGroup:
    """The local workers of one attempt.

    ``wait`` returns on events; ``stop`` ends the group. When every worker has
    exited, ``wait`` ends the group by itself (their leftover processes are
    killed, output flushed, zombies reaped); ``stop`` then only returns the
    exits. Start it from the main thread, which must outlive the workers.
    With ``term_on_failure`` the loop sends SIGTERM to every worker's group the
    moment one fails, before the agent wakes; ``stop`` then only waits.
    ``stack_dumps`` arms nothing by itself (the workers' environment must have
    been armed with it); without it a captured stack is the kernel's view only.
    """

    def __init__(
        self,
        workers: list[WorkerLaunch],
        attempt_logs: AttemptLogs,
        *,
        shutdown_timeout: float = 30.0,
        signal_watch: SignalWatch | None = None,
        duplicate_stdout_filters: Iterable[str] = (),
        duplicate_stderr_filters: Iterable[str] = (),
        term_on_failure: bool = False,
        stack_dumps: StackDumps | None = None,
    ):
        if shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be non-negative, got {shutdown_timeout}")
        for worker in workers:
            if not worker.argv:
                raise ValueError(f"local rank {worker.local_rank}: empty argv")
        self.workers = list(workers)
        self.attempt_logs = attempt_logs
        self.shutdown_timeout = shutdown_timeout
        self.signal_watch = signal_watch
        self.stdout_filters = [f.encode() for f in duplicate_stdout_filters if f]
        self.stderr_filters = [f.encode() for f in duplicate_stderr_filters if f]
        self.term_on_failure = term_on_failure
        self.stack_dumps = stack_dumps
        self.exits: dict[int, WorkerExit] = {}
        self.hangs: dict[int, tuple[str, str]] = {}  # by local rank: why the launcher ended it, its stack
        self._native: Supervisor | None = None
        self._pending_signals: list[int] = []

    def start(self) -> None:
        """Spawn every worker. OSError naming the program if one cannot be started (the others are stopped)."""
        if self._native is not None:
            raise RuntimeError("the group was already started")
        self._native = Supervisor(
            self.signal_watch.fileno() if self.signal_watch is not None else -1, self.term_on_failure
        )
        try:
            for worker in self.workers:
                stdout, stderr = worker.logs.stdout, worker.logs.stderr
                self._native.spawn(
                    _programs(worker.argv[0], worker.env),
                    [os.fsencode(arg) for arg in worker.argv],
                    [os.fsencode(f"{key}={value}") for key, value in worker.env.items()],
                    os.fsencode(worker.cwd) if worker.cwd is not None else None,
                    sorted(worker.cpus) if worker.cpus else None,
                    sorted(worker.mem_nodes) if worker.mem_nodes else None,
                    # stdout goes through the loop when it is shown or teed; stderr always, for its tail
                    _route(stdout, self.attempt_logs.filtered_stdout, self.stdout_filters,
                           piped=stdout.console or stdout.teed, keep_tail=False),
                    _route(stderr, self.attempt_logs.filtered_stderr, self.stderr_filters, piped=True, keep_tail=True),
                )
        except BaseException:
            self._end(signal.SIGTERM)
            raise

    def wait(self, timeout: float | None = None, watch_fds: Sequence[int] = ()) -> Event:
        """Sleep (GIL released, output routed meanwhile) until a worker exits, a handled
        signal arrives, a watched fd is readable, or ``timeout`` seconds pass."""
        native = self._started()
        signals, exited, ready = [], [], []
        if not native.finished:
            woke = native.wait(-1.0 if timeout is None else timeout, list(watch_fds))
            signals, exited, ready = woke.signals, woke.exited, woke.ready_fds
        if not native.finished and native.all_exited():
            signals += self._end(signal.SIGTERM)
        exits = [self._record_exit(index) for index in exited]
        self._pending_signals += signals
        if self._pending_signals:
            return Event(EventKind.SIGNAL, exits, signum=self._pending_signals.pop(0))
        if exits:
            return Event(EventKind.EXITED, exits)
        if ready:
            return Event(EventKind.FD, exits, fd=ready[0])
        return Event(EventKind.TIMEOUT, exits)

    def stop(self, first_signal: int = signal.SIGTERM) -> list[WorkerExit]:
        """``first_signal`` to every worker's process group, up to ``shutdown_timeout`` s for them
        to exit (a SIGINT arriving meanwhile ends the wait at once), then SIGKILL, reap, flush.
        Returns every worker's exit, by local rank."""
        self._pending_signals += self._end(first_signal)
        return [self.exits[worker.local_rank] for worker in self.workers if worker.local_rank in self.exits]

    def forward(self, signum: int) -> None:
        """``signum`` to every running worker's process group; the group goes on."""
        native = self._started()
        if not native.finished:
            native.signal_groups(int(signum))

    def end_hung(self, hung: dict[int, tuple[str, int]]) -> None:
        """End workers the agent found hung (local rank -> why, and the signal to send): capture their
        stacks first, all together, then signal each. The group goes on until ``stop``."""
        pids = self.pids()
        self._capture({local_rank: why for local_rank, (why, _) in hung.items()})
        for local_rank, (_, signum) in hung.items():
            try:
                os.kill(pids[local_rank], signum)
            except ProcessLookupError:  # not reaped before the group ends, so only a pid that is already gone
                pass

    def _capture(self, reasons: dict[int, str]) -> None:
        pids = self.pids()
        directory = self.stack_dumps.directory if self.stack_dumps is not None else None
        stacks = capture_stacks([pids[local_rank] for local_rank in reasons], directory)
        for local_rank, why in reasons.items():
            self.hangs[local_rank] = (why, stacks[pids[local_rank]])

    def _before_kill(self, first_signal: int, indices: list[int]) -> None:
        """The native stop's deadline passed with these workers running: capture their stacks before SIGKILL."""
        overdue = {}
        for index in indices:
            worker = self.workers[index]
            if worker.local_rank in self.hangs:  # the agent ended it already and has its stack
                continue
            overdue[worker.local_rank] = (
                f"still running {self.shutdown_timeout:g} s after {signal_name(first_signal)} "
                "(the shutdown timeout): SIGKILL"
            )
            log.warning("rank %d (pid %d) is %s; capturing its stack first",
                        worker.global_rank, self._native.pid(index), overdue[worker.local_rank])
        if overdue:
            self._capture(overdue)

    def _end(self, first_signal: int) -> list[int]:
        native = self._started()
        if native.finished:
            return []
        try:
            signals = native.stop(int(first_signal), self.shutdown_timeout,
                                  functools.partial(self._before_kill, first_signal))
        finally:
            native.close()
        for index in range(native.count()):
            self._record_exit(index)
        for worker in self.workers:
            if worker.local_rank in self.hangs:
                _write_to_stderr(worker, *self.hangs[worker.local_rank])
        return signals

    def _record_exit(self, index: int) -> WorkerExit:
        worker = self.workers[index]
        seen = self._native.exit_record(index)
        recorded = self.exits.get(worker.local_rank)
        hang, stack = self.hangs.get(worker.local_rank, (None, None))
        if recorded is None:
            recorded = self.exits[worker.local_rank] = WorkerExit(
                local_rank=worker.local_rank,
                global_rank=worker.global_rank,
                pid=seen.pid,
                exitcode=seen.exitcode,
                signal=seen.signal,
                core_dumped=seen.core_dumped,
                started_at=seen.started_at,
                # None: it did not die even of SIGKILL (stuck in the kernel): the guardian has it
                ended_at=seen.ended_at if seen.ended_at is not None else time.time(),
                stderr_tail=seen.stderr_tail,
                hang=hang,
                stack=stack,
                still_running=seen.ended_at is None,
            )
        else:
            recorded.stderr_tail = seen.stderr_tail
            recorded.hang, recorded.stack = hang, stack
        return recorded

    def pids(self) -> dict[int, int]:
        """The workers' pids by local rank."""
        native = self._started()
        return {self.workers[index].local_rank: native.pid(index) for index in range(native.count())}

    def _started(self) -> Supervisor:
        if self._native is None:
            raise RuntimeError("the group was not started")
        return self._native


def _route(logs: StreamLogs, filtered_file: str, filters: list[bytes], *, piped: bool, keep_tail: bool) -> OutputRoute:
    """Where the loop sends one stream; teed console lines matching a filter are copied to ``filtered_file``."""
    if not piped:
        return OutputRoute(logs.file)
    filtered = logs.teed and logs.console and bool(filters)
    return OutputRoute(
        logs.file,
        piped=True,
        console=logs.console,
        prefix=logs.prefix.encode(),
        filtered=filtered_file if filtered else None,
        filters=filters if filtered else (),
        keep_tail=keep_tail,
    )


def _write_to_stderr(worker: WorkerLaunch, hang: str, stack: str) -> None:
    """Where the worker's stderr went (its log file, the console): why the launcher ended it and where it was."""
    stderr = worker.logs.stderr
    text = f"[launcher] rank {worker.global_rank}: {hang}; its stack then:\n{stack}\n"
    if stderr.file is not None:
        try:
            with open(stderr.file, "a") as log_file:
                log_file.write(text)
        except OSError as error:  # the report still has it
            log.warning("cannot add rank %d's stack to %s: %s", worker.global_rank, stderr.file, error.strerror)
    if stderr.console:
        sys.stderr.write("".join(f"{stderr.prefix}{line}\n" for line in text.splitlines()))
        sys.stderr.flush()


def _programs(program: str, env: dict[str, str]) -> list[bytes]:
    """The paths to try for ``program``, as execvp would with the worker's PATH."""
    if "/" in program:
        return [os.fsencode(program)]
    return [os.fsencode(os.path.join(directory or ".", program)) for directory in os.get_exec_path(env)]
