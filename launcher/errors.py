"""Worker failure reports: torch's error-file format, ``record``, and the failure summary.

A worker decorated with ``@record`` (torch's or ours) writes its uncaught
exception to ``TORCHELASTIC_ERROR_FILE`` as JSON. torch 2.13 writes two shapes:

``record`` in the worker::

    {"message": {"message": "<ExcType>: <msg>",
                 "extraInfo": {"py_callstack": "<traceback>", "timestamp": "<int epoch seconds>"}}}

``record`` in a launcher whose child failed (``ErrorHandler.dump_error_file``)
copies the child's file and adds ``"errorCode": <exit code>`` next to the
inner ``"message"``. torch's reader also accepts a plain-string message,
``{"message": "<text>", "timestamp": <epoch seconds>}``, which other tools write.

The launcher reads these with :func:`read_error_file` and reports every failed
worker with :func:`format_summary` (text shaped like torchrun's, root cause
first) and :func:`summary_json`. A failed launch leaves its root cause in the
launcher's own ``TORCHELASTIC_ERROR_FILE`` (:func:`record_launch_failure`), as
torchrun's ``@record``-wrapped ``main`` does, and more: a record built from the
worker's end when it wrote no file. This module never imports torch.
"""
from __future__ import annotations

import dataclasses
import faulthandler
import functools
import json
import math
import os
import signal
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "ChildFailedError",
    "ERROR_FILE_ENV",
    "ErrorRecord",
    "Failure",
    "SignalException",
    "failure_error_data",
    "format_summary",
    "read_error_file",
    "record",
    "record_launch_failure",
    "signal_name",
    "summary_json",
    "torchrun_exitcode",
    "write_summary_json",
]

ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"
_NOT_AVAILABLE = "<N/A>"  # torchrun's marker for a missing error file
_RULER_MAX_WIDTH = 60  # torchrun's
_STILL_RUNNING = "<none: still running after SIGKILL, stuck in the kernel>"


def torchrun_exitcode(exitcode: int | None, signum: int | None) -> int | None:
    """A process's end as torchrun reports it: its exit code, or minus the signal number for a signal death."""
    return -signum if signum is not None else exitcode


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15; ``signal 40`` for a number without a name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass
class ErrorRecord:
    """What a worker's error file says.

    ``raw`` is the parsed JSON, or None when the file is not JSON; then
    ``message`` says why the file could not be read.
    """

    message: str
    traceback: str | None
    timestamp: float | None  # seconds since the epoch, as the worker wrote it
    raw: Any


def read_error_file(path: str) -> ErrorRecord | None:
    """Parse a torch error file; None when there is none.

    Never raises: a file that cannot be read or parsed gives a record whose
    message says so, because this runs while reporting another failure.
    """
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as fp:
            data = json.loads(fp.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        # ValueError covers JSONDecodeError and UnicodeDecodeError; an empty
        # file is what a worker killed while writing torch's record leaves.
        return ErrorRecord(f"unreadable error file ({type(e).__name__}: {e})", None, None, None)
    if not isinstance(data, dict) or "message" not in data:
        return ErrorRecord("error file has no 'message' field", None, None, data)
    message = data["message"]
    if isinstance(message, dict):
        extra = message.get("extraInfo")
        extra = extra if isinstance(extra, dict) else {}
        callstack = extra.get("py_callstack")
        return ErrorRecord(
            message=str(message.get("message", _NOT_AVAILABLE)),
            traceback=callstack if isinstance(callstack, str) and callstack.strip() else None,
            timestamp=_epoch_seconds(extra.get("timestamp")),
            raw=data,
        )
    return ErrorRecord(str(message), None, _epoch_seconds(data.get("timestamp")), data)


def _epoch_seconds(value: Any) -> float | None:
    """torch writes the timestamp as a string of whole seconds; others write a number."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) else None


def _write_json_atomically(path: str, data: Any) -> None:
    # A worker is often killed moments after it fails (the agent stops the
    # group): a rename means readers see the whole file or none.
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w") as fp:
            json.dump(data, fp)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def record(fn: Callable) -> Callable:
    """Write an uncaught exception of ``fn`` to ``TORCHELASTIC_ERROR_FILE``, like torch's ``@record``.

    Behaves as torch 2.13's: enables ``faulthandler`` so a fatal signal
    prints the Python stacks to stderr; an ``Exception`` is written (an
    existing file is overwritten) and re-raised; ``SystemExit(0)`` returns
    None and other ``SystemExit``/``BaseException`` pass through unrecorded;
    a :class:`ChildFailedError` copies the root cause's error file with its
    exit code as ``errorCode``. An unset or empty variable writes nothing.
    Unlike torch's, failing to write the file warns instead of replacing the
    user's exception.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            faulthandler.enable(all_threads=True)
        except Exception as e:  # e.g. stderr closed or without a file descriptor
            warnings.warn(f"Unable to enable fault handler. {type(e).__name__}: {e}", stacklevel=2)
        try:
            return fn(*args, **kwargs)
        except SystemExit as e:
            # A run_path entrypoint that calls sys.exit(0) would otherwise end its caller.
            if e.code == 0:
                return None
            raise
        except ChildFailedError as e:
            child = _child_error_data(e.failures[0])
            # Nothing to pass up when the child wrote no (readable) file.
            if child is not None:
                _write_error_file(_with_error_code(child, e.failures[0]))
            raise
        except Exception as e:
            _write_error_file(_exception_error_data(e))
            raise

    return wrapper


def record_launch_failure(error: Exception) -> None:
    """Leave a failed launch's root cause in ``TORCHELASTIC_ERROR_FILE``, for whoever launched the launcher.

    Workers failed (:class:`ChildFailedError`): the root cause's own error file
    with its exit code as ``errorCode``, as torchrun's ``@record`` copies it;
    when that worker wrote none (torchrun then writes nothing), a record built
    from its end. Any other error is the launcher's own (a rendezvous timeout,
    a lost store, a signal): recorded as torch's ``@record`` records an
    exception. Unset or empty: nothing is written.
    """
    if isinstance(error, ChildFailedError):
        root = error.failures[0]
        _write_error_file(_with_error_code(failure_error_data(root), root))
    else:
        _write_error_file(_exception_error_data(error))


def failure_error_data(failure: Failure) -> dict:
    """torch's error-file JSON for a failed worker: the one it wrote, else one built from its end.

    The built one says what the launcher saw: ``message`` names the rank,
    host, pid and the exit code or signal; ``py_callstack`` (what torch shows
    as the traceback) adds the last stderr lines; ``extraInfo`` also holds
    each of those as a field; ``errorCode`` is torchrun's exit code (minus the
    signal number for a signal).
    """
    child = _child_error_data(failure)
    if child is not None:
        return child
    how = f"exitcode {failure.exitcode}"
    if failure.signal is not None:
        how = f"signal {failure.signal} ({failure.signal_name}{', core dumped' if failure.core_dumped else ''})"
    message = (
        f"rank {failure.rank} (local_rank {failure.local_rank}, pid {failure.pid}) "
        f"on {failure.host} ended with {how} and wrote no error file"
    )
    tail = failure.stderr_tail or []
    stderr = [f"stderr (last {len(tail)} lines):", *tail] if tail else []
    return {
        "message": {
            "message": message,
            "extraInfo": {
                "py_callstack": "\n".join([message, *stderr]) + "\n",
                "timestamp": str(int(failure.ended_at)),
                "rank": failure.rank,
                "local_rank": failure.local_rank,
                "host": failure.host,
                "pid": failure.pid,
                "exitcode": failure.exitcode,
                "signal": failure.signal_name,
                "stderr_tail": failure.stderr_tail,
            },
            "errorCode": failure.torchrun_exitcode,
        }
    }


def _exception_error_data(e: BaseException) -> dict:
    """torch's ``ErrorHandler.record_exception`` record."""
    return {
        "message": {
            "message": f"{type(e).__name__}: {e}",
            "extraInfo": {
                "py_callstack": "".join(traceback.format_exception(e)),
                # whole seconds as a string: torch's reader does int() on it
                "timestamp": str(int(time.time())),
            },
        }
    }


def _child_error_data(failure: Failure) -> dict | None:
    """The worker's own error file as JSON, None when it wrote no readable one."""
    child = read_error_file(failure.error_file) if failure.error_file else None
    if child is None or not isinstance(child.raw, dict) or "message" not in child.raw:
        return None
    return child.raw


def _with_error_code(data: dict, failure: Failure) -> dict:
    """torch's ``dump_error_file``: the child cannot know its exit code when a signal killed it."""
    if failure.torchrun_exitcode and isinstance(data["message"], dict):
        data["message"]["errorCode"] = failure.torchrun_exitcode
    return data


def _write_error_file(data: dict) -> None:
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    try:
        _write_json_atomically(path, data)
    except OSError as e:
        warnings.warn(f"Unable to write error to file. {type(e).__name__}: {e}", stacklevel=3)


@dataclass
class Failure:
    """One worker that ended unsuccessfully, as the agent saw it."""

    rank: int  # global rank
    local_rank: int
    role: str
    host: str
    pid: int
    exitcode: int | None  # None when a signal ended it
    signal: int | None  # the signal number that ended it, else None
    core_dumped: bool
    ended_at: float  # seconds since the epoch
    error_file: str | None  # the worker's TORCHELASTIC_ERROR_FILE
    stderr_tail: list[str] | None  # its last stderr lines (the supervisor keeps 20); None when not captured
    # A worker the launcher ended because it hung (launcher.hangs, launcher.supervisor): why, and where it was
    # then (its Python threads, else its kernel state and stack; launcher.stacks).
    hang: str | None = None
    stack: str | None = None
    still_running: bool = False  # it outlived SIGKILL, stuck in the kernel: no exit code or signal yet

    def __post_init__(self):
        if self.still_running:
            if self.exitcode is not None or self.signal is not None:
                raise ValueError(
                    f"a worker still running has no exit code or signal, got exitcode={self.exitcode} "
                    f"signal={self.signal}"
                )
        elif (self.exitcode is None) == (self.signal is None):
            raise ValueError(
                f"a failure has an exit code or a signal, got exitcode={self.exitcode} signal={self.signal}"
            )

    @property
    def torchrun_exitcode(self) -> int | None:
        """The exit code as torchrun reports it; None while it runs (stuck past SIGKILL)."""
        return torchrun_exitcode(self.exitcode, self.signal)

    @property
    def signal_name(self) -> str | None:
        return signal_name(self.signal) if self.signal is not None else None


@dataclass
class _Report:
    """A failure with its error file read and the time it is ordered by."""

    failure: Failure
    error: ErrorRecord | None
    time: float


def _reports(failures: list[Failure]) -> list[_Report]:
    """Root cause first, then the others by time.

    A failure's time is its error file's timestamp, else its exit time.
    torch's timestamps are whole seconds, so failures are compared by the
    second first and by exit time within the same second.
    """
    if not failures:
        raise ValueError("no failures to report")
    reports = []
    for failure in failures:
        error = read_error_file(failure.error_file) if failure.error_file else None
        when = error.timestamp if error is not None and error.timestamp is not None else failure.ended_at
        reports.append(_Report(failure, error, when))
    reports.sort(key=lambda r: (math.floor(r.time), r.failure.ended_at, r.failure.rank))
    return reports


def _local_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%d_%H:%M:%S", time.localtime(seconds))


def _field(name: str, value: str) -> str:
    """``  name      : value``, later lines of ``value`` indented under the block."""
    first, *rest = value.rstrip("\n").split("\n")
    return "\n".join([f"  {name:<10}: {first}", *(f"    {line}".rstrip() for line in rest)])


def _format_failure(index: int, report: _Report) -> str:
    failure, error = report.failure, report.error
    lines = [
        f"[{index}]:",
        _field("time", _local_time(report.time)),
        _field("host", failure.host),
        _field("rank", f"{failure.rank} (local_rank: {failure.local_rank})"),
        _field("exitcode", f"{_STILL_RUNNING if failure.still_running else failure.torchrun_exitcode} "
                           f"(pid: {failure.pid})"),
    ]
    if failure.signal is not None:
        lines.append(_field("signal", failure.signal_name + (" (core dumped)" if failure.core_dumped else "")))
    if failure.hang is not None:
        lines.append(_field("hang", failure.hang))
    lines.append(_field("error_file", failure.error_file if error is not None else _NOT_AVAILABLE))
    if error is not None:
        lines.append(_field("traceback", error.traceback or error.message))
    # Without a traceback from the error file, stderr is the best account of what happened.
    if error is None or error.traceback is None:
        if failure.stderr_tail is None:
            lines.append(_field("stderr", "<not captured>"))
        elif not failure.stderr_tail:
            lines.append(_field("stderr", "<empty>"))
        else:
            tail = "\n".join(failure.stderr_tail)
            lines.append(_field("stderr", f"(last {len(failure.stderr_tail)} lines)\n{tail}"))
    if failure.stack is not None:
        lines.append(_field("stack", f"(before the launcher ended it)\n{failure.stack}"))
    return "\n".join(lines)


def format_summary(name: str, failures: list[Failure]) -> str:
    """torchrun's failure block with the root cause first and stderr where there is no traceback."""
    return _format_summary(name, _reports(failures))


def _format_summary(name: str, reports: list[_Report]) -> str:
    title = f"{name} FAILED"
    root = _format_failure(0, reports[0])
    others = [_format_failure(index, report) for index, report in enumerate(reports[1:], start=1)]
    width = min(max(len(line) for line in [title, *"\n".join([root, *others]).split("\n")]), _RULER_MAX_WIDTH)
    return "\n".join(
        [
            "=" * width,
            title,
            "-" * width,
            "Root Cause (first observed failure):",
            root,
            "-" * width,
            "Other Failures:",
            *(others or ["  <NO_OTHER_FAILURES>"]),
            "=" * width,
        ]
    )


def _report_json(report: _Report) -> dict:
    return {
        **dataclasses.asdict(report.failure),
        "time": report.time,
        "signal_name": report.failure.signal_name,
        "error": dataclasses.asdict(report.error) if report.error is not None else None,
    }


def summary_json(name: str, failures: list[Failure]) -> dict:
    """The summary as JSON-ready data: every :class:`Failure` field plus its time and parsed error file."""
    reports = _reports(failures)
    return {
        "name": name,
        "root_cause": _report_json(reports[0]),
        "other_failures": [_report_json(report) for report in reports[1:]],
    }


def write_summary_json(path: str, name: str, failures: list[Failure]) -> None:
    _write_json_atomically(path, summary_json(name, failures))


class ChildFailedError(Exception):
    """Workers failed; ``str()`` is the summary. torch's name, so users recognise it.

    ``failures`` is ordered root cause first.
    """

    def __init__(self, name: str, failures: list[Failure]):
        reports = _reports(failures)
        self.name = name
        self.failures = [report.failure for report in reports]
        self.summary = _format_summary(name, reports)
        super().__init__(self.summary)


class HostsError(Exception):
    """A multi-host launch (launcher.hosts) failed: a host could not be reached or prepared, or its launcher
    failed; one line."""


class SignalException(Exception):
    """The launcher received a signal it handles (``sigval``); torch's name and signature."""

    def __init__(self, msg: str, sigval: signal.Signals) -> None:
        super().__init__(msg)
        self.sigval = sigval
