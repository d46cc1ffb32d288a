"""Defaults from Slurm when the launcher runs as a task of an ``srun`` step.

Detection: ``SLURM_JOB_ID`` and ``SLURM_STEP_ID`` are both set. srun sets the
step id for its tasks; a batch script (``sbatch``) has the job's variables but
no step id, so a launcher started straight from the batch script on the first
node takes nothing from Slurm (it would wait for nodes that never start).

Run one launcher per node (``srun --ntasks-per-node=1``). What is taken, each
only when the user gave neither the flag nor its ``PET_`` variable:

- ``--nnodes`` from ``SLURM_STEP_NUM_NODES`` (else ``SLURM_NNODES``, else
  ``SLURM_JOB_NUM_NODES``);
- for more than one node, the rendezvous: ``--rdzv-id`` from ``SLURM_JOB_ID``
  and c10d on the step's first host (``SLURM_STEP_NODELIST``, else
  ``SLURM_JOB_NODELIST``) at torchrun's default port 29400; when the user asked
  for the static rendezvous (``--rdzv-backend=static``, ``--master-addr`` or
  ``--master-port``) ``--master-addr`` is that first host and ``--node-rank``
  comes from ``SLURM_NODEID``.

A one-node step keeps torchrun's single-node rule (a private store on a free
loopback port), so jobs that share a node do not compete for port 29400.
"""
from __future__ import annotations

import itertools
import logging
import re
from argparse import Namespace
from collections.abc import Mapping

from launcher.rendezvous.options import C10D_DEFAULT_PORT, parse_min_max_nnodes

log = logging.getLogger("launcher")


_HOST_TEXT = re.compile(r"[A-Za-z0-9._-]*")
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list to host names, in order.

    ``gpu[01-04,07],cpu3`` gives gpu01 gpu02 gpu03 gpu04 gpu07 cpu3 (a range is
    zero-padded to the width of its first number); several bracket groups in
    one name multiply out, the first group varying slowest
    (``n[1-2]-ib[0-1]``: n1-ib0 n1-ib1 n2-ib0 n2-ib1). ValueError, saying
    what is wrong, for anything else.
    """
    hosts: list[str] = []
    for name in _split_names(hostlist):
        hosts.extend(_expand_name(name, hostlist))
    return hosts


def _split_names(hostlist: str) -> list[str]:
    """Split at the commas outside brackets."""
    names, current, depth = [], "", 0
    for char in hostlist:
        if char == "[":
            if depth:
                raise ValueError(f"malformed host list {hostlist!r}: '[' inside brackets")
            depth = 1
        elif char == "]":
            if not depth:
                raise ValueError(f"malformed host list {hostlist!r}: ']' without '['")
            depth = 0
        elif char == "," and not depth:
            names.append(current)
            current = ""
            continue
        current += char
    if depth:
        raise ValueError(f"malformed host list {hostlist!r}: '[' is never closed")
    names.append(current)
    if any(not name for name in names):
        raise ValueError(f"malformed host list {hostlist!r}: empty host name")
    return names


def _expand_name(name: str, hostlist: str) -> list[str]:
    # re.split with a group keeps the bracket groups at the odd positions.
    parts = re.split(r"\[([^\]]*)\]", name)
    choices = []
    for position, part in enumerate(parts):
        if position % 2 == 0:
            if not _HOST_TEXT.fullmatch(part):
                raise ValueError(f"malformed host list {hostlist!r}: unexpected character in {part!r}")
            choices.append([part])
        else:
            choices.append(_expand_ranges(part, hostlist))
    return ["".join(combination) for combination in itertools.product(*choices)]


def _expand_ranges(ranges: str, hostlist: str) -> list[str]:
    values = []
    for item in ranges.split(","):
        match = _RANGE.fullmatch(item)
        if not match:
            raise ValueError(f"malformed host list {hostlist!r}: [{ranges}] is not numbers and ranges such as 01-04,07")
        first, last = match.group(1), match.group(2) or match.group(1)
        if int(first) > int(last):
            raise ValueError(f"malformed host list {hostlist!r}: range {item} runs backwards")
        values.extend(str(number).zfill(len(first)) for number in range(int(first), int(last) + 1))
    return values


def in_srun_step(environ: Mapping[str, str]) -> bool:
    return "SLURM_JOB_ID" in environ and "SLURM_STEP_ID" in environ


def _first(environ: Mapping[str, str], *names: str) -> tuple[str, str]:
    """The first of ``names`` that is set, with its value; ValueError when none is."""
    for name in names:
        if environ.get(name):
            return name, environ[name]
    raise ValueError(f"Slurm step without {' or '.join(names)}: cannot take Slurm's defaults (give the flags)")


def _number(environ: Mapping[str, str], minimum: int, *names: str) -> tuple[str, int]:
    name, value = _first(environ, *names)
    if not value.isdigit() or int(value) < minimum:
        raise ValueError(f"{name}={value!r} is not a number >= {minimum}")
    return name, int(value)


def apply_slurm_defaults(args: Namespace, environ: Mapping[str, str]) -> list[str]:
    """Fill what the user left unset from the srun step (see the module text); return what was taken.

    ``args.explicit`` names the options the user gave (flag or ``PET_``
    variable); those are never changed. Does nothing outside an srun step.
    """
    if not in_srun_step(environ):
        return []
    explicit = args.explicit
    taken = []
    if "nnodes" not in explicit:
        name, nodes = _number(environ, 1, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
        if "SLURM_STEP_NUM_TASKS" in environ and environ["SLURM_STEP_NUM_TASKS"] != str(nodes):
            raise ValueError(
                f"Slurm step runs {environ['SLURM_STEP_NUM_TASKS']} tasks on {nodes} node(s): "
                "run one launcher per node (srun --ntasks-per-node=1), or give --nnodes"
            )
        args.nnodes = str(nodes)
        taken.append(f"--nnodes={nodes} ({name})")
    _, max_nodes = parse_min_max_nnodes(args.nnodes)
    if max_nodes == 1 or "rdzv_endpoint" in explicit:
        return _report(environ, taken)
    hosts_name, hostlist = _first(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST")
    try:
        first_host = expand_hostlist(hostlist)[0]
    except ValueError as error:
        raise ValueError(f"{hosts_name}: {error}") from None
    if "rdzv_id" not in explicit:
        args.rdzv_id = environ["SLURM_JOB_ID"]
        taken.append(f"--rdzv-id={args.rdzv_id} (SLURM_JOB_ID)")
    wants_static = bool({"master_addr", "master_port"} & explicit) or "rdzv_backend" in explicit
    if args.rdzv_backend == "static" and wants_static:
        if "master_addr" not in explicit:
            args.master_addr = first_host
            taken.append(f"--master-addr={first_host} (first host of {hosts_name})")
        if "node_rank" not in explicit:
            _, args.node_rank = _number(environ, 0, "SLURM_NODEID")
            taken.append(f"--node-rank={args.node_rank} (SLURM_NODEID)")
    elif args.rdzv_backend in ("static", "c10d"):
        args.rdzv_backend = "c10d"
        args.rdzv_endpoint = f"{first_host}:{C10D_DEFAULT_PORT}"
        taken.append(f"--rdzv-backend=c10d --rdzv-endpoint={args.rdzv_endpoint} (first host of {hosts_name})")
    return _report(environ, taken)


def _report(environ: Mapping[str, str], taken: list[str]) -> list[str]:
    if taken:
        log.warning(
            "Slurm job %s step %s: taking %s", environ["SLURM_JOB_ID"], environ["SLURM_STEP_ID"], ", ".join(taken)
        )
    return taken
