"""A worker using launcher.errors.record, with torch made unimportable.

Usage: err_launcher_record.py raise | exit <code> | child <child error file> <exit code> | segv
"""
import sys

sys.modules["torch"] = None  # any import of torch now fails: this worker must not need it

import ctypes  # noqa: E402
import time  # noqa: E402

from launcher.errors import ChildFailedError, Failure, record  # noqa: E402


def load_batch():
    raise ValueError("rank failed: bad batch")


def crash():
    ctypes.string_at(0)


@record
def main(mode, *args):
    if mode == "raise":
        load_batch()
    elif mode == "exit":
        sys.exit(int(args[0]))
    elif mode == "child":
        error_file, exitcode = args[0], int(args[1])
        failure = Failure(
            rank=0, local_rank=0, role="trainer", host="localhost", pid=1234,
            exitcode=exitcode if exitcode >= 0 else None, signal=-exitcode if exitcode < 0 else None,
            core_dumped=False, ended_at=time.time(), error_file=error_file, stderr_tail=[],
        )
        raise ChildFailedError("trainer", [failure])
    elif mode == "segv":
        crash()


if __name__ == "__main__":
    main(*sys.argv[1:])
    print("main returned")
