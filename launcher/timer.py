"""torch's file timer, served by the agent: ``torch.distributed.elastic.timer.FileTimerClient`` works unchanged.

With ``TORCHELASTIC_ENABLE_FILE_TIMER=1`` the agent serves a FIFO at
``TORCHELASTIC_TIMER_FILE`` (else at a fresh path, torch's
``watchdog_timer_<uuid>``, in the launcher's own directory, which the next
launcher removes should this one be killed), which every worker finds in
``TORCHELASTIC_TIMER_FILE``. torch 2.13's client writes one JSON request a
line (``FileTimerRequest.to_json``)::

    {"version": 1, "pid": <worker pid>, "scope_id": "<scope>", "expiration_time": <epoch seconds>, "signal": <n>}

A negative ``expiration_time`` releases the worker's timer of that scope; any
other value sets it (a worker holds one timer per scope, as many scopes as it
likes). A timer expires at its ``expiration_time`` (the wall clock, as the
client computed it); the agent then sends its ``signal`` to the worker, or,
for a signal <= 0, ends nothing and says so (torch's rule).

Unlike torch's server this one has no thread: the agent's event loop watches
:meth:`FileTimerServer.fileno` and wakes at :meth:`FileTimerServer.next_deadline`.
It never blocks the agent: the FIFO is read without blocking, at most
``READ_PER_TURN`` bytes a turn (a flood cannot starve the loop). When the
last writer has closed, the server reads the end of file (a line its writer
left unfinished is dropped, as torch's server drops it) and opens the FIFO
afresh under the same descriptor, which the kernel then keeps from reporting
a hang-up until another writer has come and gone: no wake-up loop. A line
that is not torch's request, and a request from a pid that is not one of
this node's workers, gets one log line and is dropped; serving goes on.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import stat
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from launcher.config import random_uuid

__all__ = ["ENABLE_FILE_TIMER_ENV", "TIMER_FILE_ENV", "FileTimerServer", "Timer"]

log = logging.getLogger("launcher")

ENABLE_FILE_TIMER_ENV = "TORCHELASTIC_ENABLE_FILE_TIMER"
TIMER_FILE_ENV = "TORCHELASTIC_TIMER_FILE"
READ_PER_TURN = 1 << 18
LINE_MAX = 1 << 16  # torch's client refuses requests over PIPE_BUF (4096 bytes): anything longer is not its
BAD_LINES_LOGGED_PER_TURN = 10
_SHOWN_OF_A_BAD_LINE = 200  # characters


@dataclass
class Timer:
    """One worker's countdown for one scope."""

    pid: int
    scope: str
    deadline: float  # seconds since the epoch
    signal: int  # what to send the worker when it expires; <= 0: nothing


class FileTimerServer:
    """The FIFO and the timers its requests set; ``close()`` removes the FIFO when this server made it."""

    @classmethod
    def from_environment(cls, environ: Mapping[str, str], directory: str) -> FileTimerServer | None:
        """The server torchrun would start for this environment (``TORCHELASTIC_ENABLE_FILE_TIMER`` is ``1``);
        without ``TORCHELASTIC_TIMER_FILE`` its FIFO is made in ``directory``."""
        if environ.get(ENABLE_FILE_TIMER_ENV) != "1":
            return None
        return cls(environ.get(TIMER_FILE_ENV) or os.path.join(directory, f"watchdog_timer_{random_uuid()}"))

    def __init__(self, path: str):
        self.path = path
        self.created = False
        self._timers: dict[tuple[int, str], Timer] = {}
        self._partial = b""
        self._skipping = False  # the rest of an overlong line is dropped up to its newline
        self._fd = -1
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        try:
            existing = os.stat(self.path)
        except FileNotFoundError:
            try:
                os.mkfifo(self.path, 0o600)
            except OSError as error:
                raise ValueError(f"{TIMER_FILE_ENV}: cannot create the FIFO {self.path}: {error.strerror}") from None
            self.created = True
        else:
            if not stat.S_ISFIFO(existing.st_mode):
                raise ValueError(f"{TIMER_FILE_ENV}: {self.path} exists and is not a FIFO")
        self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._fd

    def serve(self, workers: Collection[int]) -> None:
        """Apply the requests waiting in the FIFO (up to ``READ_PER_TURN`` bytes); ``workers``: the pids that
        may hold timers now. Timers of pids no longer among them are dropped."""
        bad: list[str] = []
        for line in self._lines():
            request = _parse(line)
            if isinstance(request, str):
                bad.append(f"{request}: {_shown(line)}")
            elif request.pid not in workers:
                bad.append(f"from pid {request.pid}, which is not one of this node's workers: {_shown(line)}")
            elif request.deadline < 0:
                self._timers.pop((request.pid, request.scope), None)
            else:
                self._timers[(request.pid, request.scope)] = request
        for problem in bad[:BAD_LINES_LOGGED_PER_TURN]:
            log.warning("timer request ignored, %s", problem)
        if len(bad) > BAD_LINES_LOGGED_PER_TURN:
            log.warning("%d more timer requests ignored", len(bad) - BAD_LINES_LOGGED_PER_TURN)
        for key in [key for key in self._timers if key[0] not in workers]:
            del self._timers[key]

    def _lines(self) -> list[bytes]:
        """The whole lines read this turn; a partial one waits for its end."""
        data = bytearray()
        writers_gone = False
        while len(data) < READ_PER_TURN:
            try:
                chunk = os.read(self._fd, READ_PER_TURN - len(data))
            except BlockingIOError:
                break
            if not chunk:
                writers_gone = True
                break
            data += chunk
        if self._skipping:
            end = data.find(b"\n")
            if end < 0:
                data.clear()  # all of it is the rest of the overlong line
            else:
                del data[: end + 1]
                self._skipping = False
        lines = (self._partial + data).split(b"\n")
        self._partial = bytes(lines.pop())
        if len(self._partial) > LINE_MAX:
            log.warning("timer request ignored, a line of over %d bytes: %s", LINE_MAX, _shown(self._partial))
            self._partial = b""
            self._skipping = True
        if writers_gone:
            self._skipping = False
            if self._partial:
                log.warning("timer request ignored, its writer closed mid-line: %s", _shown(self._partial))
                self._partial = b""
            self._reopen()
        return lines

    def _reopen(self) -> None:
        """A fresh open of the FIFO under the same descriptor: no hang-up reported until the next writer left."""
        fresh = os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.dup2(fresh, self._fd, inheritable=False)
        finally:
            os.close(fresh)

    def expired(self, now: float) -> list[Timer]:
        """Remove and return the timers whose deadline is ``now`` or earlier, earliest first."""
        due = sorted((timer for timer in self._timers.values() if timer.deadline <= now), key=lambda t: t.deadline)
        for timer in due:
            del self._timers[(timer.pid, timer.scope)]
        return due

    def next_deadline(self) -> float | None:
        return min((timer.deadline for timer in self._timers.values()), default=None)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.created:
            self.created = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def _parse(line: bytes) -> Timer | str:
    """torch's request as a Timer (a release has a negative deadline), else what is wrong with the line."""
    try:
        request = json.loads(line)
    except ValueError:  # JSON, or UTF-8
        return "not JSON"
    if not isinstance(request, dict):
        return "not a JSON object"
    pid, scope, deadline, signum = (request.get(key) for key in ("pid", "scope_id", "expiration_time", "signal"))
    if not _is_int(pid) or pid <= 0:
        return "no positive integer 'pid'"
    if not isinstance(scope, str):
        return "no string 'scope_id'"
    if not (_is_int(deadline) or isinstance(deadline, float)) or not math.isfinite(deadline):
        return "no finite number 'expiration_time'"
    if not _is_int(signum) or signum >= signal.NSIG:
        return f"no integer 'signal' below {signal.NSIG}"
    return Timer(pid, scope, float(deadline), signum)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(line: bytes) -> str:
    text = repr(bytes(line[:_SHOWN_OF_A_BAD_LINE]))
    return text + ("..." if len(line) > _SHOWN_OF_A_BAD_LINE else "")
