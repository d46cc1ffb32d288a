"""Native process supervision: spawn the workers, watch them, route their output.

One epoll loop, entered with the GIL released, wakes on whatever happens:
a worker's exit (its pidfd), its output (its pipes), a handled signal (the
SignalWatch's signalfd), an adopted orphan's exit (a SIGCHLD signalfd), the
console becoming writable again, or a descriptor the caller watches. Nothing
is polled on a timer. On kernels without pidfd_open (before Linux 5.3), the
SIGCHLD signalfd reports the workers' exits too.

Lines are the unit of routing: a line goes whole to the console (prefixed
when teed) and to the duplicate-filter file; files get the bytes as written.
"""
from libc.errno cimport errno, EAGAIN, EINTR, ECHILD, ENOSYS, EPERM, EPIPE, ESRCH
from libc.stdint cimport int32_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memchr, memset, strerror
from libcpp.deque cimport deque
from libcpp.string cimport string
from libcpp.vector cimport vector
from posix.fcntl cimport F_GETFL, F_SETFL, O_CREAT, O_RDWR, O_TRUNC, O_WRONLY, fcntl
from posix.fcntl cimport open as c_open
from posix.signal cimport (SA_RESTART, SIG_BLOCK, SIG_SETMASK, kill, killpg, sigaction, sigaction_t, sigaddset,
                          sigemptyset, sigfillset, sigismember, siginfo_t)
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec
from posix.types cimport pid_t, sigset_t
from posix.unistd cimport close, getpid, getsid, read, write
from posix.wait cimport P_PID, WEXITED, WNOHANG, WNOWAIT, waitid, waitpid

from linux cimport (CLD_DUMPED, CLD_EXITED, CLD_KILLED, CPU_ALLOC, CPU_ALLOC_SIZE, CPU_FREE, CPU_SET_S, CPU_ZERO_S,
                    EPOLL_CLOEXEC, EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD, EPOLLIN, EPOLLOUT, O_CLOEXEC,
                    O_NONBLOCK, POLLOUT, PR_GET_CHILD_SUBREAPER, PR_SET_CHILD_SUBREAPER, SFD_CLOEXEC,
                    SFD_NONBLOCK, cpu_set_t, epoll_create1, epoll_ctl, epoll_event, epoll_wait,
                    launcher_pidfd_open, pipe2, poll, pollfd, prctl, pthread_kill, pthread_self, pthread_sigmask,
                    pthread_t, signalfd, signalfd_siginfo)

import logging
import os
import threading

cdef extern from "<string.h>" nogil:
    void *memmem(const void *haystack, size_t haystacklen, const void *needle, size_t needlelen)
    void *memrchr(const void *s, int c, size_t n)

cdef extern from "<signal.h>" nogil:
    enum:
        SIGCHLD
        SIGINT
        SIGKILL
        SIGSTOP
        SIGTERM
        NSIG

cdef extern from "<limits.h>" nogil:
    enum:
        PIPE_BUF

cdef extern from "supervisor_spawn.h" nogil:
    enum:
        LAUNCHER_STAGE_NONE
        LAUNCHER_STAGE_SETUP
        LAUNCHER_STAGE_CWD
        LAUNCHER_STAGE_CPUS
        LAUNCHER_STAGE_MEM_NODES
        LAUNCHER_STAGE_EXEC
        LAUNCHER_GUARDIAN_ADD
        LAUNCHER_GUARDIAN_FORGET
        LAUNCHER_GUARDIAN_CAPACITY
    struct launcher_spawn_spec:
        char **programs
        char **argv
        char **envp
        const char *cwd
        int stdout_fd
        int stderr_fd
        const cpu_set_t *cpus
        size_t cpus_size
        const unsigned long *mem_nodes
        unsigned long mem_nodes_bits
    struct launcher_guardian_record:
        int32_t op
        int32_t pgid
    pid_t launcher_spawn(const launcher_spawn_spec *spec, int *stage)
    pid_t launcher_guardian_start(int *write_fd)
    int launcher_waitid_pidfd(int pidfd, siginfo_t *info, int options)


cdef enum:
    TAIL_LINES = 20
    TAIL_LINE_MAX = 4096  # bytes of one remembered stderr line
    READ_SIZE = 65536
    READS_PER_EVENT = 16  # then let the other sources have a turn
    FILE_FLUSH_AT = 65536
    CONSOLE_PAUSE_AT = 4 << 20  # stop reading the workers: their full pipes block them
    CONSOLE_RESUME_AT = 1 << 20
    LINE_MAX = 1 << 20  # a longer line is cut here rather than held in memory
    MAX_EVENTS = 64

# An unprefixed line still without its newline after this long is shown as it
# is (a progress bar); the pieces of one print() arrive far sooner, so lines
# from different ranks stay whole.
cdef double PARTIAL_SHOW_DELAY = 0.05

# What an epoll event came from: the high 32 bits of its data.
cdef enum Source:
    SOURCE_PIPE = 1
    SOURCE_PIDFD = 2
    SOURCE_SIGNALS = 3
    SOURCE_CHILDREN = 4
    SOURCE_CONSOLE = 5
    SOURCE_WATCH = 6

# What the loop waits for before it returns.
cdef enum Until:
    UNTIL_EVENT = 1  # a worker exit, a handled signal or a watched fd
    UNTIL_EXITED = 2  # every worker exited, or SIGINT arrived
    UNTIL_EOF = 3  # every output pipe closed
    UNTIL_DEADLINE = 4


cdef inline uint64_t tagged(int source, uint32_t index) noexcept nogil:
    return (<uint64_t>source << 32) | index


# The kernel has no pidfd_open (before Linux 5.3): a worker's exit is noticed
# through SIGCHLD instead, and waited for by pid, which is safe because a
# worker stays a zombie (its pid taken) until its group ends.
cdef bint pidfd_missing = False


cdef double now(int clock) noexcept nogil:
    cdef timespec ts
    clock_gettime(clock, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


def _os_error(int error, name=None, str what=None):
    message = strerror(error).decode()
    if what:
        message = f"{what}: {message}"
    return OSError(error, message) if name is None else OSError(error, message, name)


cdef int check(int result, str what=None) except -1:
    if result < 0:
        raise _os_error(errno, what=what)
    return result


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


cdef pthread_t watching_thread  # the thread of the open SignalWatch


cdef void redirect_to_watcher(int sig) noexcept nogil:
    # A thread that does not block ``sig`` took it (one started before the watch,
    # in a program that embeds the launcher): hand it to the watching thread,
    # which blocks it, so it waits in the signalfd like any other.
    pthread_kill(watching_thread, sig)


cdef class SignalWatch:
    """Blocks ``signals`` in the calling thread and reads them from a signalfd.

    Threads started afterwards inherit the mask. A thread started before that
    does not block a signal may still take it: a handler that only re-sends it
    to the watching thread is installed meanwhile. SIGCHLD is blocked too (not
    read here): a WorkerGroup reads it to reap the orphans it adopts.
    ``close()`` restores the previous handlers and mask. One watch at a time.
    """

    cdef int fd
    cdef sigset_t previous
    cdef sigaction_t previous_actions[NSIG]
    cdef readonly tuple signals

    def __cinit__(self):
        self.fd = -1

    def __init__(self, signals):
        cdef sigset_t handled, blocked
        sigemptyset(&handled)
        numbers = []
        for sig in signals:
            number = int(sig)
            if number <= 0 or number >= NSIG or number in (SIGKILL, SIGSTOP, SIGCHLD):
                raise ValueError(f"cannot handle signal {sig}")
            sigaddset(&handled, number)
            numbers.append(number)
        self.signals = tuple(numbers)
        blocked = handled
        sigaddset(&blocked, SIGCHLD)
        cdef int error = pthread_sigmask(SIG_BLOCK, &blocked, &self.previous)
        if error:
            raise _os_error(error, what="pthread_sigmask")
        self.fd = signalfd(-1, &handled, SFD_NONBLOCK | SFD_CLOEXEC)
        if self.fd < 0:
            error = errno
            pthread_sigmask(SIG_SETMASK, &self.previous, NULL)
            raise _os_error(error, what="signalfd")
        global watching_thread
        watching_thread = pthread_self()
        cdef sigaction_t redirect
        memset(&redirect, 0, sizeof(redirect))
        redirect.sa_handler = redirect_to_watcher
        sigfillset(&redirect.sa_mask)
        redirect.sa_flags = SA_RESTART
        for number in numbers:
            if sigaction(number, &redirect, &self.previous_actions[number]) < 0:
                raise _os_error(errno, what="sigaction")

    def fileno(self) -> int:
        if self.fd < 0:
            raise ValueError("SignalWatch is closed")
        return self.fd

    def read(self):
        """The next pending handled signal's number, or None; never blocks."""
        cdef signalfd_siginfo info
        cdef ssize_t n
        if self.fd < 0:
            raise ValueError("SignalWatch is closed")
        while True:
            n = read(self.fd, &info, sizeof(info))
            if n == sizeof(info):
                return info.ssi_signo
            if n < 0 and errno == EINTR:
                continue
            if n < 0 and errno == EAGAIN:
                return None
            raise _os_error(errno, what="read signalfd")

    def close(self):
        if self.fd < 0:
            return
        close(self.fd)
        self.fd = -1
        for number in self.signals:
            if sigaction(number, &self.previous_actions[number], NULL) < 0:
                raise _os_error(errno, what="sigaction")
        cdef int error = pthread_sigmask(SIG_SETMASK, &self.previous, NULL)
        if error:
            raise _os_error(error, what="pthread_sigmask")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)


cdef class _File:
    """A log file written in large blocks."""

    cdef int fd
    cdef string buffer
    cdef readonly str path

    def __cinit__(self, str path):
        self.path = path
        self.fd = c_open(os.fsencode(path), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        if self.fd < 0:
            raise _os_error(errno, path)

    cdef int append(self, const char *data, size_t size) except -1:
        self.buffer.append(data, size)
        if self.buffer.size() >= FILE_FLUSH_AT:
            self.flush()
        return 0

    cdef int flush(self) except -1:
        cdef int result
        if self.buffer.size() == 0:
            return 0
        with nogil:
            result = write_all(self.fd, self.buffer.data(), self.buffer.size())
        if result < 0:
            raise _os_error(errno, self.path, "cannot write the log")
        self.buffer.clear()
        return 0

    cdef int close(self) except -1:
        if self.fd >= 0:
            try:
                self.flush()
            finally:
                close(self.fd)
                self.fd = -1
        return 0

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)


cdef class _Console:
    """The launcher's stdout or stderr: written when it can take more, never dropped.

    A console that epoll cannot watch (a regular file, /dev/null) is always
    writable and written directly. One that stays full makes the loop stop
    reading the workers that write to it: their pipes fill and they block.
    """

    cdef int fd
    cdef string pending
    cdef size_t sent  # bytes of pending already written
    cdef bint pollable
    cdef bint watching  # waiting for EPOLLOUT
    cdef bint broken  # EPIPE: nobody reads it any more
    cdef bint paused
    cdef int index
    cdef list streams

    def __cinit__(self, int fd, int index):
        self.fd = fd
        self.index = index
        self.streams = []

    cdef size_t backlog(self) noexcept:
        return self.pending.size() - self.sent

    cdef int add(self, const char *data, size_t size) except -1:
        if not self.broken:
            self.pending.append(data, size)
        return 0

    cdef int flush(self, int epfd, bint block) except -1:
        """Write what the console takes without blocking (everything when ``block``)."""
        cdef pollfd ready
        cdef ssize_t n
        cdef size_t size
        cdef int result
        while self.backlog() and not self.broken:
            if self.pollable:
                ready.fd = self.fd
                ready.events = POLLOUT
                ready.revents = 0
                with nogil:
                    result = poll(&ready, 1, -1 if block else 0)
                if result < 0:
                    if errno == EINTR:
                        continue
                    raise _os_error(errno, what="poll console")
                if result == 0:
                    if not self.watching:
                        epoll_set(epfd, EPOLL_CTL_MOD, self.fd, EPOLLOUT, tagged(SOURCE_CONSOLE, self.index))
                        self.watching = True
                    return 0
                # writable: a pipe takes PIPE_BUF bytes without blocking
                size = min(self.backlog(), <size_t>PIPE_BUF)
            else:
                size = self.backlog()
            with nogil:
                n = write(self.fd, self.pending.data() + self.sent, size)
            if n < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN:  # someone made it non-blocking: wait for room
                    if block:
                        continue
                    if self.pollable and not self.watching:
                        epoll_set(epfd, EPOLL_CTL_MOD, self.fd, EPOLLOUT, tagged(SOURCE_CONSOLE, self.index))
                        self.watching = True
                    return 0
                # the reader is gone (EPIPE) or the console is unusable: there is nowhere left to write
                self.broken = True
                break
            self.sent += n
        if self.sent == self.pending.size() or self.sent > (1 << 20):
            self.pending.erase(0, self.sent)
            self.sent = 0
        if self.watching and not self.backlog():
            epoll_set(epfd, EPOLL_CTL_MOD, self.fd, 0, tagged(SOURCE_CONSOLE, self.index))
            self.watching = False
        return 0


cdef class _Stream:
    """One worker's stdout or stderr pipe and where its lines go."""

    cdef int fd  # the read end; -1 once closed
    cdef int index
    cdef int worker
    cdef bint reading  # registered for EPOLLIN
    cdef _File file
    cdef _Console console
    cdef string prefix  # "" unless teed
    cdef _File filtered  # the attempt's filtered_std*.log, when this stream is filtered
    cdef vector[string] filters
    cdef bint keep_tail
    cdef deque[string] tail
    cdef string partial  # the line being received
    cdef size_t partial_shown  # bytes of partial already on an unprefixed console
    cdef double partial_since  # monotonic time the unshown part of partial began waiting; 0: none

    def __cinit__(self):
        self.fd = -1

    cdef bint routes_lines(self) noexcept:
        return self.console is not None or self.filtered is not None or self.keep_tail

    cdef int feed(self, const char *data, size_t size) except -1:
        cdef const char *newline
        cdef size_t start = 0, end
        if self.file is not None:
            self.file.append(data, size)
        if not self.routes_lines():
            return 0
        while start < size:
            newline = <const char *>memchr(data + start, b'\n', size - start)
            if newline == NULL:
                self.partial.append(data + start, size - start)
                if self.partial.size() >= LINE_MAX:
                    self.end_partial()
                return 0
            end = newline - data + 1
            if self.partial.size():
                self.partial.append(data + start, end - start)
                self.line(self.partial.data(), self.partial.size(), True)
                self.partial.clear()
                self.partial_shown = 0
                self.partial_since = 0
            else:
                self.line(data + start, end - start, True)
            start = end
        return 0

    cdef int line(self, const char *data, size_t size, bint terminated) except -1:
        cdef size_t i, body = size - 1 if terminated else size
        cdef const char *shown
        if self.console is not None:
            if self.prefix.size():
                self.console.add(self.prefix.data(), self.prefix.size())
                self.console.add(data, size)
            else:
                self.console.add(data + self.partial_shown, size - self.partial_shown)
            if not terminated:
                self.console.add(b"\n", 1)
        if self.filtered is not None:
            for i in range(self.filters.size()):
                if memmem(data, body, self.filters[i].data(), self.filters[i].size()) != NULL:
                    self.filtered.append(self.prefix.data(), self.prefix.size())
                    self.filtered.append(data, size)
                    if not terminated:
                        self.filtered.append(b"\n", 1)
                    break
        if self.keep_tail:
            # a line redrawn with carriage returns (a progress bar) as the terminal last showed it
            if body and data[body - 1] == b'\r':
                body -= 1
            shown = <const char *>memrchr(data, b'\r', body)
            if shown != NULL:
                body -= shown + 1 - data
                data = shown + 1
            self.tail.push_back(string(data, min(body, <size_t>TAIL_LINE_MAX)))
            if self.tail.size() > TAIL_LINES:
                self.tail.pop_front()
        return 0

    cdef int end_partial(self) except -1:
        """The pending partial line as a line of its own (end of output, or too long)."""
        if self.partial.size():
            self.line(self.partial.data(), self.partial.size(), False)
            self.partial.clear()
            self.partial_shown = 0
            self.partial_since = 0
        return 0

    cdef void await_newline(self, double at) noexcept:
        """The worker stopped mid-line: start the clock for showing the unshown part."""
        if self.console is not None and not self.prefix.size() and self.partial.size() > self.partial_shown:
            if self.partial_since == 0:
                self.partial_since = at

    cdef int show_partial(self) except -1:
        """Put the unshown part of an unprefixed partial line on the console."""
        self.console.add(self.partial.data() + self.partial_shown, self.partial.size() - self.partial_shown)
        self.partial_shown = self.partial.size()
        self.partial_since = 0
        return 0

    cdef list tail_lines(self):
        return [line.decode("utf-8", "replace") for line in self.tail]


cdef class _Worker:
    cdef pid_t pid
    cdef int pidfd
    cdef bint exited
    cdef bint reaped
    cdef int code  # CLD_EXITED, CLD_KILLED or CLD_DUMPED
    cdef int status  # exit code or signal number
    cdef double started_at
    cdef double ended_at
    cdef list streams
    cdef _Stream stderr

    def __cinit__(self):
        self.pidfd = -1
        self.streams = []


cdef class Supervisor:
    """The native half of a WorkerGroup: processes, pipes, signals and the guardian."""

    cdef int epfd
    cdef int signal_fd  # the SignalWatch's, not owned; -1 without one
    cdef int children_fd  # SIGCHLD, for adopted orphans
    cdef sigset_t mask_before
    cdef bint restore_mask
    cdef bint restore_subreaper
    cdef pid_t guardian_pid
    cdef int guardian_fd
    cdef pid_t own_sid
    cdef list workers
    cdef list streams
    cdef _Console out
    cdef _Console err
    cdef list files  # every _File, to flush each turn
    cdef list signals  # handled signals read and not yet returned
    cdef list exits  # indices of workers whose exit was not yet returned
    cdef list ready_fds
    cdef bint draining
    cdef bint sigint_cuts_short  # while waiting for the workers to take the first signal
    cdef bint term_on_failure  # a failed exit sends SIGTERM to every group before Python even wakes
    cdef double terminated_at  # monotonic time that SIGTERM went out; 0: not yet
    cdef readonly bint finished

    def __cinit__(self):
        self.epfd = -1
        self.children_fd = -1
        self.guardian_fd = -1
        self.signal_fd = -1

    def __init__(self, int signal_fd=-1, bint term_on_failure=False):
        cdef sigset_t children
        if threading.current_thread() is not threading.main_thread():
            # a worker's parent-death signal fires when the thread that forked it ends
            raise RuntimeError("workers must be started from the main thread")
        self.workers = []
        self.streams = []
        self.files = []
        self.signals = []
        self.exits = []
        self.ready_fds = []
        self.own_sid = getsid(0)
        self.epfd = check(epoll_create1(EPOLL_CLOEXEC), "epoll_create1")
        self.signal_fd = signal_fd
        self.term_on_failure = term_on_failure
        if signal_fd >= 0:
            epoll_set(self.epfd, EPOLL_CTL_ADD, signal_fd, EPOLLIN, tagged(SOURCE_SIGNALS, 0))
        sigemptyset(&children)
        sigaddset(&children, SIGCHLD)
        cdef int error = pthread_sigmask(SIG_BLOCK, &children, &self.mask_before)
        if error:
            raise _os_error(error, what="pthread_sigmask")
        self.restore_mask = not sigismember(&self.mask_before, SIGCHLD)
        self.children_fd = check(signalfd(-1, &children, SFD_NONBLOCK | SFD_CLOEXEC), "signalfd")
        epoll_set(self.epfd, EPOLL_CTL_ADD, self.children_fd, EPOLLIN, tagged(SOURCE_CHILDREN, 0))
        self.out = self._console(1, 0)
        self.err = self._console(2, 1)

    cdef _Console _console(self, int fd, int index):
        cdef epoll_event event
        console = _Console(fd, index)
        event.events = 0
        event.data.u64 = tagged(SOURCE_CONSOLE, index)
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &event) == 0:
            console.pollable = True
        elif errno != EPERM:  # EPERM: a regular file, always writable
            console.broken = True
        return console

    def start_guardian(self):
        """Fork the guardian and make this process the subreaper of the workers' orphans."""
        cdef int current = 0
        check(prctl(PR_GET_CHILD_SUBREAPER, <unsigned long>&current, 0, 0, 0), "prctl")
        if not current:
            check(prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl")
            self.restore_subreaper = True
        self.guardian_pid = check(launcher_guardian_start(&self.guardian_fd), "cannot start the guardian")

    cdef int _guardian(self, int op, pid_t pgid) except -1:
        cdef launcher_guardian_record record
        record.op = op
        record.pgid = pgid
        if write_all(self.guardian_fd, <const char *>&record, sizeof(record)) < 0:
            raise _os_error(errno, what="cannot reach the guardian")
        return 0

    def spawn(self, list programs, list argv, list envp, cwd, cpus, mem_nodes, tuple stdout, tuple stderr):
        """Start one worker; returns its index.

        ``stdout``/``stderr``: ``("null",)``, ``("file", path)``
        or ``("pipe", file path or None, console, prefix, filtered path or
        None, filters, keep_tail)``.
        """
        if len(self.workers) >= LAUNCHER_GUARDIAN_CAPACITY:
            raise ValueError(f"at most {LAUNCHER_GUARDIAN_CAPACITY} workers")
        cdef _Worker worker = _Worker()
        cdef _Stream stream
        cdef int index = len(self.workers)
        cdef launcher_spawn_spec spec
        cdef int stage = LAUNCHER_STAGE_NONE
        cdef pid_t pid
        cdef int ncpus = 0, error
        cdef int child_fds[2]
        cdef cpu_set_t *cpu_set = NULL
        cdef vector[unsigned long] nodemask
        cdef char **c_programs = NULL
        cdef char **c_argv = NULL
        cdef char **c_envp = NULL
        child_fds[0] = child_fds[1] = -1
        parent_ends = []
        memset(&spec, 0, sizeof(spec))
        try:
            for i, stream_spec in enumerate((stdout, stderr)):
                child_fds[i] = self._stream(worker, index, i, stream_spec, parent_ends)
            c_programs = c_strings(programs)
            c_argv = c_strings(argv)
            c_envp = c_strings(envp)
            spec.programs = c_programs
            spec.argv = c_argv
            spec.envp = c_envp
            if cwd is not None:
                spec.cwd = <bytes>cwd
            spec.stdout_fd = child_fds[0]
            spec.stderr_fd = child_fds[1]
            if cpus is not None:
                ncpus = max(cpus) + 1
                cpu_set = CPU_ALLOC(ncpus)
                if cpu_set == NULL:
                    raise MemoryError()
                spec.cpus_size = CPU_ALLOC_SIZE(ncpus)
                CPU_ZERO_S(spec.cpus_size, cpu_set)
                for cpu in cpus:
                    CPU_SET_S(cpu, spec.cpus_size, cpu_set)
                spec.cpus = cpu_set
            if mem_nodes is not None:
                nodemask.resize(max(mem_nodes) // 64 + 1, 0)
                for node in mem_nodes:
                    nodemask[node // 64] |= 1UL << (node % 64)
                spec.mem_nodes = nodemask.data()
                spec.mem_nodes_bits = nodemask.size() * 64
            with nogil:
                pid = launcher_spawn(&spec, &stage)
            if pid < 0:
                error = errno
                if stage == LAUNCHER_STAGE_CWD:
                    raise _os_error(error, os.fsdecode(cwd), "cannot change to the working directory")
                if stage == LAUNCHER_STAGE_CPUS:
                    raise _os_error(error, os.fsdecode(argv[0]), f"cannot bind to CPUs {sorted(cpus)}")
                if stage == LAUNCHER_STAGE_MEM_NODES:
                    raise _os_error(error, os.fsdecode(argv[0]), f"cannot bind memory to NUMA nodes {sorted(mem_nodes)}")
                if stage == LAUNCHER_STAGE_EXEC:
                    raise _os_error(error, os.fsdecode(argv[0]), "cannot execute")
                raise _os_error(error, os.fsdecode(argv[0]), "cannot start")
            worker.started_at = now(CLOCK_REALTIME)
            worker.pid = pid
            # The guardian first: from here on the group dies with the launcher.
            self._guardian(LAUNCHER_GUARDIAN_ADD, pid)
            if not pidfd_missing:
                worker.pidfd = launcher_pidfd_open(pid, 0)
                if worker.pidfd < 0:
                    error = errno
                    if error != ENOSYS:
                        kill(pid, SIGKILL)
                        waitpid(pid, NULL, 0)
                        raise _os_error(error, what="pidfd_open")
                    _use_sigchld_for_exits()
            self.workers.append(worker)
            if worker.pidfd >= 0:
                epoll_set(self.epfd, EPOLL_CTL_ADD, worker.pidfd, EPOLLIN, tagged(SOURCE_PIDFD, index))
            parent_ends.clear()
            for s in worker.streams:
                stream = <_Stream>s
                stream.index = len(self.streams)
                self.streams.append(stream)
                if stream.file is not None:
                    self.files.append(stream.file)
                if stream.console is not None:
                    stream.console.streams.append(stream)
                self._read_from(stream, True)
            return index
        except BaseException:
            for s in worker.streams:
                if (<_Stream>s).file is not None:
                    (<_Stream>s).file.close()
                (<_Stream>s).fd = -1  # closed below with parent_ends
            raise
        finally:
            for fd in child_fds:
                if fd >= 0:
                    close(fd)
            for fd in parent_ends:  # only left when the spawn failed
                close(fd)
            free(c_programs)
            free(c_argv)
            free(c_envp)
            if cpu_set != NULL:
                CPU_FREE(cpu_set)

    cdef int _stream(self, _Worker worker, int index, int which, tuple spec, list parent_ends) except -1:
        """Prepare one output stream; returns the fd the child gets."""
        cdef int fds[2]
        cdef int fd
        mode = spec[0]
        if mode == "null":
            return check(c_open(b"/dev/null", O_RDWR | O_CLOEXEC), "/dev/null")
        if mode == "file":
            fd = c_open(os.fsencode(spec[1]), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            if fd < 0:
                raise _os_error(errno, spec[1])
            return fd
        _, path, to_console, prefix, filtered_path, filters, keep_tail = spec
        cdef _Stream stream = _Stream()
        stream.worker = index
        worker.streams.append(stream)
        if which == 1:
            worker.stderr = stream
        if path is not None:
            stream.file = _File(path)
        if to_console:
            stream.console = self.out if which == 0 else self.err
        stream.prefix = prefix
        if filtered_path is not None:
            stream.filtered = self._filtered_file(filtered_path)
            for needle in filters:
                stream.filters.push_back(needle)
        stream.keep_tail = keep_tail
        check(pipe2(fds, O_CLOEXEC), "pipe2")
        parent_ends.append(fds[0])
        stream.fd = fds[0]
        check(fcntl_nonblock(fds[0]), "fcntl")
        return fds[1]

    cdef _File _filtered_file(self, str path):
        for existing in self.files:
            if (<_File>existing).path == path:
                return existing
        filtered = _File(path)
        self.files.append(filtered)
        return filtered

    cdef int _read_from(self, _Stream stream, bint on) except -1:
        if stream.fd < 0 or stream.reading == on:
            return 0
        if on:
            epoll_set(self.epfd, EPOLL_CTL_ADD, stream.fd, EPOLLIN, tagged(SOURCE_PIPE, stream.index))
        else:
            epoll_set(self.epfd, EPOLL_CTL_DEL, stream.fd, 0, 0)
        stream.reading = on
        return 0

    # --- the loop ---------------------------------------------------------

    cdef int _pump(self, double deadline, int until) except -1:
        """Handle events until ``until`` holds or the monotonic ``deadline`` (< 0: none) passes."""
        cdef epoll_event events[MAX_EVENTS]
        cdef int n, i, timeout_ms
        cdef double left, partial_due
        while True:
            partial_due = self._show_due_partials()
            self._flush_outputs()
            if self._holds(until):
                return 1
            timeout_ms = -1
            if deadline >= 0:
                left = deadline - now(CLOCK_MONOTONIC)
                if left <= 0:
                    return 0
                timeout_ms = <int>(left * 1000) + 1
            if partial_due >= 0:
                left = max(0.0, partial_due - now(CLOCK_MONOTONIC))
                timeout_ms = <int>(left * 1000) + 1 if timeout_ms < 0 else min(timeout_ms, <int>(left * 1000) + 1)
            with nogil:
                n = epoll_wait(self.epfd, events, MAX_EVENTS, timeout_ms)
            if n < 0:
                if errno == EINTR:
                    continue
                raise _os_error(errno, what="epoll_wait")
            for i in range(n):
                self._dispatch(<int>(events[i].data.u64 >> 32), <uint32_t>events[i].data.u64)

    cdef double _show_due_partials(self) except? -2:
        """Show partial lines that waited PARTIAL_SHOW_DELAY for their newline; the next due time, -1: none."""
        cdef double t = now(CLOCK_MONOTONIC), due, next_due = -1
        cdef _Stream stream
        for s in self.streams:
            stream = <_Stream>s
            if stream.partial_since > 0:
                due = stream.partial_since + PARTIAL_SHOW_DELAY
                if due <= t:
                    stream.show_partial()
                elif next_due < 0 or due < next_due:
                    next_due = due
        return next_due

    cdef bint _holds(self, int until):
        if until == UNTIL_EVENT:
            return bool(self.signals or self.exits or self.ready_fds)
        if until == UNTIL_EXITED:
            return (self.sigint_cuts_short and SIGINT in self.signals) or all((<_Worker>w).exited for w in self.workers)
        if until == UNTIL_EOF:
            return all((<_Stream>s).fd < 0 for s in self.streams)
        return False

    cdef int _dispatch(self, int source, uint32_t index) except -1:
        if source == SOURCE_PIPE:
            self._drain(self.streams[index], READS_PER_EVENT)
        elif source == SOURCE_PIDFD:
            self._check_exit(self.workers[index])
        elif source == SOURCE_SIGNALS:
            self._read_signals()
        elif source == SOURCE_CHILDREN:
            self._read_children()
        elif source == SOURCE_CONSOLE:
            (self.out if index == 0 else self.err).flush(self.epfd, False)
        elif source == SOURCE_WATCH:
            if <int>index not in self.ready_fds:
                self.ready_fds.append(<int>index)
        return 0

    cdef int _drain(self, _Stream stream, int reads) except -1:
        """Read up to ``reads`` chunks; on EOF close the stream and flush its last line."""
        cdef char buffer[READ_SIZE]
        cdef ssize_t n
        while reads and stream.fd >= 0:
            n = read(stream.fd, buffer, READ_SIZE)
            if n > 0:
                stream.feed(buffer, n)
                reads -= 1
                continue
            if n < 0 and errno == EINTR:
                continue
            if n < 0 and errno == EAGAIN:
                stream.await_newline(now(CLOCK_MONOTONIC))
                break
            if n < 0:
                raise _os_error(errno, what="read worker output")
            self._read_from(stream, False)
            close(stream.fd)
            stream.fd = -1
            stream.end_partial()
        if stream.console is not None and not self.draining and stream.console.backlog() > CONSOLE_PAUSE_AT:
            stream.console.paused = True
            for other in stream.console.streams:
                self._read_from(other, False)
        return 0

    cdef int _flush_outputs(self) except -1:
        for f in self.files:
            (<_File>f).flush()
        for console in (self.out, self.err):
            (<_Console>console).flush(self.epfd, False)
            if (<_Console>console).paused and (<_Console>console).backlog() < CONSOLE_RESUME_AT:
                (<_Console>console).paused = False
                for stream in (<_Console>console).streams:
                    self._read_from(stream, True)
        return 0

    cdef int _check_exit(self, _Worker worker) except -1:
        """Record a worker's exit; it stays a zombie, keeping its process group id taken, until the group ends."""
        cdef siginfo_t info
        memset(&info, 0, sizeof(info))
        if waitid_worker(worker, &info, WEXITED | WNOHANG | WNOWAIT) < 0:
            raise _os_error(errno, what="waitid")
        if info.si_pid == 0:
            return 0
        worker.ended_at = now(CLOCK_REALTIME)
        worker.exited = True
        worker.code = info.si_code
        worker.status = info.si_status
        if worker.pidfd >= 0:
            epoll_set(self.epfd, EPOLL_CTL_DEL, worker.pidfd, 0, 0)
        # What it wrote before it died is already in its pipes.
        for stream in worker.streams:
            self._drain(stream, 1 << 30)
        self.exits.append(self.workers.index(worker))
        if self.term_on_failure and self.terminated_at == 0 and not (info.si_code == CLD_EXITED and info.si_status == 0):
            self.signal_groups(SIGTERM)
            self.terminated_at = now(CLOCK_MONOTONIC)
        return 0

    cdef int _read_signals(self) except -1:
        cdef signalfd_siginfo info
        cdef ssize_t n
        while True:
            n = read(self.signal_fd, &info, sizeof(info))
            if n == sizeof(info):
                self.signals.append(<int>info.ssi_signo)
            elif n < 0 and errno == EINTR:
                continue
            elif n < 0 and errno == EAGAIN:
                return 0
            else:
                raise _os_error(errno, what="read signalfd")

    cdef int _read_children(self) except -1:
        cdef signalfd_siginfo info
        while read(self.children_fd, &info, sizeof(info)) == sizeof(info):
            pass
        if pidfd_missing:  # one SIGCHLD may stand for several exits
            for w in self.workers:
                if not (<_Worker>w).exited:
                    self._check_exit(w)
        self._reap_adopted()
        return 0

    cdef int _reap_adopted(self) except -1:
        """Reap the exited orphans this subreaper adopted: its children in no session of its own.

        Workers are reaped at the end of the group, the guardian when it is
        told to go; every other descendant of a worker is in a worker's
        session or one it made, never in the launcher's.
        """
        cdef siginfo_t info
        cdef pid_t pid
        mine = {(<_Worker>w).pid for w in self.workers}
        mine.add(self.guardian_pid)
        for pid in children_of_self():
            if pid in mine or getsid(pid) == self.own_sid:
                continue
            memset(&info, 0, sizeof(info))
            if waitid(P_PID, pid, &info, WEXITED | WNOHANG) < 0 and errno != ECHILD:
                raise _os_error(errno, what="waitid")
        return 0

    # --- the Python-facing operations ----------------------------------------

    def wait(self, double timeout, watch_fds):
        """Pump until a worker exits, a handled signal arrives, a watched fd is readable, or ``timeout`` s (< 0: none) pass.

        Returns (signals, exited worker indices, readable fds), each since the last call.
        """
        registered = []
        try:
            for fd in watch_fds:
                epoll_set(self.epfd, EPOLL_CTL_ADD, fd, EPOLLIN, tagged(SOURCE_WATCH, fd))
                registered.append(fd)
            self._pump(now(CLOCK_MONOTONIC) + timeout if timeout >= 0 else -1, UNTIL_EVENT)
        finally:
            for fd in registered:
                epoll_set(self.epfd, EPOLL_CTL_DEL, fd, 0, 0)
        result = (self.signals, self.exits, self.ready_fds)
        self.signals, self.exits, self.ready_fds = [], [], []
        return result

    def all_exited(self) -> bool:
        return all((<_Worker>w).exited for w in self.workers)

    def signal_groups(self, int sig):
        """Send ``sig`` to every worker's process group (a group whose leader already exited too)."""
        for w in self.workers:
            if not (<_Worker>w).reaped and killpg((<_Worker>w).pid, sig) < 0 and errno not in (ESRCH, EPERM):
                raise _os_error(errno, what="killpg")

    def stop(self, int first_signal, double timeout):
        """End the group: ``first_signal`` to every group, up to ``timeout`` s for the workers
        to exit (a SIGINT arriving cuts it short), SIGKILL, wait for every process of the
        groups to be gone, reap, drain the output. Returns the signals read meanwhile."""
        if self.finished:
            return []
        cdef double deadline
        if first_signal == SIGTERM and self.terminated_at > 0:  # the loop sent it at the failure already
            deadline = self.terminated_at + timeout
        else:
            deadline = now(CLOCK_MONOTONIC) + timeout
            self.signal_groups(first_signal)
        self.sigint_cuts_short = True
        self._pump(deadline, UNTIL_EXITED)
        self.sigint_cuts_short = False
        self.signal_groups(SIGKILL)
        # SIGKILL takes effect unless a process is stuck in the kernel; give that the same time again.
        deadline = now(CLOCK_MONOTONIC) + max(timeout, 1.0)
        self._pump(deadline, UNTIL_EXITED)
        while self._members_alive() and self._pump(min(deadline, now(CLOCK_MONOTONIC) + 0.01), UNTIL_DEADLINE) == 0:
            self._reap_adopted()
            if now(CLOCK_MONOTONIC) >= deadline:
                break
        self._reap_workers()
        self._finish_output(1.0)
        self._end_guardian()
        self.finished = True
        signals, self.signals = self.signals, []
        return signals

    cdef bint _members_alive(self) except -1:
        """Whether a process other than a zombie is still in one of the workers' groups."""
        groups = {(<_Worker>w).pid for w in self.workers if not (<_Worker>w).reaped}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rpartition(b")")[2].split()
            except OSError:  # gone meanwhile
                continue
            if fields[0] != b"Z" and int(fields[2]) in groups:
                return True
        return False

    cdef int _reap_workers(self) except -1:
        cdef siginfo_t info
        cdef _Worker worker
        for w in self.workers:
            worker = w
            if worker.reaped:
                continue
            if not worker.exited:  # stuck in the kernel past every deadline: leave it to the guardian
                continue
            if waitid_worker(worker, &info, WEXITED) < 0:
                raise _os_error(errno, what="waitid")
            worker.reaped = True
            if worker.pidfd >= 0:
                close(worker.pidfd)
                worker.pidfd = -1
            self._guardian(LAUNCHER_GUARDIAN_FORGET, worker.pid)
        self._reap_adopted()
        return 0

    cdef int _finish_output(self, double grace) except -1:
        """Read the pipes to their end (a process that left the groups may hold one: ``grace`` s at most), then flush."""
        cdef _Stream stream
        self.draining = True
        for s in self.streams:
            self._read_from(s, True)
        self._pump(now(CLOCK_MONOTONIC) + grace, UNTIL_EOF)
        for s in self.streams:
            stream = <_Stream>s
            if stream.fd >= 0:
                self._drain(stream, 1 << 30)
                if stream.fd >= 0:
                    self._read_from(stream, False)
                    close(stream.fd)
                    stream.fd = -1
                    stream.end_partial()
        for f in self.files:
            (<_File>f).close()
        self.out.flush(self.epfd, True)
        self.err.flush(self.epfd, True)
        return 0

    cdef int _end_guardian(self) except -1:
        """Close the guardian's pipe (it exits, every group forgotten) and reap it."""
        cdef int status
        if self.guardian_fd >= 0:
            close(self.guardian_fd)
            self.guardian_fd = -1
        if self.guardian_pid > 0:
            with nogil:
                while waitpid(self.guardian_pid, &status, 0) < 0 and errno == EINTR:
                    pass
            self.guardian_pid = 0
        if self.restore_subreaper:
            check(prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0), "prctl")
            self.restore_subreaper = False
        return 0

    def exit_status(self, int index):
        """(pid, exitcode or None, signal or None, core dumped, started_at, ended_at)."""
        cdef _Worker worker = self.workers[index]
        if not worker.exited:
            return (worker.pid, None, None, False, worker.started_at, None)
        if worker.code == CLD_EXITED:
            return (worker.pid, worker.status, None, False, worker.started_at, worker.ended_at)
        return (worker.pid, None, worker.status, worker.code == CLD_DUMPED, worker.started_at, worker.ended_at)

    def stderr_tail(self, int index):
        cdef _Worker worker = self.workers[index]
        return worker.stderr.tail_lines() if worker.stderr is not None else []

    def count(self) -> int:
        """How many workers were started."""
        return len(self.workers)

    def pid(self, int index):
        return (<_Worker>self.workers[index]).pid

    def close(self):
        """Release the descriptors (after stop(); a group never stopped is left to the guardian)."""
        for w in self.workers:
            if (<_Worker>w).pidfd >= 0:
                close((<_Worker>w).pidfd)
                (<_Worker>w).pidfd = -1
        for s in self.streams:
            if (<_Stream>s).fd >= 0:
                close((<_Stream>s).fd)
                (<_Stream>s).fd = -1
        if self.guardian_fd >= 0:
            close(self.guardian_fd)
            self.guardian_fd = -1
        if self.children_fd >= 0:
            close(self.children_fd)
            self.children_fd = -1
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1
        if self.restore_mask:
            pthread_sigmask(SIG_SETMASK, &self.mask_before, NULL)
            self.restore_mask = False

    def __dealloc__(self):
        if self.epfd >= 0:
            close(self.epfd)
        if self.children_fd >= 0:
            close(self.children_fd)
        if self.guardian_fd >= 0:
            close(self.guardian_fd)


cdef int waitid_worker(_Worker worker, siginfo_t *info, int options) noexcept:
    if worker.pidfd >= 0:
        return launcher_waitid_pidfd(worker.pidfd, info, options)
    return waitid(P_PID, worker.pid, info, options)


def _use_sigchld_for_exits():
    global pidfd_missing
    pidfd_missing = True
    logging.getLogger("launcher").warning(
        "this kernel has no pidfd_open (Linux < 5.3): worker exits are detected through SIGCHLD"
    )


cdef int fcntl_nonblock(int fd) noexcept nogil:
    cdef int flags = fcntl(fd, F_GETFL)
    if flags < 0:
        return -1
    return fcntl(fd, F_SETFL, flags | O_NONBLOCK)


cdef char **c_strings(list items) except NULL:
    """A NULL-terminated array pointing into ``items`` (bytes without NUL), valid while they live."""
    cdef char **array = <char **>malloc((len(items) + 1) * sizeof(char *))
    if array == NULL:
        raise MemoryError()
    for i, item in enumerate(items):
        if b"\0" in item:
            free(array)
            raise ValueError(f"embedded NUL byte in {item!r}")
        array[i] = <bytes>item
    array[len(items)] = NULL
    return array


def children_of_self():
    """The pids of this process's children, from every thread's children list."""
    pids = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids.extend(int(pid) for pid in f.read().split())
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return pids
