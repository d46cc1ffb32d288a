"""The ``launcher`` program: ``python -m launcher``, the ``launcher`` console script, and dist/launcher.

torchrun's command line (launcher.cli), or with ``--legacy-launch`` as the
first argument torch.distributed.launch's (launcher.launch): the single
binary runs no ``-m``, so this is how it is the legacy launcher too.
"""
from __future__ import annotations

import sys

from launcher import cli
from launcher.console import console_main, exit_now

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

LEGACY_LAUNCH = "--legacy-launch"


def main_entry() -> NoReturn:
    try:
        if sys.argv[1:2] == [LEGACY_LAUNCH]:
            from launcher import launch  # here: the legacy front-end is not on the start-up path of torchrun's

            del sys.argv[1]  # the rest is the legacy launcher's command line
            launch.main_entry(prog=f"launcher {LEGACY_LAUNCH}")
        console_main("launcher", cli.parse_args, cli.prepare_run)
    except SystemExit as done:
        exit_now(done)


if __name__ == "__main__":
    main_entry()
