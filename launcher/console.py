"""A launch from the command line: its log lines, its one-line errors and its exit status.

Exit status: 0 done; 1 failed (workers, the rendezvous, or what the system
refused: a program that cannot be executed, a directory that cannot be made,
in one line); 2 a bad flag or value, as ``<prog>: error: <what> (see <prog>
--help)``; 128+N ended by signal N. The launcher's own log lines are
glog-like on stderr, at ``$LOGLEVEL``. A launch that failed, not a bad flag,
leaves its root cause in ``$TORCHELASTIC_ERROR_FILE`` when that is set
(launcher.errors).
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
from argparse import Namespace
from collections.abc import Callable

from launcher.cli import UsageError
from launcher.errors import ChildFailedError, HostsError, SignalException, record_launch_failure
from launcher.rendezvous import RendezvousError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

log = logging.getLogger("launcher")


class GlogFormatter(logging.Formatter):
    """``W1121 11:39:49.123 <pid> launcher] message``."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%m%d %H:%M:%S")
        level = record.levelname[0]
        line = f"{level}{stamp}.{int(record.msecs):03d} {record.process} {record.name}] {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging() -> None:
    """The launcher's log lines, glog-like on stderr, at ``$LOGLEVEL`` (default WARNING, as torchrun)."""
    level = os.environ.get("LOGLEVEL", "WARNING").upper()
    if not isinstance(logging.getLevelName(level), int):
        raise UsageError(f"LOGLEVEL: expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(GlogFormatter())
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def open_standard_descriptors() -> None:
    """Give /dev/null to stdin, stdout or stderr if the launcher was started with it closed (``>&-``), as
    daemons do: else the next descriptor the launcher opens (a signalfd, a socket to the store, a log
    file) takes its number, and the workers' output and the launcher's lines are written into that."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd, as the lower ones are open
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            os.set_inheritable(fd, True)  # as a standard descriptor is: the workers get it too


def _usage_error(prog: str, error: ValueError) -> NoReturn:
    print(f"{prog}: error: {' '.join(str(error).split())} (see {prog} --help)", file=sys.stderr)
    sys.exit(2)


def console_main(
    prog: str, parse: Callable[[list[str]], Namespace], prepare: Callable[[Namespace], Callable[[], None]]
) -> NoReturn:
    """Parse ``sys.argv`` with ``parse``, ``prepare`` the launch, launch, and exit with the launch's status."""
    open_standard_descriptors()
    try:
        setup_logging()
        launch = prepare(parse(sys.argv[1:]))
    except ValueError as error:
        _usage_error(prog, error)
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGINT)
    try:
        launch()
    except ValueError as error:  # a value only the launch could check, such as the rendezvous' parameters
        _usage_error(prog, error)
    except Exception as error:
        # torchrun's main is wrapped in @record: whoever launched us reads the root cause there
        record_launch_failure(error)
        _failed(prog, error)
    sys.exit(0)


def exit_now(done: SystemExit) -> NoReturn:
    """End the program as ``done`` asks, as Python's own exit would, less its teardown.

    Python's exit runs the atexit functions, flushes the standard streams
    (a stream that cannot be flushed makes the status 120), then frees every
    module and object one by one: some 10 ms after a launch, which nothing
    needs (the workers, threads and files are ended by then, the kernel
    closes the rest). This does the first two and exits.
    """
    if done.code is None or isinstance(done.code, int):
        status = done.code or 0
    else:  # sys.exit("message")
        print(done.code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started with that descriptor closed (`>&-`): Python made no stream for it
            continue
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe, a closed stream
            status = 120
    os._exit(status)


def _failed(prog: str, error: Exception) -> NoReturn:
    if isinstance(error, ChildFailedError):
        print(error, file=sys.stderr)
        sys.exit(1)
    if isinstance(error, (RendezvousError, HostsError)):  # one line saying what and where: no traceback to add
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(1)
    if isinstance(error, SignalException):
        sys.exit(128 + int(error.sigval))
    if isinstance(error, OSError):  # what the system refused (a program, a directory), named in the message
        log.debug("the launch failed", exc_info=error)
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(1)
    raise error
