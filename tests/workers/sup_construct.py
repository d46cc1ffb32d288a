"""Make one step of a native constructor fail for real; print what it left behind.

    sup_construct.py SCENARIO

supervisor-signalfd  Supervisor() with no descriptor left for its SIGCHLD signalfd
supervisor-guardian  Supervisor() with no descriptors left for its guardian's pipe
supervisor-closed    Supervisor() then close(), twice: nothing fails
watch-signalfd       SignalWatch([SIGUSR1]) with no descriptor left for its signalfd
watch-sigaction      SignalWatch([SIGUSR1, 32]): the C library reserves 32, sigaction refuses it

Prints {"error": the exception's text or None, "before": state, "after": state}, where a state
is the thread's signal mask, the signals with a handler, whether this process is a subreaper,
and its open descriptors.
"""
import ctypes
import json
import os
import resource
import signal
import sys

from launcher._native.supervisor import SignalWatch, Supervisor

PR_GET_CHILD_SUBREAPER = 37
libc = ctypes.CDLL(None, use_errno=True)


def state():
    subreaper = ctypes.c_int()
    if libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(subreaper), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl")
    with open("/proc/self/status") as f:
        caught_mask = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
    return {
        "mask": sorted(int(sig) for sig in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "caught": [sig for sig in range(1, signal.NSIG) if caught_mask >> (sig - 1) & 1],
        "subreaper": subreaper.value,
        "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
    }


def leave_descriptors(count):
    """Lower the open-files limit so that exactly ``count`` more descriptors can be opened."""
    # a new descriptor is the lowest free number, and must be below the limit
    limit, free = 0, 0
    while True:
        try:
            os.fstat(limit)
        except OSError:
            if free == count:
                break
            free += 1
        limit += 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def build(scenario):
    if scenario == "supervisor-signalfd":
        leave_descriptors(1)  # the epoll descriptor
        Supervisor()
    elif scenario == "supervisor-guardian":
        leave_descriptors(2)  # the epoll descriptor and the signalfd
        Supervisor()
    elif scenario == "supervisor-closed":
        Supervisor().close()
        Supervisor().close()
    elif scenario == "watch-signalfd":
        leave_descriptors(0)
        SignalWatch([signal.SIGUSR1])
    elif scenario == "watch-sigaction":
        SignalWatch([signal.SIGUSR1, 32])
    else:
        sys.exit(f"unknown scenario {scenario}")


def main(scenario):
    before = state()
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    error = None
    try:
        build(scenario)
    except OSError as e:
        error = str(e)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limit)
    print(json.dumps({"error": error, "before": before, "after": state()}))


if __name__ == "__main__":
    main(sys.argv[1])
