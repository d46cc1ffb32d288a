"""The frozen launcher: ``dist/launcher`` runs this in the onefile bootloader's child.

The bootloader (the pid users see) unpacks the bundle into a temporary
directory (``sys._MEIPASS``), runs this program there as its child, forwards
every signal it gets to it, and removes the directory once the child has
exited, then exits as the child did. So that nothing depends on the
bootloader staying alive, this program first:

* leaves the bootloader's process group, so that a signal sent to the whole
  group (a terminal's Ctrl-C) reaches the launcher once, forwarded by the
  bootloader, and not twice (a second SIGINT cuts the workers' shutdown grace
  short); a SIGKILL to the group kills only the bootloader. Out of the
  terminal's foreground group, it ignores SIGTTOU, so that ``stty tostop``
  does not stop it when it writes to the terminal;
* arms SIGTERM as its parent-death signal: when the bootloader dies
  (``kill -9``), the launcher stops its workers as for any SIGTERM (the
  agent forwards it and waits the shutdown timeout) and exits 143;
* removes the unpack directory itself when it ends after its bootloader;
* gives the workers the environment the bootloader was started with: no
  ``LD_LIBRARY_PATH`` into the unpack directory, no PyInstaller variables.

A SIGKILL that reaches the launcher after its bootloader is gone (or both at
once, e.g. the OOM killer) leaves the unpack directory behind: nothing runs
to remove it.
"""
import atexit
import ctypes
import os
import shutil
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_DEATH_SIGNAL = signal.SIGTERM


def restore_environment(environ) -> None:
    """Undo what the bootloader added to the environment the workers inherit."""
    original = environ.pop("LD_LIBRARY_PATH_ORIG", None)
    if original is None:
        environ.pop("LD_LIBRARY_PATH", None)
    else:
        environ["LD_LIBRARY_PATH"] = original
    for name in [name for name in environ if name.startswith("_PYI_")]:
        del environ[name]


class Bootloader:
    """The parent process that unpacked this program and removes the unpack directory when it exits."""

    def __init__(self):
        self.pid = os.getppid()
        # It may have died before this ran: then the parent is a reaper, running another program.
        self.alive_at_start = _same_file("/proc/self/exe", f"/proc/{self.pid}/exe")

    def gone(self) -> bool:
        return not self.alive_at_start or os.getppid() != self.pid


def _same_file(path: str, other: str) -> bool:
    try:
        mine, theirs = os.stat(path), os.stat(other)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def main() -> None:
    bootloader = Bootloader()

    def remove_unpack_directory_if_orphaned() -> None:
        if bootloader.gone():
            shutil.rmtree(sys._MEIPASS, ignore_errors=True)

    def on_sigterm(signum, frame) -> None:
        # SIGTERM outside a launch (the agent handles it during one) ends the
        # program as it would end python -m launcher: by the signal, after the cleanup.
        remove_unpack_directory_if_orphaned()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    os.setpgid(0, 0)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    restore_environment(os.environ)
    signal.signal(PARENT_DEATH_SIGNAL, on_sigterm)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(PARENT_DEATH_SIGNAL), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if bootloader.gone():  # it died before the parent-death signal was armed
        os.kill(os.getpid(), PARENT_DEATH_SIGNAL)

    from launcher.__main__ import main_entry

    # At the program's end, however it ends (the launcher exits through launcher.console.exit_now, which
    # runs the atexit functions as Python's exit does).
    atexit.register(remove_unpack_directory_if_orphaned)
    main_entry()


if __name__ == "__main__":
    main()
