"""``python -m launcher.launch``: torch.distributed.launch, the legacy launcher.

The same options as ``launcher`` (torchrun) plus ``--use-env``. Without it,
each worker gets ``--local-rank=N`` before the script's own arguments, as the
legacy launcher did; with it, workers read ``LOCAL_RANK`` from the
environment, as under torchrun.
"""
from __future__ import annotations

import functools
import logging
from argparse import ArgumentParser, Namespace

from launcher import cli
from launcher.console import console_main

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

log = logging.getLogger("launcher")

PROG = "python -m launcher.launch"


def get_args_parser(prog: str = PROG) -> ArgumentParser:
    parser = cli.get_args_parser(prog=prog, multi_host=False)
    parser.add_argument(
        "--use-env",
        "--use_env",
        action=cli.EnvFlag,
        help="Use environment variable to pass 'local rank'. For legacy reasons, the default value is False. "
        "If set, the script will not pass --local-rank as argument, and will instead set LOCAL_RANK.",
    )
    return parser


def parse_args(args: list[str] | None = None) -> Namespace:
    return get_args_parser().parse_args(args)


def prepare_launch(args: Namespace):
    """torch.distributed.launch's checks, then the launch torchrun would prepare."""
    if args.no_python and not args.use_env:
        raise cli.UsageError("When using the '--no-python' flag, you must also set the '--use-env' flag.")
    log.warning(
        "launcher.launch is the legacy interface of torch.distributed.launch; use `launcher` (torchrun), "
        "where --use-env is the default: read os.environ['LOCAL_RANK'] instead of --local-rank"
    )
    return cli.prepare_launch(args)


def prepare_run(args: Namespace):
    """The launch, checked and ready to start (see launcher.cli.prepare_run)."""
    return functools.partial(cli.launch, *prepare_launch(args))


def launch(args: Namespace) -> None:
    prepare_run(args)()


def main(args: list[str] | None = None) -> None:
    """torch.distributed.launch's ``main``: parse, launch, raise on failure."""
    launch(parse_args(args))


def main_entry(prog: str = PROG) -> NoReturn:
    """The command line; ``prog`` names it in usage and errors (``launcher --legacy-launch`` for the binary)."""
    console_main(prog, get_args_parser(prog).parse_args, prepare_run)


if __name__ == "__main__":
    main_entry()
