"""A worker using torch's own @record; the reference for launcher.errors.record.

Usage: err_torch_record.py raise | exit <code> | child <child error file> <exit code>
"""
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure, record


def load_batch():
    raise ValueError("rank failed: bad batch")


@record
def main(mode, *args):
    if mode == "raise":
        load_batch()
    elif mode == "exit":
        sys.exit(int(args[0]))
    elif mode == "child":
        error_file, exitcode = args[0], int(args[1])
        failure = ProcessFailure(local_rank=0, pid=1234, exitcode=exitcode, error_file=error_file)
        raise ChildFailedError("trainer", {0: failure})


if __name__ == "__main__":
    main(*sys.argv[1:])
    print("main returned")
