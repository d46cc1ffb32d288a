"""Many machines from one command: ``--hosts`` and ``--hostfile`` start one launcher per host over ssh.

``launcher --hosts=gpu1:8,gpu2:4 [options] train.py args`` runs, through ``--ssh``
(default ``ssh``), in this working directory on every host::

    launcher --signals-from-stdin --nnodes=2 --nproc-per-node=<SLOTS or --nproc-per-node>
             --rdzv-backend=c10d --rdzv-endpoint=gpu1:<PORT> --rdzv-id=<ID> --rdzv-conf=...,is_host=<first?>
             [every other option given] train.py args

with the environment the workers need (``remote_environment``), every word
quoted for the remote shell. It goes in three steps:

1. Connect, every host at once (one log line each): a probe starts the
   launcher there with ``--free-port``; the first host's answer is the
   rendezvous port. ``python -m launcher`` runs the same interpreter path on
   every host, so it must be installed the same way everywhere. The single
   binary runs the same path when the host has it, else its copy in
   ``${XDG_CACHE_HOME:-~/.cache}/launcher/<hash of the binary>/launcher``,
   which it first copies there over the same ssh when missing.
2. Launch: one ssh per host. Their output reaches this console as whole
   lines, prefixed with the host when there are several.
3. Wait: a host whose launcher fails stops the others (exit 1); a handled
   signal is sent to every host (exit 128+signum).

A remote launcher must end with its connection, even when this launcher is
killed with ``kill -9``. Without a terminal sshd sends it nothing when the
connection drops, so each remote launcher reads its standard input, a pipe
from ssh: ``--signals-from-stdin`` takes each line as a signal to itself
(that is how signals are forwarded) and the end of the input as a hangup
(SIGHUP: the launcher stops its workers as for a terminal's hangup). The
input ends whenever this side goes: this launcher's exit or death closes the
pipe to ssh, ssh dies with it (its parent-death signal), and sshd closes the
remote pipe when the connection drops. A terminal (``ssh -tt``) would have
sshd send SIGHUP too, but it merges stdout and stderr, turns newlines into
CRLF, shows the workers a terminal (other buffering, progress bars) and
takes forwarded signals as keystrokes; ssh gets ``-T`` so that none is
allocated even when the ssh configuration asks for one.
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from launcher.config import NOTIFYING_SIGNALS, parse_signals, random_uuid
from launcher.errors import HostsError, SignalException, signal_name
from launcher.rendezvous.options import backend_config, host_ok, parse_rdzv_conf

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO

log = logging.getLogger("launcher")

# The options --hosts sets for every host (the nodes, the rendezvous, each node's address): not to be given.
SET_FOR_EVERY_HOST = (
    "nnodes", "node_rank", "rdzv_backend", "rdzv_endpoint", "standalone", "master_addr", "master_port", "local_addr",
)
# The options the remote launchers do not get as given: the local ones, and those given per host.
NOT_PASSED = ("hosts", "hostfile", "ssh", "export", "signals_from_stdin", "nproc_per_node", "rdzv_id", "rdzv_conf")
# Always exported (when set): what the workers' programs need to start.
RUNTIME_VARIABLES = ("PATH", "LD_LIBRARY_PATH")
DEFAULT_EXPORTS = ("NCCL_*", "PYTHON*", "TORCH*", "OMP_NUM_THREADS", "PET_*", "TORCHELASTIC_*")
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EXPORT_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\*?")
_CACHE = '"${XDG_CACHE_HOME:-$HOME/.cache}/launcher"'  # the remote shell's per-user cache of copied launchers


# The hosts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """A machine of the job: its name, as ssh reaches it, and its number of workers (None: --nproc-per-node)."""

    name: str  # a host name, an IPv4 address, or an IPv6 address in brackets
    slots: int | None = None

    @property
    def destination(self) -> str:
        """The name for ssh, which takes an IPv6 address without brackets."""
        return self.name.strip("[]")


def parse_hosts(spec: str) -> list[Host]:
    """``--hosts``: ``HOST[:SLOTS],...`` (``[IPv6][:SLOTS]``); ValueError saying what is wrong."""
    hosts = []
    for item in spec.split(","):
        item = item.strip()
        if item.startswith("["):
            name, bracket, rest = item.partition("]")
            name += bracket
            slots = rest[1:] if rest.startswith(":") else None if not rest else ""
        else:
            name, colon, slots = item.partition(":")
            slots = slots if colon else None
        if not _host_name_ok(name) or slots == "":
            raise ValueError(f"expected HOST[:SLOTS],... such as gpu1:8,gpu2:8, got {item!r} in {spec!r}")
        hosts.append(Host(name, None if slots is None else _slots(slots, f"{item!r}")))
    return _distinct(hosts, lambda index: f"{spec!r}")


def read_hostfile(path: str) -> list[Host]:
    """``--hostfile``: DeepSpeed's and Open MPI's format, ``HOST [slots=N]`` a line, ``#`` comments.

    Open MPI's ``max_slots=N`` is accepted and does nothing (a host runs SLOTS
    workers). ValueError naming the file and line for anything else.
    """
    try:
        with open(path, encoding="utf-8") as hostfile:
            lines = hostfile.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read hostfile {path!r}: {getattr(error, 'strerror', None) or error}") from None
    hosts, line_numbers = [], []
    for number, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        where = f"{path} line {number}"
        name, *settings = words
        if not _host_name_ok(name):
            raise ValueError(f"{where}: expected 'HOST slots=N', got a bad host name {name!r}")
        slots = None
        for setting in settings:
            key, equals, value = setting.partition("=")
            if not equals or key not in ("slots", "max_slots"):
                raise ValueError(f"{where}: expected 'HOST slots=N' (and Open MPI's max_slots=N), got {setting!r}")
            number_of_slots = _slots(value, f"{where}: {key}")
            if key == "slots":
                slots = number_of_slots
        hosts.append(Host(name, slots))
        line_numbers.append(number)
    if not hosts:
        raise ValueError(f"no hosts in hostfile {path}")
    return _distinct(hosts, lambda index: f"{path} line {line_numbers[index]}")


def _host_name_ok(name: str) -> bool:
    # A leading dash would be an option to ssh.
    return host_ok(name) and not name.startswith("-")


def _slots(text: str, where: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{where}: expected a number of workers >= 1 as SLOTS, got {text!r}")
    return int(text)


def _distinct(hosts: list[Host], where: Callable[[int], str]) -> list[Host]:
    """``hosts``, unless one is listed twice: ValueError saying ``where(index)`` the second is."""
    seen = set()
    for index, host in enumerate(hosts):
        if host.name in seen:
            raise ValueError(f"{where(index)}: host {host.name} is listed twice; give it once, with its slots")
        seen.add(host.name)
    return hosts


# What the remote launchers get -------------------------------------------------------------------


def parse_export(text: str) -> list[str]:
    """``--export``: ``NAME,PREFIX*,...``; ValueError for anything that is not a variable name or prefix."""
    patterns = [item.strip() for item in text.split(",") if item.strip()]
    for pattern in patterns:
        if not _EXPORT_PATTERN.fullmatch(pattern):
            raise ValueError(f"expected variable names and prefixes such as NAME,PREFIX*, got {pattern!r}")
    return patterns


def remote_environment(environ: dict[str, str], exports: list[str]) -> dict[str, str]:
    """The variables set here that the remote launchers get (sshd passes none).

    PATH and LD_LIBRARY_PATH, what ``DEFAULT_EXPORTS`` and ``exports`` name
    (``NAME`` or ``PREFIX*``), never the ``PET_`` variables of the options
    the remote launchers must not take (``--hosts``: they would start hosts of
    their own), and only names a shell can export.
    """
    patterns = [*RUNTIME_VARIABLES, *DEFAULT_EXPORTS, *exports]
    kept = {f"PET_{dest.upper()}" for dest in NOT_PASSED + SET_FOR_EVERY_HOST}
    return {
        name: value
        for name, value in environ.items()
        if _SHELL_NAME.fullmatch(name)
        and name not in kept
        and any(name.startswith(p[:-1]) if p.endswith("*") else name == p for p in patterns)
    }


def ssh_command(text: str) -> list[str]:
    """``--ssh``: split as a shell would, a leading ``~`` of a word expanded; ValueError if unusable."""
    try:
        words = [os.path.expanduser(word) for word in shlex.split(text)]
    except ValueError as error:
        raise ValueError(f"argument --ssh: {error} in {text!r}") from None
    if not words:
        raise ValueError("argument --ssh: expected an ssh command line such as 'ssh -F ~/.ssh/cluster', got ''")
    if shutil.which(words[0]) is None:
        raise ValueError(f"argument --ssh: {words[0]!r} is not a program on PATH")
    return words


# The remote shell's side -------------------------------------------------------------------------
#
# Each command is ``sh -c SCRIPT launcher CWD NAME=VALUE... -- ARGS...`` for the user's login shell to run,
# every word quoted by shlex.quote; the scripts are one line, with no single quote, so that any login shell
# passes them to sh as they are. SETUP enters the working directory and exports the variables.

_SETUP_FAILED = 3  # its exit status: neither the launcher's (0, 1, 2, 128+N) nor sh's (126, 127) nor ssh's (255)
_SETUP = (
    'cd -- "$1" 2>/dev/null || { printf "%s\\n" "no directory $1 there (every host runs in this working '
    f'directory)" >&2; exit {_SETUP_FAILED}; }}; shift; while [ "$1" != -- ]; do export "$1"; shift; done; shift; '
)
# ARGS: the launcher's program words. Prints the free port.
_PROBE_INSTALLED = _SETUP + 'exec "$@" --free-port'
# ARGS: the binary's path here, its hash. Prints the launcher there and a free port; nothing when it has neither.
_PROBE_BINARY = _SETUP + (
    f'for launcher in "$1" {_CACHE}/"$2"/launcher; do if [ -x "$launcher" ]; then printf "%s\\n" "$launcher"; '
    'exec "$launcher" --free-port; fi; done'
)
# ARGS: the binary's hash and size; stdin: the binary. Copies it into the cache, then probes as above.
_COPY_BINARY = _SETUP + (
    f'dir={_CACHE}/"$1"; if mkdir -p "$dir" && part=$(mktemp "$dir/launcher.XXXXXX") && cat > "$part" '
    '&& [ "$(wc -c < "$part")" -eq "$2" ] && chmod 755 "$part" && mv -f "$part" "$dir/launcher"; then '
    'printf "%s\\n" "$dir/launcher"; exec "$dir/launcher" --free-port; fi; rm -f "$part"; '
    'printf "%s\\n" "could not copy the launcher into $dir" >&2; exit 1'
)
# ARGS: the launcher's command line.
_LAUNCH = _SETUP + 'exec "$@"'


def remote_command(script: str, cwd: str, environment: dict[str, str], args: list[str]) -> str:
    """The command line for the remote login shell: ``script`` run by sh in ``cwd`` with ``environment``."""
    words = ["exec", "sh", "-c", script, "launcher", cwd, *(f"{k}={v}" for k, v in environment.items()), "--", *args]
    return " ".join(shlex.quote(word) for word in words)


def take_signals_from_stdin() -> None:
    """``--signals-from-stdin``: each line of the standard input names a signal this launcher then gets;
    the end of the input is a hangup (SIGHUP). The workers get /dev/null as standard input instead.

    A thread reads the pipe and signals this process; the launch's signal
    watch (launcher.supervisor.SignalWatch) hands a signal taken by this older
    thread to the thread that watches, so it is handled as any other.
    """
    control = os.dup(0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    threading.Thread(target=_signals_from, args=(os.fdopen(control, "rb"),), name="signals-from-stdin",
                     daemon=True).start()


def _signals_from(control: IO[bytes]) -> None:
    with control:
        for line in control:
            name = line.strip().decode("ascii", "replace")
            try:
                (number,) = parse_signals(name)
            except ValueError:
                log.warning("--signals-from-stdin: ignoring %r, which is not a signal name", name)
                continue
            os.kill(os.getpid(), number)
    os.kill(os.getpid(), signal.SIGHUP)


# The local side: ssh processes -------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_LONGEST_LINE = 1 << 16  # a longer line without a newline is passed on in pieces of this size
_libc = ctypes.CDLL(None, use_errno=True)


class _Ssh:
    """One ssh process running a command on a host; its output split into whole lines.

    Shown output goes to this process's stdout and stderr, each line whole and
    prefixed; otherwise stdout is kept (a probe's answer). The last stderr
    line is kept either way: ssh's message, or the host's, when it fails.
    """

    def __init__(self, host: Host, ssh: list[str], command: str, *, stdin=subprocess.PIPE, prefix: bytes | None = None):
        self.host = host
        self.prefix = prefix  # None: keep the output instead of showing it
        self.kept: list[bytes] = []
        self.last_error = ""
        self.returncode: int | None = None
        launcher_pid = os.getpid()
        self.process = subprocess.Popen(
            [*ssh, "-T", host.destination, command],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a terminal's Ctrl-C reaches this launcher only, which forwards it
            preexec_fn=lambda: _in_ssh_child(launcher_pid),
        )
        self.streams = {self.process.stdout.fileno(): 1, self.process.stderr.fileno(): 2}
        self.partial = {1: b"", 2: b""}

    def read(self, fd: int) -> bool:
        """Take what ``fd`` has; False at its end."""
        stream = self.streams[fd]
        data = os.read(fd, _LONGEST_LINE)
        if data:
            *lines, self.partial[stream] = (self.partial[stream] + data).split(b"\n")
            if len(self.partial[stream]) >= _LONGEST_LINE:
                lines.append(self.partial[stream])
                self.partial[stream] = b""
        else:
            lines = [self.partial[stream]] if self.partial[stream] else []
            self.partial[stream] = b""
        if stream == 2 and any(line.strip() for line in lines):
            self.last_error = next(line for line in reversed(lines) if line.strip()).decode(errors="replace").strip()
        if self.prefix is not None:
            _write(stream, b"".join(self.prefix + line + b"\n" for line in lines))
        elif stream == 1:
            self.kept += lines
        return bool(data)

    def send(self, signum: int) -> None:
        """Forward a signal to the remote launcher (--signals-from-stdin)."""
        try:
            os.write(self.process.stdin.fileno(), f"{signal_name(signum)}\n".encode())
        except BrokenPipeError:  # ssh has ended: so has the remote launcher, or it is stopping
            pass

    def end_input(self) -> None:
        """Close the remote launcher's standard input: a hangup, or the end of what a copy sends."""
        if self.process.stdin is not None:
            self.process.stdin.close()

    def stop(self) -> None:
        """End this ssh (a probe or a copy) and what it started (a ProxyCommand); the remote side ends with the
        connection. ssh leads its own process group, whose id stays taken until the loop reaps ssh."""
        if self.returncode is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:  # every process of the group has exited
                pass

    def output(self) -> list[str]:
        """The kept stdout lines."""
        return [line.decode(errors="replace").strip() for line in self.kept]


def _in_ssh_child(launcher_pid: int) -> None:
    """In the ssh child before exec: no signal blocked (this launcher blocks those it handles), and SIGTERM
    when this launcher ends however it ends (``kill -9`` too), which drops the connection."""
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    if _libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != launcher_pid:  # it died before the parent-death signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


def _write(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd``; output nobody reads (a closed pipe) is dropped."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except BrokenPipeError:
        pass


class _Loop:
    """The running ssh processes and this launcher's handled signals, in one wait."""

    def __init__(self, signals):
        self.signals = signals
        self.selector = selectors.DefaultSelector()
        self.selector.register(signals.fileno(), selectors.EVENT_READ)
        self.running: list[_Ssh] = []

    def start(self, ssh: _Ssh) -> None:
        self.running.append(ssh)
        for fd in ssh.streams:
            self.selector.register(fd, selectors.EVENT_READ, ssh)

    def wait(self) -> int | _Ssh:
        """The next handled signal's number, or the next ssh process to end (its output all taken)."""
        while True:
            for key, _ in self.selector.select():
                if key.data is None:
                    signum = self.signals.read()
                    if signum is not None:
                        return signum
                    continue
                ssh = key.data
                if not ssh.read(key.fd):
                    self.selector.unregister(key.fd)
                    if not any(self.selector.get_map().get(fd) for fd in ssh.streams):
                        ssh.returncode = ssh.process.wait()  # both streams ended: ssh is exiting
                        ssh.process.stdout.close()
                        ssh.process.stderr.close()
                        ssh.end_input()
                        self.running.remove(ssh)
                        return ssh

    def close(self) -> None:
        self.selector.close()


# The launch --------------------------------------------------------------------------------------


def _file_digest(path: str) -> str:
    """A binary's cache name: the start of its SHA-256, so that a host keeps one copy of each build."""
    import hashlib  # only the single binary's launch needs it (it is slow to import, OpenSSL)

    digest = hashlib.sha256()
    with open(path, "rb") as binary:
        for block in iter(lambda: binary.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


@dataclass
class _Launcher:
    """How a host runs the launcher: its program words there, and the port it found free."""

    program: list[str]
    free_port: int


class HostsLaunch:
    """One launcher per host over ssh, from the parsed command line (see the module text).

    ``passed_options``: every option given but ``NOT_PASSED``, as words that
    parse back to the same values (launcher.cli.given_options). ValueError for
    options that cannot go with the hosts.
    """

    def __init__(self, args, passed_options: list[str]):
        if args.hosts and args.hostfile:
            raise ValueError("--hosts and --hostfile name the hosts twice; give one of them")
        given = sorted(set(SET_FOR_EVERY_HOST) & args.explicit)
        if given:
            flags = ", ".join(f"--{dest.replace('_', '-')} (or PET_{dest.upper()})" for dest in given)
            raise ValueError(f"{flags}: set for every host by --hosts and --hostfile (the hosts are the nodes, "
                             "with a c10d rendezvous on the first); leave out what they set")
        rdzv_conf = parse_rdzv_conf(args.rdzv_conf)
        if "is_host" in rdzv_conf:
            raise ValueError("argument --rdzv-conf: is_host is set by --hosts and --hostfile (the first host "
                             "hosts the rendezvous); leave it out")
        try:
            backend_config("c10d", rdzv_conf)
        except ValueError as error:
            raise ValueError(f"argument --rdzv-conf: {error}") from None
        self.hosts = parse_hosts(args.hosts) if args.hosts else read_hostfile(args.hostfile)
        self.ssh = ssh_command(args.ssh)
        self.environment = remote_environment(dict(os.environ), parse_export(args.export))
        self.cwd = os.getcwd()
        self.nproc_per_node = args.nproc_per_node
        self.rdzv_conf = ",".join(f"{key}={value}" for key, value in rdzv_conf.items())
        self.run_id = args.rdzv_id if "rdzv_id" in args.explicit else random_uuid()
        self.signals_to_handle = parse_signals(args.signals_to_handle)
        self.passed_options = passed_options
        self.program_args = [args.training_script, *args.training_script_args]
        self.binary = sys.executable if getattr(sys, "frozen", False) else None
        self.binary_digest = _file_digest(self.binary) if self.binary else None

    def run(self) -> None:
        """Connect, launch, wait. HostsError when a host fails, SignalException for a handled signal."""
        from launcher.supervisor import SignalWatch  # the native extension, only once the launch starts

        with SignalWatch(self.signals_to_handle) as signals:
            loop = _Loop(signals)
            try:
                launchers = self._connect(loop)
                self._launch(loop, launchers)
            finally:
                loop.close()

    # -- connect

    def _connect(self, loop: _Loop) -> dict[str, _Launcher]:
        """Every host's launcher, copying the binary where it is missing."""
        for host in self.hosts:
            log.warning("%s: connecting (%s)", host.name, shlex.join([*self.ssh, host.destination]))
            loop.start(_Ssh(host, self.ssh, self._probe_command()))
        launchers: dict[str, _Launcher] = {}
        stopped_by = failure = None
        while loop.running:
            event = loop.wait()
            if isinstance(event, int):
                stopped_by = stopped_by or event
                for ssh in loop.running:
                    ssh.stop()
            elif stopped_by is not None or failure is not None:
                continue
            elif event.returncode != 0:
                failure = self._connect_failure(event)
                for ssh in loop.running:
                    ssh.stop()
            elif event.output() or self.binary is None:
                launchers[event.host.name] = self._found(event.host, event.output())
            else:
                loop.start(self._copy(event.host))
        if stopped_by is not None:
            raise SignalException(f"Process {os.getpid()} got signal: {stopped_by}", signal.Signals(stopped_by))
        if failure is not None:
            raise HostsError(failure)
        return launchers

    def _probe_command(self) -> str:
        if self.binary is None:
            return remote_command(_PROBE_INSTALLED, self.cwd, self.environment, self._installed_program())
        return remote_command(_PROBE_BINARY, self.cwd, self.environment, [self.binary, self.binary_digest])

    def _copy(self, host: Host) -> _Ssh:
        """Copy the binary into the host's cache over ssh (its own open file: copies run at once), then probe."""
        with open(self.binary, "rb") as binary:
            size = os.fstat(binary.fileno()).st_size
            log.warning("%s: %s is not there: copying it (%.1f MB) into the launcher cache there "
                        "(launcher/%s/ under $XDG_CACHE_HOME, else ~/.cache)", host.name, self.binary, size / 1e6,
                        self.binary_digest)
            command = remote_command(_COPY_BINARY, self.cwd, self.environment, [self.binary_digest, str(size)])
            return _Ssh(host, self.ssh, command, stdin=binary)

    def _installed_program(self) -> list[str]:
        return [sys.executable, "-m", "launcher"]

    def _found(self, host: Host, output: list[str]) -> _Launcher:
        """The launcher a probe found: the binary's path there and the free port, its last two lines (a login
        script may print before)."""
        try:
            return _Launcher([output[-2]] if self.binary else self._installed_program(), int(output[-1]))
        except (IndexError, ValueError):
            raise HostsError(f"{host.name}: the launcher there answered {output!r}, not a free port") from None

    def _connect_failure(self, ssh: _Ssh) -> str:
        message = ssh.last_error or f"ssh exited with {ssh.returncode}"
        # 255: ssh's own failure; _SETUP_FAILED: the script's; their messages say what failed
        if ssh.returncode in (255, _SETUP_FAILED) or self.binary is not None:
            return f"{ssh.host.name}: {message}"
        return (f"{ssh.host.name}: {shlex.join(self._installed_program())} does not start there ({message}); "
                "python -m launcher needs the same installation on every host (the single binary copies itself)")

    # -- launch

    def _launch(self, loop: _Loop, launchers: dict[str, _Launcher]) -> None:
        first = self.hosts[0]
        endpoint = f"{first.name}:{launchers[first.name].free_port}"
        log.warning("starting %d launchers: c10d rendezvous at %s, run id %s", len(self.hosts), endpoint, self.run_id)
        for index, host in enumerate(self.hosts):
            command = remote_command(_LAUNCH, self.cwd, self.environment, [
                *launchers[host.name].program,
                "--signals-from-stdin",
                f"--nnodes={len(self.hosts)}",
                f"--nproc-per-node={host.slots or self.nproc_per_node}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={endpoint}",
                f"--rdzv-id={self.run_id}",
                f"--rdzv-conf={','.join(filter(None, [self.rdzv_conf, f'is_host={str(index == 0).lower()}']))}",
                *self.passed_options,
                *self.program_args,
            ])
            prefix = f"{host.name}: ".encode() if len(self.hosts) > 1 else b""
            loop.start(_Ssh(host, self.ssh, command, prefix=prefix))
        ended_by: int | _Ssh | None = None  # the first signal, or the first host to fail
        while loop.running:
            event = loop.wait()
            if isinstance(event, int):
                if event not in NOTIFYING_SIGNALS:  # those the remote launchers forward, and the job goes on
                    ended_by = ended_by or event
                for ssh in loop.running:
                    ssh.send(event)
            elif event.returncode != 0 and ended_by is None:
                ended_by = event
                for ssh in loop.running:
                    ssh.send(signal.SIGTERM)
        if isinstance(ended_by, int):
            raise SignalException(f"Process {os.getpid()} got signal: {ended_by}", signal.Signals(ended_by))
        if ended_by is not None:
            others = [host.name for host in self.hosts if host is not ended_by.host]
            stopped = f"; stopped {', '.join(others)}" if others else ""
            if ended_by.returncode == 255:
                why = f"ssh failed: {ended_by.last_error or 'exit code 255'}"
            else:
                why = f"its launcher exited with {ended_by.returncode}, the failure summary above"
            raise HostsError(f"the job failed on {ended_by.host.name} ({why}){stopped}")
