"""Start the local workers, wake on what they do, and end them: the agent's view.

Guarantees (see ``_native/supervisor.pyx`` and ``supervisor_spawn.h``):

* Each worker leads its own session and process group, has SIGKILL as its
  parent-death signal, starts with default signal dispositions, an empty
  signal mask and no inherited descriptors but stdin/stdout/stderr.
* Nothing outlives the launcher: a guardian process SIGKILLs every worker's
  process group when the launcher is gone, however it went; the launcher is
  the subreaper of the workers' orphans and reaps them.
* Exits are seen through pidfds, signals through signalfds, output through
  pipes, all in one epoll loop: no timer, no thread.
* A worker's process group id stays taken until the group ends (its exited
  leader is reaped only then), so a signal to a group never reaches a stranger.

Where output goes (torchrun's rules, from ``launcher.logs``): a stdout that is
only redirected is the file itself. Everything shown on the console, and
every stderr, goes through the loop, which writes whole lines (never split or
interleaved with another rank's), prefixed on the console when teed, copies
teed lines matching a duplicate filter to the attempt's filtered file, and
keeps the last 20 stderr lines for the failure report. A worker that pauses
mid-line on an unprefixed console (a progress bar) has that part shown at once.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from launcher._native.supervisor import SignalWatch, Supervisor
from launcher.errors import signal_name
from launcher.logs import AttemptLogs, StreamLogs, WorkerLogs

__all__ = ["SignalWatch", "WorkerLaunch", "WorkerExit", "Event", "WorkerGroup"]


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

    @property
    def failed(self) -> bool:
        return self.exitcode != 0

    @property
    def status(self) -> str:
        if self.signal is not None:
            return signal_name(self.signal) + (" (core dumped)" if self.core_dumped else "")
        return f"exitcode {self.exitcode}"


@dataclass
class Event:
    """Why ``WorkerGroup.wait`` returned.

    kind: "signal" (``signum``), "exited" (``exits``), "fd" (``fd``) or "timeout".
    ``exits`` holds every exit seen since the previous wait, whatever the kind.
    """

    kind: str
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
        self.filters = {
            "stdout": [f.encode() for f in duplicate_stdout_filters if f],
            "stderr": [f.encode() for f in duplicate_stderr_filters if f],
        }
        self.term_on_failure = term_on_failure
        self.exits: dict[int, WorkerExit] = {}
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
            self._native.start_guardian()
            for worker in self.workers:
                stdout = worker.logs.stdout
                self._native.spawn(
                    _programs(worker.argv[0], worker.env),
                    [os.fsencode(arg) for arg in worker.argv],
                    [os.fsencode(f"{key}={value}") for key, value in worker.env.items()],
                    os.fsencode(worker.cwd) if worker.cwd is not None else None,
                    sorted(worker.cpus) if worker.cpus else None,
                    sorted(worker.mem_nodes) if worker.mem_nodes else None,
                    self._stream_spec(stdout, "stdout", piped=stdout.console or stdout.teed),
                    self._stream_spec(worker.logs.stderr, "stderr", piped=True),
                )
        except BaseException:
            self._end(signal.SIGTERM)
            raise

    def _stream_spec(self, logs: StreamLogs, name: str, piped: bool) -> tuple:
        if not piped:
            return ("file", logs.file) if logs.file is not None else ("null",)
        filtered = logs.teed and logs.console and bool(self.filters[name])
        return (
            "pipe",
            logs.file,
            logs.console,
            logs.prefix.encode(),
            getattr(self.attempt_logs, f"filtered_{name}") if filtered else None,
            self.filters[name] if filtered else [],
            name == "stderr",
        )

    def wait(self, timeout: float | None = None, watch_fds: Sequence[int] = ()) -> Event:
        """Sleep (GIL released, output routed meanwhile) until a worker exits, a handled
        signal arrives, a watched fd is readable, or ``timeout`` seconds pass."""
        native = self._started()
        if native.finished:
            signals, exited, ready = [], [], []
        else:
            signals, exited, ready = native.wait(-1.0 if timeout is None else timeout, list(watch_fds))
        if not native.finished and native.all_exited():
            signals += self._end(signal.SIGTERM)
        exits = [self._record_exit(index) for index in exited]
        self._pending_signals += signals
        if self._pending_signals:
            return Event("signal", exits, signum=self._pending_signals.pop(0))
        if exits:
            return Event("exited", exits)
        if ready:
            return Event("fd", exits, fd=ready[0])
        return Event("timeout", exits)

    def stop(self, first_signal: int = signal.SIGTERM) -> list[WorkerExit]:
        """``first_signal`` to every worker's process group, up to ``shutdown_timeout`` s for them
        to exit (a SIGINT arriving meanwhile ends the wait at once), then SIGKILL, reap, flush.
        Returns every worker's exit, by local rank."""
        self._pending_signals += self._end(first_signal)
        return [self.exits[worker.local_rank] for worker in self.workers if worker.local_rank in self.exits]

    def _end(self, first_signal: int) -> list[int]:
        native = self._started()
        if native.finished:
            return []
        try:
            signals = native.stop(int(first_signal), self.shutdown_timeout)
        finally:
            native.close()
        for index in range(native.count()):
            self._record_exit(index)
        return signals

    def _record_exit(self, index: int) -> WorkerExit:
        worker = self.workers[index]
        pid, exitcode, signum, core_dumped, started_at, ended_at = self._native.exit_status(index)
        if ended_at is None:  # did not die even of SIGKILL (stuck in the kernel): the guardian has it
            ended_at = time.time()
        recorded = self.exits.get(worker.local_rank)
        tail = self._native.stderr_tail(index)
        if recorded is None:
            recorded = self.exits[worker.local_rank] = WorkerExit(
                worker.local_rank, worker.global_rank, pid, exitcode, signum, core_dumped, started_at, ended_at, tail
            )
        else:
            recorded.stderr_tail = tail
        return recorded

    def pids(self) -> dict[int, int]:
        """The workers' pids by local rank."""
        native = self._started()
        return {self.workers[index].local_rank: native.pid(index) for index in range(native.count())}

    def _started(self) -> Supervisor:
        if self._native is None:
            raise RuntimeError("the group was not started")
        return self._native


def _programs(program: str, env: dict[str, str]) -> list[bytes]:
    """The paths to try for ``program``, as execvp would with the worker's PATH."""
    if "/" in program:
        return [os.fsencode(program)]
    return [os.fsencode(os.path.join(directory or ".", program)) for directory in os.get_exec_path(env)]
