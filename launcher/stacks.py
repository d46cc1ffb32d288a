"""Where a hung worker was: its Python stack, every thread, captured just before the launcher kills it.

Nothing is needed in the workers' environment and the script is unmodified:

* :class:`StackDumps` writes a ``sitecustomize.py`` into a directory of its
  own and prepends that directory to each worker's ``PYTHONPATH``. In a
  Python worker it registers ``faulthandler`` for ``STACK_SIGNAL`` (a
  real-time signal), every thread, into ``<directory>/<pid>.stack``. Then it
  gives the worker back the environment it would have had (its own
  ``PYTHONPATH``, no ``DUMP_DIRECTORY_ENV``, so the worker's children are
  not armed) and imports the ``sitecustomize`` further down the path, if
  there is one: nothing of the user's is shadowed. The file is written out
  at run time, so the single binary arms its workers in the same way.
* :func:`capture_stacks` signals the workers whose handler is in place (the
  dump file exists and ``/proc/<pid>/status`` shows the signal caught: a
  process without the handler would die of it) and waits until each dump is
  complete: written, the signal no longer pending, and no thread still in
  the handler (it blocks the signal while it runs). A Python started with
  ``-I``, ``-S`` or ``-E``, a program that is not Python, a worker whose
  handler cannot run (stopped, frozen, stuck in the kernel): its report says
  why there is no Python stack and gives its state, ``wchan`` and kernel
  stack from /proc (the kernel stack needs root).
* Capturing is bounded: ``CAPTURE_SECONDS`` for every worker of one call together.
* The directory (in ``$TMPDIR/launcher_stacks-<uid>``) goes with ``close()``;
  one whose launcher was killed (SIGKILL) goes with the next ``StackDumps`` of
  the same user and ``$TMPDIR``: each launcher holds a lock on its directory's
  owner file while it runs.
"""
from __future__ import annotations

import fcntl
import marshal
import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from importlib._bootstrap_external import MAGIC_NUMBER, cache_from_source  # importlib.util's, without its imports

__all__ = ["CAPTURE_SECONDS", "STACK_SIGNAL", "StackDumps", "capture_stacks", "process_state"]

STACK_SIGNAL = signal.SIGRTMAX - 3  # real-time: no library of the workers' claims it
CAPTURE_SECONDS = 2.0
DUMP_DIRECTORY_ENV = "LAUNCHER_STACK_DUMP_DIR"
_DIRECTORY_PREFIX = "launcher_stacks_"
_OWNER_LOCK = ".owner"  # flocked by the launcher that made the directory, while it runs
_POLL_SECONDS = 0.005  # how often a dump in progress is looked at, within CAPTURE_SECONDS

# The workers' sitecustomize: plain Python 3 of any version, run before the worker's own code.
_SITECUSTOMIZE = """\
# Written by the launcher (launcher/stacks.py): lets the launcher ask this
# worker for its Python stack before it ends the worker, then runs the
# sitecustomize this file shadows, if there is one.
import os
import sys


def _launcher_arm_stack_dump():
    here = os.path.dirname(os.path.abspath(__file__))
    directory = os.environ.pop("{env}", None)
    path = os.environ.get("PYTHONPATH", "")
    if path == here:
        del os.environ["PYTHONPATH"]
    elif path.startswith(here + os.pathsep):
        os.environ["PYTHONPATH"] = path[len(here) + 1:]
    sys.path[:] = [entry for entry in sys.path if entry != here]
    if directory is None:
        return
    try:
        import faulthandler

        path = os.path.join(directory, "%d.stack" % os.getpid())
        dump = open(path + ".arming", "w")
        faulthandler.register({signum}, file=dump, all_threads=True, chain=False)
        os.rename(path + ".arming", path)  # the file is there only once the handler is
    except Exception:
        pass  # the launcher then reports the worker's kernel state instead


_launcher_arm_stack_dump()
del _launcher_arm_stack_dump
_launcher_sitecustomize = sys.modules.pop("sitecustomize")
try:
    import sitecustomize  # noqa: F401  the one further down sys.path, which then stands for this one
except ImportError as error:
    sys.modules["sitecustomize"] = _launcher_sitecustomize  # the import of this one ends by taking it back
    if error.name != "sitecustomize":
        raise
"""


class StackDumps:
    """The launcher-owned directory that arms Python workers for :func:`capture_stacks` (and holds the timer's
    FIFO); ``close()`` removes it, as the next launcher does should this one be killed."""

    def __init__(self):
        parent = _users_directory()
        if parent is not None:
            _remove_abandoned(parent)
        try:
            self.directory = tempfile.mkdtemp(prefix=_DIRECTORY_PREFIX, dir=parent)
        except FileNotFoundError:  # a cleaner of $TMPDIR removed the user's directory meanwhile
            self.directory = tempfile.mkdtemp(prefix=_DIRECTORY_PREFIX)
        self._owner_fd = -1
        try:
            self._owner_fd = _hold_owner_lock(self.directory)
            _write_module(os.path.join(self.directory, "sitecustomize.py"),
                          _SITECUSTOMIZE.replace("{env}", DUMP_DIRECTORY_ENV).replace("{signum}", str(STACK_SIGNAL)))
        except BaseException:
            self.close()
            raise

    def arm(self, env: dict[str, str]) -> None:
        """Make a worker started with ``env`` arm itself (when it is Python and reads its environment)."""
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = self.directory + (os.pathsep + path if path else "")
        env[DUMP_DIRECTORY_ENV] = self.directory

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        if self._owner_fd >= 0:  # only now: no sweep may take the directory of a launcher still running
            os.close(self._owner_fd)
            self._owner_fd = -1


def _write_module(path: str, source: str) -> None:
    """Write a module and its bytecode for this launcher's Python (PEP 552's timestamp-based .pyc), which a
    worker on the same Python loads instead of compiling the module at every start (as it would where
    ``PYTHONDONTWRITEBYTECODE`` is set, as in many container images: 1.2 ms of each worker's start-up). A
    worker on another Python looks for its own cache tag's file, finds none, and compiles the source."""
    with open(path, "w") as out:
        out.write(source)
    written = os.stat(path)
    if sys.implementation.cache_tag is None:  # a Python that does not cache bytecode
        return
    code = compile(source, path, "exec", dont_inherit=True, optimize=0)
    fields = (0, int(written.st_mtime), written.st_size)  # flags (0: checked by timestamp), the source's mtime, size
    header = MAGIC_NUMBER + b"".join((field & 0xFFFFFFFF).to_bytes(4, "little") for field in fields)
    cache = cache_from_source(path, optimization="")
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache, "wb") as out:
        out.write(header + marshal.dumps(code))


def _hold_owner_lock(directory: str) -> int:
    """Lock the directory's owner file for as long as this launcher runs (the kernel drops the lock when the
    process ends, however it ends); returns its descriptor. The file appears only once locked."""
    path = os.path.join(directory, _OWNER_LOCK)
    fd = os.open(path + ".new", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(path + ".new", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _users_directory() -> str | None:
    """``$TMPDIR/launcher_stacks-<uid>``, where this user's launchers make their directories (so that finding
    abandoned ones reads only those, not all of $TMPDIR); None when it is not this user's alone."""
    path = os.path.join(tempfile.gettempdir(), f"launcher_stacks-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        made = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(made.st_mode) or made.st_uid != os.getuid() or made.st_mode & 0o077:
        return None
    return path


def _remove_abandoned(parent: str) -> None:
    """Remove the stack-dump directories in ``parent`` whose launcher ended without removing its own
    (SIGKILL): their owner lock is free. One without an owner file is being made."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(_DIRECTORY_PREFIX):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            fd = os.open(os.path.join(entry.path, _OWNER_LOCK), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: its launcher runs, or another sweep has it
            shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            pass
        finally:
            os.close(fd)


def capture_stacks(
    pids: list[int], dump_directory: str | None = None, budget: float = CAPTURE_SECONDS
) -> dict[int, str]:
    """Where each process is, by pid: its Python stack (every thread) when it was armed from ``dump_directory``
    and its handler ran within ``budget`` seconds (for all of them together), else why not and its kernel view.
    Never raises for a process that is gone or unreadable: this runs while a failure is being handled."""
    deadline = time.monotonic() + budget
    waiting: dict[int, _Dump] = {}
    missing: dict[int, str] = {}
    for pid in pids:
        path = os.path.join(dump_directory, f"{pid}.stack") if dump_directory else None
        if _gone(process_state(pid)):
            missing[pid] = "no Python stack: the worker had ended"
            continue
        if path is None or not os.path.exists(path) or not _catches(pid, STACK_SIGNAL):
            missing[pid] = "no Python stack: the worker did not arm the launcher's stack dump (not Python, or " \
                           "a Python that ignores the environment: -I, -S, -E)"
            continue
        dump = _Dump(path, os.path.getsize(path), _threads_blocking(pid, STACK_SIGNAL))
        try:
            os.kill(pid, STACK_SIGNAL)
        except ProcessLookupError:
            missing[pid] = "no Python stack: the worker ended before it was asked for one"
            continue
        waiting[pid] = dump
    stacks = {}
    while waiting:
        for pid, dump in list(waiting.items()):
            if dump.complete(pid):
                stacks[pid] = dump.text()
                del waiting[pid]
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(_POLL_SECONDS)
    for pid, dump in waiting.items():
        partial = dump.text()
        missing[pid] = f"no complete Python stack within {budget:g} s (its signal handler could not run: stopped, " \
                       "frozen or stuck in the kernel)" + (f"; what it wrote:\n{partial}" if partial else "")
    for pid, why in missing.items():
        stacks[pid] = f"{why}\n{_kernel_view(pid)}"
    for pid in stacks:
        if pid not in missing:
            stacks[pid] += f"\n{_kernel_view(pid, with_stack=False)}"
    return {pid: stacks[pid] for pid in pids}


class _Dump:
    """One requested faulthandler dump: its file, where it starts, and the threads that blocked the signal before."""

    def __init__(self, path: str, offset: int, blocking_before: set[str]):
        self.path = path
        self.offset = offset
        self.blocking_before = blocking_before

    def complete(self, pid: int) -> bool:
        """Written, no longer pending, and no handler still running (it blocks the signal in its thread)."""
        if _gone(process_state(pid)):
            return True  # what it wrote is all there will be
        if os.path.getsize(self.path) <= self.offset:
            return False
        if _signal_in(_status_field(f"/proc/{pid}/status", "ShdPnd"), STACK_SIGNAL):
            return False
        return not (_threads_blocking(pid, STACK_SIGNAL) - self.blocking_before)

    def text(self) -> str:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read().decode("utf-8", "replace").rstrip("\n")


def process_state(pid: int) -> str | None:
    """``D (disk sleep)``, ``S (sleeping)``...: the State of /proc/<pid>/status; None once the process is gone."""
    return _status_field(f"/proc/{pid}/status", "State")


def _gone(state: str | None) -> bool:
    return state is None or state[:1] in ("Z", "X")


def _kernel_view(pid: int, with_stack: bool = True) -> str:
    """The process's state and wchan, and its main thread's kernel stack (root only)."""
    state = process_state(pid)
    if _gone(state):
        return "state: ended"
    wchan = (_read(f"/proc/{pid}/wchan") or "").strip()
    lines = [f"state: {state}, wchan: {wchan if wchan not in ('', '0') else '-'}"]
    if with_stack:
        try:
            with open(f"/proc/{pid}/stack") as f:
                frames = f.read().rstrip("\n")
            lines.append("kernel stack:\n" + (frames or "<empty: running in user space>"))
        except PermissionError:
            lines.append("kernel stack: <needs root>")
        except OSError as error:
            lines.append(f"kernel stack: <{error.strerror}>")
    return "\n".join(lines)


def _catches(pid: int, signum: int) -> bool:
    return _signal_in(_status_field(f"/proc/{pid}/status", "SigCgt"), signum)


def _threads_blocking(pid: int, signum: int) -> set[str]:
    """The ids of the process's threads that have ``signum`` blocked."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return set()
    return {tid for tid in tasks if _signal_in(_status_field(f"/proc/{pid}/task/{tid}/status", "SigBlk"), signum)}


def _signal_in(mask: str | None, signum: int) -> bool:
    """Whether the hexadecimal signal mask /proc shows holds ``signum``."""
    return mask is not None and bool(int(mask, 16) >> (signum - 1) & 1)


def _status_field(path: str, name: str) -> str | None:
    text = _read(path)
    if text is None:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # the process is gone, or the file is not ours to read
        return None
