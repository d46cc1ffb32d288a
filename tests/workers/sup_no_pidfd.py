"""Run the launcher as on a kernel without pidfd_open: a seccomp filter makes it fail with ENOSYS.

    sup_no_pidfd.py LAUNCHER ARGS...    (x86_64 only)

The filter is inherited across exec and by the workers (which do not use pidfd_open).
"""
import ctypes
import errno
import os
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
AUDIT_ARCH_X86_64 = 0xC000003E
SYS_PIDFD_OPEN = 434
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
LD_ABS_W, JEQ_K, RET_K = 0x20, 0x15, 0x06


def instruction(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)


program = b"".join([
    instruction(LD_ABS_W, 0, 0, 4),  # seccomp_data.arch
    instruction(JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
    instruction(LD_ABS_W, 0, 0, 0),  # seccomp_data.nr
    instruction(JEQ_K, 0, 1, SYS_PIDFD_OPEN),
    instruction(RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS),
    instruction(RET_K, 0, 0, SECCOMP_RET_ALLOW),
])
filters = ctypes.create_string_buffer(program)
fprog = struct.pack("HxxxxxxP", len(program) // 8, ctypes.addressof(filters))
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.c_char_p(fprog), 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")
try:
    os.pidfd_open(os.getpid())
    sys.exit("the seccomp filter did not take")
except OSError as error:
    assert error.errno == errno.ENOSYS, error
os.execv(sys.argv[1], sys.argv[1:])
