"""Run a command as on an older kernel: a seccomp filter makes the named system calls fail with ENOSYS.

    sup_seccomp.py SYSCALL[,SYSCALL...] [--fatal-close-from=FD] COMMAND ARGS...    (x86_64 only)

SYSCALL: pidfd_open (Linux < 5.3), clone3 (Linux < 5.3, and Docker's default profile), close_range
(Linux < 5.9). With --fatal-close-from, a close() of a descriptor FD or above kills the process that
makes it: a spawn that closes descriptors it never opened dies instead of taking its time. The filter
is inherited across exec and by every child.
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
SYSCALLS = {"pidfd_open": 434, "clone3": 435, "close_range": 436}
SYS_CLOSE = 3
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
LD_ABS_W, JEQ_K, JGE_K, RET_K = 0x20, 0x15, 0x35, 0x06
ARCH, NR, ARG0 = 4, 0, 16  # offsets in struct seccomp_data (ARG0: the low half of the first argument)


def instruction(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)


def filter_program(hidden, fatal_close_from):
    """A jump skips the instructions it counts; a rule that does not match falls through to the next, then to ALLOW."""
    rules = []
    for number in hidden:
        rules += [instruction(JEQ_K, 0, 1, number), instruction(RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS)]
    if fatal_close_from is not None:
        rules += [
            instruction(JEQ_K, 0, 3, SYS_CLOSE),
            instruction(LD_ABS_W, 0, 0, ARG0),
            instruction(JGE_K, 0, 1, fatal_close_from),
            instruction(RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        ]
    body = [instruction(LD_ABS_W, 0, 0, NR)] + rules
    return b"".join([
        instruction(LD_ABS_W, 0, 0, ARCH),
        instruction(JEQ_K, 0, len(body), AUDIT_ARCH_X86_64),
        *body,
        instruction(RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ])


def install(program):
    filters = ctypes.create_string_buffer(program)
    fprog = struct.pack("HxxxxxxP", len(program) // 8, ctypes.addressof(filters))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.c_char_p(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


def main(argv):
    names, *command = argv
    fatal_close_from = None
    if command and command[0].startswith("--fatal-close-from="):
        fatal_close_from = int(command.pop(0).split("=", 1)[1])
    hidden = [SYSCALLS[name] for name in names.split(",")]
    install(filter_program(hidden, fatal_close_from))
    if "pidfd_open" in names.split(","):
        try:
            os.pidfd_open(os.getpid())
            sys.exit("the seccomp filter did not take")
        except OSError as error:
            assert error.errno == errno.ENOSYS, error
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
