"""Native process supervision: spawn the workers, watch them, route their output.

One epoll loop, entered with the GIL released, wakes on whatever happens:
a worker's exit (its pidfd), its output (its pipes), a handled signal (the
SignalWatch's signalfd), an adopted orphan's exit (a SIGCHLD signalfd), the
console becoming writable again, or a descriptor the caller watches. Nothing
is polled on a timer. On kernels without pidfd_open (before Linux 5.3), the
SIGCHLD signalfd reports the workers' exits too. The workers run in a cgroup
of the job's where the launcher can make one, killed whole at the end.

Lines are the unit of routing: a line goes whole to the console (prefixed
when teed) and to the duplicate-filter file; files get the bytes as written.

Built from one file per part (uvloop's layout), each with its classes' typed
state in the .pxd of the same name (supervisor.pxd includes them):

    supervisor/signals.pyx    SignalWatch: the handled signals, blocked and read from a signalfd
    supervisor/output.pyx     where output goes: OutputRoute, the log files, the consoles, a worker's streams
    supervisor/cgroup.pyx     JobCgroup: the job's cgroup, made, killed whole, removed (supervisor_cgroup.h)
    supervisor/processes.pyx  the process lifecycle: spawn, the guardian, the loop, stop, Wakeup, ExitRecord

This file holds what they share: the C names, how an epoll event names its
source, and a few helpers.
"""
from libc.errno cimport EAGAIN, EBUSY, ECHILD, EINTR, ENAMETOOLONG, ENOSYS, EPERM, ESRCH, errno
from libc.signal cimport SIGCHLD, SIGINT, SIGKILL, SIGSTOP, SIGTERM
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memchr, memrchr, memset
from libcpp.string cimport string
from libcpp.vector cimport vector
from posix.fcntl cimport F_GETFL, F_SETFL, O_CREAT, O_RDWR, O_TRUNC, O_WRONLY, fcntl
from posix.fcntl cimport open as c_open
from posix.resource cimport RLIMIT_NOFILE, getrlimit, rlimit
from posix.signal cimport (SA_RESTART, SIG_BLOCK, SIG_SETMASK, kill, killpg, sigaction, sigaction_t, sigaddset,
                           sigemptyset, sigfillset, sigismember, siginfo_t)
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec
from posix.types cimport pid_t, sigset_t
from posix.unistd cimport close as c_close
from posix.unistd cimport getpid, getsid, read, write
from posix.wait cimport P_PID, WEXITED, WNOHANG, WNOWAIT, waitid, waitpid

from errors cimport check, os_error
from linux cimport (CLD_DUMPED, CLD_EXITED, CPU_ALLOC, CPU_ALLOC_SIZE, CPU_FREE, CPU_SET_S, CPU_ZERO_S, EPOLL_CLOEXEC,
                    EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD, EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, O_CLOEXEC,
                    O_NONBLOCK, POLLERR, POLLOUT, PR_GET_CHILD_SUBREAPER, PR_SET_CHILD_SUBREAPER, SFD_CLOEXEC,
                    SFD_NONBLOCK, cpu_set_t, epoll_create1, epoll_ctl, epoll_event, epoll_wait, launcher_pidfd_open,
                    pipe2, poll, pollfd, prctl, pthread_kill, pthread_self, pthread_sigmask, pthread_t, signalfd,
                    signalfd_siginfo)

import atexit
import logging
import os
import threading


# What an epoll event came from: the high 32 bits of its data.
cdef enum Source:
    SOURCE_PIPE = 1
    SOURCE_PIDFD = 2
    SOURCE_SIGNALS = 3
    SOURCE_CHILDREN = 4
    SOURCE_CONSOLE = 5
    SOURCE_WATCH = 6


cdef inline uint64_t tagged(int source, uint32_t index) noexcept nogil:
    return (<uint64_t>source << 32) | index


cdef double now(int clock) noexcept nogil:
    cdef timespec ts
    clock_gettime(clock, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef int epoll_set(int epfd, int op, int fd, uint32_t events, uint64_t data) except -1:
    cdef epoll_event event
    event.events = events
    event.data.u64 = data
    return check(epoll_ctl(epfd, op, fd, &event), "epoll_ctl")


cdef int write_all(int fd, const char *data, size_t size) noexcept nogil:
    """Blocking write of everything; 0, or -1 with errno."""
    cdef ssize_t n
    while size:
        n = write(fd, data, size)
        if n < 0:
            if errno == EINTR:
                continue
            return -1
        data += n
        size -= n
    return 0


include "supervisor/signals.pyx"
include "supervisor/output.pyx"
include "supervisor/cgroup.pyx"
include "supervisor/processes.pyx"
