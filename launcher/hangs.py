"""Hangs, watched in the agent's event loop: torch's file timer and the uninterruptible-sleep limit.

A distributed job rarely dies cleanly: a rank blocks for ever in a
collective. :class:`HangWatch` finds such a rank in two ways torch 2.13's
agent knows, and ends it through the worker group, which captures its stack
first (``WorkerGroup.end_hung``, ``launcher.stacks``):

* torch's file timer (``launcher.timer``): a worker's ``expires(after=...)``
  ran out. Its signal goes to that worker (torchrun's watchdog then kills the
  agent itself; here the worker's end is a failure like any other: the group
  is torn down and restarted while ``--max-restarts`` allows).
* ``TORCHELASTIC_UNINTERRUPTIBLE_STATE_TIMEOUT`` (seconds, read as torch
  reads it: unset, unparsable or <= 0 is off): a worker in uninterruptible
  sleep (state D in /proc/<pid>/stat) that long is sent SIGKILL and the
  group fails without a restart, as torchrun does (the stuck worker may
  still hold its devices). The state is read every tenth of the limit
  (between ``D_STATE_CHECK_MIN`` and ``D_STATE_CHECK_MAX`` seconds), only
  while the variable is set.

Nothing polls otherwise: the loop wakes when a timer request arrives, at the
earliest timer deadline, and at the next state check.
"""
from __future__ import annotations

import enum
import logging
import math
import os
import signal
import time
from collections.abc import Mapping

from launcher.errors import signal_name
from launcher.stacks import StackDumps, process_state
from launcher.supervisor import WorkerGroup
from launcher.timer import TIMER_FILE_ENV, FileTimerServer

__all__ = ["Ending", "HangWatch", "UNINTERRUPTIBLE_STATE_TIMEOUT_ENV", "uninterruptible_state_timeout"]

log = logging.getLogger("launcher")

UNINTERRUPTIBLE_STATE_TIMEOUT_ENV = "TORCHELASTIC_UNINTERRUPTIBLE_STATE_TIMEOUT"
D_STATE_CHECK_MIN = 0.1
D_STATE_CHECK_MAX = 10.0


class Ending(enum.Enum):
    """Why the watch ended workers, the most severe first."""

    UNINTERRUPTIBLE = "uninterruptible"  # stuck in the kernel: no restart
    TIMER_EXPIRED = "timer_expired"


def uninterruptible_state_timeout(environ: Mapping[str, str]) -> float:
    """``TORCHELASTIC_UNINTERRUPTIBLE_STATE_TIMEOUT`` as torch 2.13 reads it; 0 when the check is off."""
    raw = environ.get(UNINTERRUPTIBLE_STATE_TIMEOUT_ENV, "")
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        log.warning("%s=%r is not a number: the uninterruptible-sleep check is off (as torchrun)",
                    UNINTERRUPTIBLE_STATE_TIMEOUT_ENV, raw)
        return 0.0
    return value if value > 0 and math.isfinite(value) else 0.0


class HangWatch:
    """The hang checks of one agent run, over each attempt's worker group; ``close()`` releases the FIFO."""

    def __init__(self, role: str, environ: Mapping[str, str] = os.environ):
        self.role = role
        self.d_state_limit = uninterruptible_state_timeout(environ)
        self._d_state_every = min(max(self.d_state_limit / 10, D_STATE_CHECK_MIN), D_STATE_CHECK_MAX)
        self._next_d_state_check = 0.0
        self._in_d_state_since: dict[int, float] = {}  # pid -> monotonic time it was first seen in D
        self.stack_dumps = StackDumps()
        try:
            self.timers = FileTimerServer.from_environment(environ, self.stack_dumps.directory)
        except BaseException:
            self.stack_dumps.close()
            raise

    def arm(self, env: dict[str, str]) -> None:
        """What a worker's environment needs: the timer FIFO's path, and the stack dump's arming."""
        self.stack_dumps.arm(env)
        if self.timers is not None:
            env[TIMER_FILE_ENV] = self.timers.path

    def watch_fds(self) -> list[int]:
        return [self.timers.fileno()] if self.timers is not None else []

    def timeout(self) -> float | None:
        """Seconds until the next check is due; None: nothing to check until a request arrives."""
        waits = []
        deadline = self.timers.next_deadline() if self.timers is not None else None
        if deadline is not None:
            waits.append(deadline - time.time())
        if self.d_state_limit:
            waits.append(self._next_d_state_check - time.monotonic())
        return max(0.0, min(waits)) if waits else None

    def check(self, group: WorkerGroup) -> Ending | None:
        """Serve the timer requests, then end the workers whose timer expired or that stayed in D state too long."""
        pids = group.pids()
        ranks = {worker.local_rank: worker.global_rank for worker in group.workers}
        running = {pid: local_rank for local_rank, pid in pids.items() if local_rank not in group.exits}
        hung: dict[int, tuple[str, int]] = {}
        endings = set()
        if self.timers is not None:
            self.timers.serve(running)
            now = time.time()
            for timer in self.timers.expired(now):
                local_rank = running[timer.pid]
                if local_rank in hung:
                    continue  # its earliest timer with a signal ends it (torch's rule)
                overdue = f"timer of scope {timer.scope!r} expired {now - timer.deadline:.2f} s ago"
                if timer.signal <= 0:
                    log.warning("[%s] rank %d (pid %d): %s; its signal is %d: not ending it (as torchrun)",
                                self.role, ranks[local_rank], timer.pid, overdue, timer.signal)
                    continue
                hung[local_rank] = (f"{overdue}: {signal_name(timer.signal)}", timer.signal)
                endings.add(Ending.TIMER_EXPIRED)
        if self.d_state_limit and time.monotonic() >= self._next_d_state_check:
            for local_rank, why in self._stuck_in_d_state(running).items():
                hung[local_rank] = (why, signal.SIGKILL)
                endings.add(Ending.UNINTERRUPTIBLE)
        if not hung:
            return None
        for local_rank, (why, _) in hung.items():
            log.error("[%s] rank %d (pid %d): %s; capturing its stack first",
                      self.role, ranks[local_rank], pids[local_rank], why)
        group.end_hung(hung)
        return min(endings, key=list(Ending).index)

    def _stuck_in_d_state(self, running: dict[int, int]) -> dict[int, str]:
        """Why each worker over the limit is stuck, by local rank; keeps when the others entered D state."""
        now = time.monotonic()
        self._next_d_state_check = now + self._d_state_every
        for pid in [pid for pid in self._in_d_state_since if pid not in running]:
            del self._in_d_state_since[pid]
        stuck = {}
        for pid, local_rank in running.items():
            state = process_state(pid)
            if state is None or not state.startswith("D"):
                self._in_d_state_since.pop(pid, None)
                continue
            if pid not in self._in_d_state_since:
                self._in_d_state_since[pid] = now
                log.info("[%s] worker pid %d entered uninterruptible sleep (D state); it fails the group if it "
                         "stays there %g s", self.role, pid, self.d_state_limit)
            since = self._in_d_state_since[pid]
            if now - since >= self.d_state_limit:
                stuck[local_rank] = (
                    f"uninterruptible sleep (D state) for {now - since:.1f} s, over "
                    f"{UNINTERRUPTIBLE_STATE_TIMEOUT_ENV}={self.d_state_limit:g}: SIGKILL"
                )
        return stuck

    def close(self) -> None:
        if self.timers is not None:
            self.timers.close()
        self.stack_dumps.close()
