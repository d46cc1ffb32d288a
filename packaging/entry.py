"""The frozen launcher: what ``dist/launcher`` runs.

packaging/bootloader.c execs PyInstaller's one-directory bootloader in the
copy of the bundle it unpacked (once per user and machine), which runs this program
in the same process: the launcher has the pid, the signals and the exit status
of the command the user ran. Before the launcher starts, this program

* gives the workers the environment the binary was started with: no
  ``LD_LIBRARY_PATH`` into the copy, no PyInstaller or bootloader variables;
* makes ``sys.executable`` the single binary, not the copy's bootloader: it is
  what --hosts copies to a host that lacks it.
"""
import os
import sys


def restore_environment(environ) -> None:
    """Undo what the bootloaders added to the environment the workers inherit."""
    original = environ.pop("LD_LIBRARY_PATH_ORIG", None)
    if original is None:
        environ.pop("LD_LIBRARY_PATH", None)
    else:
        environ["LD_LIBRARY_PATH"] = original
    for name in [name for name in environ if name.startswith("_PYI_")]:
        del environ[name]
    environ.pop("_LAUNCHER_BINARY", None)


def main() -> None:
    sys.executable = os.environ.get("_LAUNCHER_BINARY", sys.executable)
    restore_environment(os.environ)

    from launcher.__main__ import main_entry

    main_entry()


if __name__ == "__main__":
    main()
