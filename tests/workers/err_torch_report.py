"""Print torch's own failure report (ChildFailedError.format_msg) for one error file.

Usage: err_torch_report.py <error file> <exit code>
"""
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

error_file, exitcode = sys.argv[1], int(sys.argv[2])
failure = ProcessFailure(local_rank=0, pid=1234, exitcode=exitcode, error_file=error_file)
print(ChildFailedError("trainer", {0: failure}).format_msg())
