"""``launcher``: torchrun's command line, without torch in the launcher process.

    launcher [options] script.py [script args]      # <python> -u script.py args
    launcher [options] -m package.module [args]     # <python> -u -m package.module args
    launcher [options] --no-python program [args]   # program args
    launcher [options] --run-path script.py [args]  # runpy.run_path in <python>
    launcher --legacy-launch [options] script.py    # torch.distributed.launch (launcher.launch)
    launcher --hosts=a:8,b:8 [options] script.py    # one launcher per host over ssh (launcher.hosts)

Every option also reads its default from ``PET_<NAME>`` (``PET_NPROC_PER_NODE``,
``PET_NO_PYTHON=1``), as torchrun's do. Only argparse, the standard library
and the launcher's modules that check values are imported before the
arguments are parsed (not the agent nor the native extensions), so
``--help`` is quick.

In-process, ``main(argv)`` raises as torch's ``torch.distributed.run.main``
does: ValueError for a bad flag or value, the launch's own errors otherwise.
The ``launcher`` program (launcher.__main__, through launcher.console) turns
those into one line and exit 2.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import sys
from argparse import (
    REMAINDER,
    SUPPRESS,
    Action,
    ArgumentParser,
    ArgumentTypeError,
    Namespace,
    RawDescriptionHelpFormatter,
)
from collections.abc import Callable, Collection

import launcher
from launcher.config import LaunchConfig, parse_signals, random_uuid
from launcher.devices import NPROC_EXPECTED, NUMA_MODES, determine_local_world_size, nproc_per_node_ok, numa_bindings
from launcher.logs import LogsSpecs, Std
from launcher.rendezvous.options import (
    BACKENDS,
    backend_config,
    host_ok,
    parse_min_max_nnodes,
    parse_rdzv_conf,
    parse_rdzv_endpoint,
)
from launcher.slurm import apply_slurm_defaults

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

log = logging.getLogger("launcher")

START_METHODS = ("spawn", "fork", "forkserver")
EVENT_LOG_HANDLERS = ("null", "console")
DEFAULT_MASTER_PORT = 29500
# --run-path: the worker interpreter runs the script with runpy.run_path, needing nothing of ours.
RUN_PATH_CODE = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


class UsageError(ValueError):
    """A bad flag or value: one line naming it and what is accepted."""


# Options with PET_ defaults ---------------------------------------------------------------------


class EnvDefault(Action):
    """An option whose default is ``PET_<DEST>`` when set (torch's ``env`` action).

    An environment value is checked by the option's type as a command-line value
    would be; its errors name the variable.
    """

    def __init__(self, dest, default=None, type=None, **kwargs):
        self.env_name = f"PET_{dest.upper()}"
        self.from_env = self.env_name in os.environ
        if self.from_env:
            default = os.environ[self.env_name]
            if type is not None:
                type = _naming_source(type, default, self.env_name)
        super().__init__(dest=dest, default=default, type=type, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.explicit.add(self.dest)


class EnvFlag(Action):
    """A flag, also set by ``PET_<DEST>`` read as an integer (torch's ``check_env``: 1 on, 0 off)."""

    def __init__(self, dest, **kwargs):
        self.env_name = f"PET_{dest.upper()}"
        self.from_env = self.env_name in os.environ
        value = os.environ.get(self.env_name, "0")
        try:
            default = bool(int(value))
        except ValueError:
            raise UsageError(f"{self.env_name}: expected 1 (on) or 0 (off), got {value!r}") from None
        super().__init__(dest=dest, const=True, default=default, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        namespace.explicit.add(self.dest)


def _naming_source(convert: Callable, env_value: str, env_name: str) -> Callable:
    def from_environment(value):
        try:
            return convert(value)
        except ArgumentTypeError as error:
            # argparse converts the PET_ default only when the flag is absent; it passes that very string.
            if value is env_value:
                raise ArgumentTypeError(f"{error} (from {env_name})") from None
            raise

    return from_environment


class LauncherArgumentParser(ArgumentParser):
    """Raises UsageError instead of printing usage and exiting; records the options the user gave."""

    def parse_known_args(self, args=None, namespace=None):
        if namespace is None:
            given_by_env = {action.dest for action in self._actions if getattr(action, "from_env", False)}
            namespace = Namespace(explicit=given_by_env)
        return super().parse_known_args(args, namespace)

    def error(self, message) -> NoReturn:
        if "required: training_script" in message:
            message = "no program to launch: give a script (or -m module, or --no-python program) and its arguments"
        elif message.startswith("unrecognized arguments"):
            message += " (launcher options go before the script)"
        raise UsageError(message)


# Values -----------------------------------------------------------------------------------------


def _check(kind: str, accepted: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type that keeps the string (torch's Namespace types) once ``accepted`` likes it."""

    def check(value: str) -> str:
        try:
            ok = accepted(value)
        except (ValueError, RuntimeError):
            ok = False
        if not ok:
            raise ArgumentTypeError(f"expected {kind}, got {value!r}")
        return value

    return check


def _integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    kind = f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"

    def integer(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < minimum or (maximum is not None and number > maximum):
            raise ArgumentTypeError(f"expected {kind}, got {value!r}")
        return number

    return integer


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number >= 0:
        raise ArgumentTypeError(f"expected a number of seconds >= 0, got {value!r}")
    return number


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    return _check(f"one of {', '.join(choices)}", lambda value: value in choices)


def _nnodes_ok(value: str) -> bool:
    min_nodes, max_nodes = parse_min_max_nnodes(value)
    return 0 < min_nodes <= max_nodes


def _endpoint_ok(endpoint: str) -> bool:
    """Some backend's --rdzv-endpoint: etcd's syntax is the widest (config_from_args checks the backend's own)."""
    return not endpoint or bool(parse_rdzv_endpoint("etcd", endpoint))


def _accepted_by(parse: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type that keeps the string once ``parse`` accepts it; its ValueError says what is wrong."""

    def check(value: str) -> str:
        try:
            parse(value)
        except ValueError as error:
            raise ArgumentTypeError(str(error)) from None
        return value

    return check


class FreePortAction(Action):
    """``--free-port``: print a TCP port free on this machine and exit, as ``--version`` does."""

    def __init__(self, option_strings, dest=SUPPRESS, default=SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        import socket  # only this option needs it

        with socket.socket() as sock:
            sock.bind(("", 0))
            print(sock.getsockname()[1])
        parser.exit()


def _local_ranks(value: str) -> str:
    if value and not re.fullmatch(r"\d+(,\d+)*", value.replace(" ", "")):
        raise ArgumentTypeError(f"expected a comma-separated list of local ranks such as 0,1,2, got {value!r}")
    return value


def comma_separated_list(value: str) -> list[str]:
    """torch's filter list: ``a,b`` is two items, ``,,`` an escaped comma; empty items are dropped."""
    placeholder = "\0"
    return [item.replace(placeholder, ",") for item in value.replace(",,", placeholder).split(",") if item]


def _signals(value: str) -> str:
    try:
        if not parse_signals(value):
            raise ValueError(f"expected a comma-separated list of signal names such as SIGTERM,SIGUSR1, got {value!r}")
    except ValueError as error:
        raise ArgumentTypeError(str(error).removeprefix("--signals-to-handle: ")) from None
    return value


def _log_dir(value: str) -> str:
    if os.path.isfile(value):
        raise ArgumentTypeError(f"expected a directory, got {value!r}, which is a file")
    return value


def _python(value: str) -> str:
    """An interpreter path, or a name looked up on PATH."""
    found = shutil.which(value)
    if found is None:
        raise ArgumentTypeError(f"expected a Python interpreter (an executable path or a name on PATH), got {value!r}")
    return value if os.sep in value else found


# The parser -------------------------------------------------------------------------------------

DESCRIPTION = """\
torchrun-compatible launcher: starts --nproc-per-node workers of a program on
this node and meets the other nodes through a rendezvous. The launcher process
itself never imports torch.

Each option also takes its default from PET_<OPTION> (PET_NNODES, PET_NO_PYTHON=1,
...). The worker interpreter is --python, else $PYTHON_EXEC, else the Python
running the launcher (the frozen binary: python3, then python, on PATH).
Under srun, --nnodes, the rendezvous and --rdzv-id default from Slurm.

With --hosts (or --hostfile), the launcher starts one launcher per host over
ssh, in this working directory, with a c10d rendezvous on the first host.

launcher --legacy-launch [options] ... (as the first argument) is the legacy
torch.distributed.launch front-end instead: the same options plus --use-env,
as python -m launcher.launch.
"""

EPILOG = """\
environment:
  PET_<OPTION>            default of each option (flags: 1 on, 0 off)
  PYTHON_EXEC             worker interpreter when --python is not given
  LOGLEVEL                launcher log level (default WARNING)
  LAUNCHER_NVML_LIBRARY   NVML library used to count GPUs (default libnvidia-ml.so.1)
  TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE   prefix of teed lines, e.g. "[rank${rank}]: "
"""


def get_args_parser(prog: str = "launcher", multi_host: bool = True) -> ArgumentParser:
    """torchrun's options (dash and underscore spellings, torchrun's defaults), ``--python`` and ``--version``;
    with ``multi_host``, the options of a launch over several hosts (``--hosts`` ...)."""
    parser = LauncherArgumentParser(
        prog=prog, description=DESCRIPTION, epilog=EPILOG, formatter_class=RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    version = f"%(prog)s {launcher.__version__} (torchrun {launcher.TORCHRUN_COMPAT} compatible)"
    add("--version", action="version", version=version)

    add("--nnodes", action=EnvDefault, type=_check("N or MIN:MAX with 1 <= MIN <= MAX", _nnodes_ok), default="1:1",
        help="Number of nodes, or the range of nodes in form <minimum_nodes>:<maximum_nodes>.")
    add("--nproc-per-node", "--nproc_per_node", action=EnvDefault, default="1",
        type=_check(NPROC_EXPECTED, nproc_per_node_ok),
        help="Number of workers per node; supported values: [auto, cpu, gpu, xpu, int, or a torch device type]. "
        "cpu counts the CPUs this process may use; gpu counts NVIDIA GPUs (NVML, honouring CUDA_VISIBLE_DEVICES), "
        "else AMD GPUs (KFD, honouring ROCR_VISIBLE_DEVICES, then HIP_VISIBLE_DEVICES or CUDA_VISIBLE_DEVICES); "
        "auto: GPUs, else Intel GPUs, else CPUs; another device type (npu, ...) is counted by torch in the workers' "
        "Python.")

    add("--rdzv-backend", "--rdzv_backend", action=EnvDefault, type=_one_of(BACKENDS), default="static",
        metavar="{" + ",".join(BACKENDS) + "}", help="Rendezvous backend.")
    add("--rdzv-endpoint", "--rdzv_endpoint", action=EnvDefault, default="",
        type=_check("<host>[:<port>], [<IPv6>][:<port>], or a comma list of those for etcd", _endpoint_ok),
        help="Rendezvous backend endpoint; usually in form <host>:<port>.")
    add("--rdzv-id", "--rdzv_id", action=EnvDefault, default="none",
        type=_check("a non-empty id without '/'", lambda value: bool(value) and "/" not in value),
        help="User-defined group id.")
    add("--rdzv-conf", "--rdzv_conf", action=EnvDefault, type=_accepted_by(parse_rdzv_conf), default="",
        help="Additional rendezvous configuration (<key1>=<value1>,<key2>=<value2>,...).")
    add("--standalone", action=EnvFlag,
        help="Start a local standalone rendezvous backend that is represented by a C10d TCP store on a free "
        "port. Useful when launching single-node, multi-worker job. If specified --rdzv-backend, "
        "--rdzv-endpoint, --rdzv-id are auto-assigned and any explicitly set values are ignored.")

    add("--max-restarts", "--max_restarts", action=EnvDefault, type=_integer(0), default=0,
        help="Maximum number of worker group restarts before failing.")
    add("--monitor-interval", "--monitor_interval", action=EnvDefault, type=_seconds, default=0.1,
        help="Accepted for torchrun compatibility; not needed here: worker exits are seen the moment they happen.")
    add("--start-method", "--start_method", action=EnvDefault, type=_one_of(START_METHODS), default="spawn",
        metavar="{" + ",".join(START_METHODS) + "}",
        help="Accepted for torchrun compatibility; workers are always started by fork+exec of a fresh program.")
    add("--event-log-handler", "--event_log_handler", action=EnvDefault, type=_one_of(EVENT_LOG_HANDLERS),
        default="null", metavar="{" + ",".join(EVENT_LOG_HANDLERS) + "}",
        help="null: no agent events; console: agent events as JSON lines on stderr.")
    add("--role", action=EnvDefault, type=_check("a non-empty name", bool), default="default",
        help="User-defined role for the workers.")
    add("-m", "--module", action=EnvFlag,
        help="Change each process to interpret the launch script as a Python module, executing with the same "
        "behavior as 'python -m'.")
    add("--no-python", "--no_python", action=EnvFlag,
        help="Skip prepending the training script with 'python' - just execute it directly. Useful when the "
        "script is not a Python script.")
    add("--run-path", "--run_path", action=EnvFlag,
        help="Run the training script with runpy.run_path in the worker interpreter. Takes precedence over "
        "--no-python.")
    add("--python", action=EnvDefault, type=_python, default=None, metavar="PATH",
        help="Worker interpreter (a path or a name on PATH). Default: $PYTHON_EXEC, else the Python running "
        "the launcher; the frozen launcher looks for python3, then python, on PATH.")
    add("--log-dir", "--log_dir", action=EnvDefault, type=_log_dir, default=None,
        help="Base directory to use for log files (e.g. /var/log/torch/elastic). The same directory is reused "
        "for multiple runs (a unique job-level sub-directory is created with rdzv_id as the prefix).")
    add("-r", "--redirects", action=EnvDefault, type=_accepted_by(Std.from_str), default="0",
        help="Redirect std streams into a log file in the log directory (e.g. [-r 3] redirects both "
        "stdout+stderr for all workers, [-r 0:1,1:2] redirects stdout for local rank 0 and stderr for local "
        "rank 1).")
    add("-t", "--tee", action=EnvDefault, type=_accepted_by(Std.from_str), default="0",
        help="Tee std streams into a log file and also to console (see --redirects for format).")
    add("--local-ranks-filter", "--local_ranks_filter", action=EnvDefault, type=_local_ranks, default="",
        help="Only show logs from specified ranks in console (e.g. [--local_ranks_filter=0,1,2] will only show "
        "logs from rank 0, 1 and 2). This will only apply to stdout and stderr, not to log files saved via "
        "--redirect or --tee.")
    add("--duplicate-stdout-filters", "--duplicate_stdout_filters", action=EnvDefault, type=comma_separated_list,
        default=[],
        help="Duplicates logs streamed to stdout to another specified file with a list of filters (e.g. "
        "[--duplicate_stdout_filters 'apple,orange'] will duplicate log lines matching 'apple' OR 'orange'. An "
        "empty filters list won't duplicate any lines. Use double comma to escape a comma).")
    add("--duplicate-stderr-filters", "--duplicate_stderr_filters", action=EnvDefault, type=comma_separated_list,
        default=[], help="As --duplicate-stdout-filters, for stderr.")

    add("--node-rank", "--node_rank", action=EnvDefault, type=_integer(0), default=0,
        help="Rank of the node for multi-node distributed training. It is only used for static rendezvous "
        "(i.e., when --rdzv-backend=static).")
    add("--master-addr", "--master_addr", action=EnvDefault, default="127.0.0.1",
        type=_check("a host name, an IPv4 address or an IPv6 address in brackets", host_ok),
        help="Address of the master node (rank 0), only used for static rendezvous. IPv6 should have the "
        "pattern `[0:0:0:0:0:0:0:1]`.")
    add("--master-port", "--master_port", action=EnvDefault, type=_integer(0, 65535), default=None,
        help="Port on the master node (rank 0), only used for static rendezvous. Defaults to 29500.")
    add("--local-addr", "--local_addr", action=EnvDefault, default=None,
        type=_check("a host name or an IP address", lambda value: host_ok(value, bare_ipv6=True)),
        help="Address of the local node. If specified, will use the given address for connection. Else, it "
        "will be default to local machine's FQDN.")
    add("--logs-specs", "--logs_specs", action=EnvDefault, default=None,
        help="torchrun.logs_specs entry point name. 'default' is torchrun's layout, which this launcher always "
        "writes; another name must be installed, and its class (a torch LogsSpecs) is not loaded here.")
    add("--numa-binding", "--numa_binding", action=EnvDefault, type=_one_of(NUMA_MODES), default=None,
        metavar="{" + ",".join(NUMA_MODES) + "}",
        help="Bind worker processes to CPUs and memory near their GPUs (node, socket, exclusive, "
        "core-complex; see torch.numa.binding.AffinityMode). Ignored without GPUs.")
    add("--signals-to-handle", "--signals_to_handle", action=EnvDefault, type=_signals,
        default="SIGTERM,SIGINT,SIGHUP,SIGQUIT",
        help="Comma-separated list of signals to handle and forward to subprocesses. Default: "
        "SIGTERM,SIGINT,SIGHUP,SIGQUIT. Common additional signals: SIGUSR1,SIGUSR2 (used in SLURM environments).")
    add("--shutdown-timeout", "--shutdown_timeout", action=EnvDefault, type=_integer(0), default=None,
        help="Time in seconds to wait for graceful shutdown of worker processes before sending SIGKILL. If not "
        "specified, uses TORCH_ELASTIC_SHUTDOWN_TIMEOUT environment variable or defaults to 30 seconds.")
    add("--virtual-local-rank", "--virtual_local_rank", action=EnvFlag,
        help="Enable virtual local rank mode for workers: LOCAL_RANK is 0 for all workers and "
        "CUDA_VISIBLE_DEVICES is narrowed so each worker sees its assigned GPU at device index 0.")

    if multi_host:
        _add_multi_host_options(parser)
    add("training_script", type=str,
        help="Full path to the (single GPU) training program/script to be launched in parallel, followed by "
        "all the arguments for the training script.")
    add("training_script_args", nargs=REMAINDER)
    return parser


def _hosts():
    """launcher.hosts, imported once an option that needs it is given: a launch on this host alone does
    without its imports (ssh, threads, ctypes), which would delay the workers' start."""
    from launcher import hosts

    return hosts


def _add_multi_host_options(parser: ArgumentParser) -> None:
    group = parser.add_argument_group("several hosts over ssh (one launcher per host, started from here)")
    add = group.add_argument
    add("--hosts", action=EnvDefault, type=_accepted_by(lambda value: _hosts().parse_hosts(value)), default=None,
        metavar="HOST[:SLOTS],...",
        help="Run on these hosts: one launcher each over ssh, in this working directory, --nnodes the number of "
        "hosts, a c10d rendezvous on the first host (a free port there, a fresh --rdzv-id unless given), SLOTS "
        "workers per host (else --nproc-per-node). The single binary copies itself to a host that lacks it.")
    add("--hostfile", action=EnvDefault, type=_accepted_by(lambda value: _hosts().read_hostfile(value)), default=None,
        metavar="PATH",
        help="As --hosts, from a file of lines 'HOST slots=N' (DeepSpeed's and Open MPI's hostfile; # comments).")
    add("--ssh", action=EnvDefault, default="ssh", metavar="CMD",
        help="The ssh command line for --hosts, split as a shell would (e.g. \"ssh -F ~/.ssh/cluster -p 2222\"); "
        "its hosts must accept it without a password prompt.")
    # the default, nothing to export, is checked too (argparse applies the type to a default string)
    add("--export", action=EnvDefault, type=_accepted_by(lambda value: value and _hosts().parse_export(value)),
        default="", metavar="NAME,PREFIX*,...",
        help="With --hosts, also pass these variables to every host, besides PATH, LD_LIBRARY_PATH, NCCL_*, "
        "PYTHON*, TORCH*, OMP_NUM_THREADS, PET_* and TORCHELASTIC_* (those set here).")
    add("--signals-from-stdin", "--signals_from_stdin", action=EnvFlag,
        help="Take each line of the standard input as a signal name (SIGTERM, SIGINT, ...) sent to this launcher, and "
        "its end as SIGHUP; the workers get /dev/null. --hosts starts the launcher on each host so.")
    add("--free-port", action=FreePortAction,
        help="Print a TCP port free on this machine and exit (--hosts asks the first host for one).")


def parse_args(args: list[str] | None = None) -> Namespace:
    return get_args_parser().parse_args(args)


# From arguments to a launch ---------------------------------------------------------------------


def config_from_args(args: Namespace):
    """``(LaunchConfig, entrypoint, worker args)`` from parsed arguments, as torch's ``config_from_args``.

    ``args.use_env`` (only the legacy launch has it) False: each worker gets
    ``--local-rank=N`` before the script's own arguments. Sets ``OMP_NUM_THREADS=1`` in this
    process's environment (the workers inherit it) when more than one worker
    runs per node and the user has not set it.
    """
    min_nodes, max_nodes = parse_min_max_nnodes(args.nnodes)
    nproc_per_node = determine_local_world_size(args.nproc_per_node, lambda: worker_python(args.python))
    if "OMP_NUM_THREADS" not in os.environ and nproc_per_node > 1:
        omp_num_threads = 1
        log.warning(
            "\n*****************************************\n"
            "Setting OMP_NUM_THREADS environment variable for each process to be "
            "%s in default, to avoid your system being overloaded, "
            "please further tune the variable for optimal performance in "
            "your application as needed. \n"
            "*****************************************",
            omp_num_threads,
        )
        os.environ["OMP_NUM_THREADS"] = str(omp_num_threads)

    rdzv_configs: dict = parse_rdzv_conf(args.rdzv_conf)
    try:
        backend_options = backend_config(args.rdzv_backend, rdzv_configs)
    except ValueError as error:
        raise UsageError(f"argument --rdzv-conf: {error}") from None
    if args.rdzv_backend == "static":
        if args.node_rank >= max_nodes:
            raise UsageError(
                f"argument --node-rank: expected 0 to {max_nodes - 1} (--nnodes={args.nnodes}), got {args.node_rank}"
            )
        rdzv_configs["rank"] = args.node_rank
    rdzv_endpoint = args.rdzv_endpoint
    if args.rdzv_backend == "static" and not rdzv_endpoint:
        rdzv_endpoint = f"{args.master_addr}:{args.master_port}"
    try:
        parse_rdzv_endpoint(args.rdzv_backend, rdzv_endpoint, backend_options.get("protocol"))
    except ValueError as error:
        raise UsageError(f"argument --rdzv-endpoint: {error}") from None

    _check_logs_specs(args.logs_specs)
    local_ranks_filter = {int(rank) for rank in args.local_ranks_filter.split(",")} if args.local_ranks_filter else None
    logs_specs = LogsSpecs(
        log_dir=args.log_dir,
        redirects=Std.from_str(args.redirects),
        tee=Std.from_str(args.tee),
        local_ranks_filter=local_ranks_filter,
    )
    config = LaunchConfig(
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        nproc_per_node=nproc_per_node,
        run_id=args.rdzv_id,
        role=args.role,
        rdzv_endpoint=rdzv_endpoint,
        rdzv_backend=args.rdzv_backend,
        rdzv_configs=rdzv_configs,
        max_restarts=args.max_restarts,
        monitor_interval=args.monitor_interval,
        start_method=args.start_method,
        log_line_prefix_template=os.getenv("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"),
        local_addr=args.local_addr,
        logs_specs=logs_specs,
        event_log_handler=args.event_log_handler,
        numa_binding=_numa_binding(args.numa_binding, nproc_per_node),
        signals_to_handle=args.signals_to_handle,
        duplicate_stdout_filters=args.duplicate_stdout_filters,
        duplicate_stderr_filters=args.duplicate_stderr_filters,
        virtual_local_rank=args.virtual_local_rank,
        shutdown_timeout=args.shutdown_timeout,
    )
    entrypoint, cmd_args = worker_command(args)
    return config, entrypoint, cmd_args


def worker_command(args: Namespace) -> tuple[str, list[str]]:
    """The program each worker runs and its arguments (the agent substitutes ``${local_rank}``)."""
    if args.run_path:
        if args.module:
            raise UsageError("argument --run-path: runs a script file; it cannot be combined with -m/--module")
        if args.no_python:
            log.warning("--no-python is ignored: --run-path runs the script in the worker interpreter")
        entrypoint, cmd_args = worker_python(args.python), ["-u", "-c", RUN_PATH_CODE, args.training_script]
    elif args.no_python:
        if args.module:
            raise UsageError("Don't use both the '--no-python' flag and the '--module' flag at the same time.")
        if args.python:
            raise UsageError(
                "argument --python: names the worker interpreter; --no-python runs the program without one"
            )
        entrypoint, cmd_args = args.training_script, []
    else:
        cmd_args = ["-u", "-m", args.training_script] if args.module else ["-u", args.training_script]
        entrypoint = worker_python(args.python)
    if not getattr(args, "use_env", True):  # torch's get_use_env: torchrun's arguments have no use_env
        cmd_args.append(f"--local-rank={launcher.LOCAL_RANK_MACRO}")
    return entrypoint, cmd_args + list(args.training_script_args)


def worker_python(python: str | None) -> str:
    """``--python``, else ``$PYTHON_EXEC``, else this interpreter; frozen: python3 then python on PATH."""
    if python:
        return python
    if os.environ.get("PYTHON_EXEC"):
        return os.environ["PYTHON_EXEC"]
    if not getattr(sys, "frozen", False) and sys.executable:
        return sys.executable
    found = shutil.which("python3") or shutil.which("python")
    if found is None:
        raise UsageError(
            "no Python for the workers: python3 and python are not on PATH; give --python PATH "
            "(or --no-python to run a program directly)"
        )
    return found


def _check_logs_specs(name: str | None) -> None:
    """torchrun's --logs-specs names an entry point of group torchrun.logs_specs (a torch class)."""
    if name is None or name == "default":  # torch registers its DefaultLogsSpecs as "default": our layout
        return
    from importlib import metadata

    entry_points = metadata.entry_points()
    # Python 3.9's entry_points() is a dict of groups; later ones select.
    if hasattr(entry_points, "select"):
        group = entry_points.select(group="torchrun.logs_specs")
    else:
        group = entry_points.get("torchrun.logs_specs", ())
    found = [entry for entry in group if entry.name == name]
    if not found:
        raise UsageError(f"Could not find entrypoint under 'torchrun.logs_specs[{name}]' key")
    log.warning(
        "--logs-specs=%s names %s, a torch LogsSpecs class; this launcher does not load torch and writes "
        "torchrun's default log layout",
        name,
        found[0].value,
    )


def _numa_binding(mode: str | None, nproc_per_node: int) -> str | None:
    """The mode to pass on, checked here so a bad topology fails before any worker starts."""
    if mode is None:
        return None
    if numa_bindings(mode, nproc_per_node) is None:
        log.warning("--numa-binding=%s is ignored: no GPUs are visible on this node", mode)
        return None
    return mode


def prepare_launch(args: Namespace):
    """torchrun's ``run`` up to the launch: settle the rendezvous, then ``config_from_args``.

    ``--standalone``: c10d on a free loopback port with a fresh id. Under srun:
    Slurm's defaults (see launcher.slurm). torchrun's single-node rule: static
    without endpoint or master port and at most one node becomes c10d on a
    free loopback port (keeping a --rdzv-id the user gave).
    """
    if args.standalone:
        ignored = [
            f"--{name.replace('_', '-')}={getattr(args, name)}"
            for name in ("rdzv_backend", "rdzv_endpoint", "rdzv_id")
            if name in args.explicit
        ]
        if ignored:
            log.warning("--standalone: ignoring %s; using a local c10d store on a free port", " ".join(ignored))
        args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", random_uuid()
        log.info("Rendezvous info: --rdzv-backend=c10d --rdzv-endpoint=localhost:0 --rdzv-id=%s", args.rdzv_id)
    else:
        apply_slurm_defaults(args, os.environ)
        _, max_nodes = parse_min_max_nnodes(args.nnodes)
        if args.rdzv_backend == "static" and not args.rdzv_endpoint and args.master_port is None and max_nodes == 1:
            args.rdzv_backend, args.rdzv_endpoint = "c10d", "localhost:0"
            if "rdzv_id" not in args.explicit:
                args.rdzv_id = random_uuid()
    if args.master_port is None:
        args.master_port = DEFAULT_MASTER_PORT
    if args.rdzv_backend != "static" and not args.rdzv_endpoint and {"master_addr", "master_port"} & args.explicit:
        log.warning("master_addr is only used for static rdzv_backend and when rdzv_endpoint is not specified.")
    if args.rdzv_backend != "static" and "node_rank" in args.explicit and args.node_rank != 0:
        log.warning(
            "node_rank is only used for static rdzv_backend. It will be ignored for rdzv_backend=%s.", args.rdzv_backend
        )
    return config_from_args(args)


def launch(config, entrypoint: str, args: list[str]) -> None:
    from launcher.api import elastic_launch

    elastic_launch(config, entrypoint)(*args)


def given_options(args: Namespace, leave_out: Collection[str] = ()) -> list[str]:
    """The options given (flags or ``PET_`` variables) but ``leave_out`` (dests), as ``--name=value`` words that
    parse back to the same values: what --hosts passes on to the launcher on every host."""
    words = []
    for action in get_args_parser()._actions:
        if action.dest not in args.explicit or action.dest in leave_out:
            continue
        name = next(option for option in action.option_strings if option.startswith("--"))
        value = getattr(args, action.dest)
        if isinstance(action, EnvFlag):
            words += [name] if value else []
        elif isinstance(value, list):  # comma_separated_list's: a comma in an item is doubled again
            words.append(f"{name}={','.join(item.replace(',', ',,') for item in value)}")
        else:
            words.append(f"{name}={value}")
    return words


def prepare_run(args: Namespace) -> Callable[[], None]:
    """The launch the arguments ask for, checked (ValueError) and ready to start: this node's, or with
    --hosts/--hostfile one launcher per host over ssh (launcher.hosts)."""
    if args.signals_from_stdin:
        _hosts().take_signals_from_stdin()
    if args.hosts or args.hostfile:
        hosts = _hosts()
        return hosts.HostsLaunch(args, given_options(args, leave_out=hosts.NOT_PASSED)).run
    return functools.partial(launch, *prepare_launch(args))


def run(args: Namespace) -> None:
    prepare_run(args)()


def main(argv: list[str] | None = None) -> None:
    """torchrun's ``main``: parse, launch, raise on failure (ValueError for bad flags and values)."""
    run(parse_args(argv))
