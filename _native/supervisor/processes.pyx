# The process lifecycle: spawn a worker, the guardian and the subreaper, the
# epoll loop that wakes on exits, output, signals and watched fds, the stop
# (signal, wait, SIGKILL, reap, drain), and what the agent reads: Wakeup, ExitRecord.

cdef enum:
    READ_SIZE = 65536
    READS_PER_EVENT = 16  # then let the other sources have a turn
    MAX_EVENTS = 64

# What the loop waits for before it returns.
cdef enum Until:
    UNTIL_EVENT = 1  # a worker exit, a handled signal or a watched fd
    UNTIL_EXITED = 2  # every worker exited, or SIGINT arrived
    UNTIL_EOF = 3  # every output pipe closed
    UNTIL_DEADLINE = 4

# The kernel has no pidfd_open (before Linux 5.3): a worker's exit is noticed
# through SIGCHLD instead, and waited for by pid, which is safe because a
# worker stays a zombie (its pid taken) until its group ends.
cdef bint pidfd_missing = False

# The open-files limit this process started with, which the workers get back:
# the store raises the soft limit to the hard one for its connections. Read
# when this module is imported, which launcher.agent and launcher.api do before
# they start a store.
cdef rlimit open_files_at_start
check(getrlimit(RLIMIT_NOFILE, &open_files_at_start), "getrlimit(RLIMIT_NOFILE)")


# The guardian (supervisor_spawn.h) of every group this process starts: forked with the first and kept
# until the process exits, so that a restart forks nothing (the fork of a launcher-sized process, the
# copy-on-write faults after it and the child's exit took some 4 ms of a restart on two cores).
cdef int guardian_fd = -1  # the write end of its pipe
cdef pid_t guardian_pid = 0


cdef pid_t process_guardian() except -1:
    """This process's guardian, started if it has none yet or the one it had is gone (killed)."""
    global guardian_fd, guardian_pid
    cdef pollfd pipe_end
    cdef int status
    if guardian_pid > 0:
        pipe_end.fd = guardian_fd
        pipe_end.events = 0
        pipe_end.revents = 0
        if check(poll(&pipe_end, 1, 0), "poll") and pipe_end.revents & POLLERR:  # no reader: it died
            waitpid(guardian_pid, &status, WNOHANG)  # reaped here unless someone else did
            c_close(guardian_fd)
            guardian_fd, guardian_pid = -1, 0
    if guardian_pid == 0:
        guardian_pid = check(launcher_guardian_start(&guardian_fd), "cannot start the guardian")
    return guardian_pid


def end_process_guardian():
    """Close the guardian's pipe and wait for it to exit, having killed whatever of the job it still knew
    of: at the process's exit."""
    global guardian_fd, guardian_pid
    cdef int status
    cdef pid_t pid = guardian_pid
    if pid == 0:
        return
    c_close(guardian_fd)
    guardian_fd, guardian_pid = -1, 0
    with nogil:
        while waitpid(pid, &status, 0) < 0 and errno == EINTR:
            pass


def forget_parent_guardian():
    """In a child forked from this process (os.fork, multiprocessing): the guardian is the parent's, and its
    pipe must not stay open here, or the guardian would not see the parent go while the child lives."""
    global guardian_fd, guardian_pid
    if guardian_fd >= 0:
        c_close(guardian_fd)
    guardian_fd, guardian_pid = -1, 0


atexit.register(end_process_guardian)
os.register_at_fork(after_in_child=forget_parent_guardian)


cdef int guardian_send(const char *data, size_t size) except -1:
    if write_all(guardian_fd, data, size) < 0:
        raise os_error(errno, "cannot reach the guardian")
    return 0


cdef int guardian_group(int op, pid_t pgid) except -1:
    """Tell the guardian of a process group to kill (LAUNCHER_GUARDIAN_ADD) or no longer to (FORGET)."""
    cdef launcher_guardian_record record
    record.op = op
    record.value = pgid
    return guardian_send(<const char *>&record, sizeof(record))


cdef int guardian_cgroup(int op, JobCgroup cgroup) except -1:
    """Tell the guardian of a job cgroup: to kill (LAUNCHER_GUARDIAN_CGROUP), removed (CGROUP_FORGET), or
    to kill whole and remove once empty (CGROUP_RELEASE)."""
    cdef launcher_guardian_record record
    if len(cgroup.c_directory) >= LAUNCHER_GUARDIAN_PATH_SIZE:
        raise os_error(ENAMETOOLONG, "cannot tell the guardian of the job's cgroup", cgroup.directory)
    record.op = op
    record.value = cgroup.version
    data = (<char *>&record)[:sizeof(record)] + cgroup.c_directory.ljust(LAUNCHER_GUARDIAN_PATH_SIZE, b"\0")
    return guardian_send(data, len(data))


cdef class ExitRecord:
    """One worker as the supervisor saw it: ``ended_at`` is None while it has not exited.

    An exit has ``exitcode`` set, a death by signal ``signal`` (and maybe
    ``core_dumped``); times are seconds since the epoch. ``stderr_tail``
    holds its last stderr lines (at most 20) when stderr was kept.
    """


cdef class Wakeup:
    """What ``Supervisor.wait`` saw: handled signals read, workers that exited (by index), watched fds readable."""


cdef class _Worker:
    """One started worker: its process, its exit, its output streams."""

    def __cinit__(self):
        self.pidfd = -1
        self.streams = []

    cdef ExitRecord record(self):
        cdef ExitRecord record = ExitRecord.__new__(ExitRecord)
        record.pid = self.pid
        record.started_at = self.started_at
        record.stderr_tail = self.stderr.tail_lines() if self.stderr is not None else []
        if self.exited:
            record.ended_at = self.ended_at
            if self.code == CLD_EXITED:
                record.exitcode = self.status
            else:
                record.signal = self.status
                record.core_dumped = self.code == CLD_DUMPED
        return record


cdef class Supervisor:
    """The native half of a WorkerGroup: processes, pipes, signals, the job's cgroup and the guardian.

    Once constructed it is the subreaper of the workers' orphans, has SIGCHLD
    blocked and read from a signalfd (and, without pidfd_open, sent on to this
    thread from any other that takes it), has made the job's cgroup where it
    can, and has told the process's guardian (started with the first group,
    kept for the next) of it; a failed construction leaves none of that
    behind but the guardian. ``close()`` undoes it too.
    """

    def __cinit__(self):
        self.epfd = -1
        self.children_fd = -1
        self.signal_fd = -1

    def __init__(self, int signal_fd=-1, bint term_on_failure=False):
        cdef sigset_t children
        cdef int error, subreaper = 0
        if threading.current_thread() is not threading.main_thread():
            # a worker's parent-death signal fires when the thread that forked it ends
            raise RuntimeError("workers must be started from the main thread")
        self.workers = []
        self.streams = []
        self.files = []
        self.signals = []
        self.exits = []
        self.ready_fds = []
        self.own_sid = check(getsid(0), "getsid")
        self.signal_fd = signal_fd
        self.term_on_failure = term_on_failure
        self.children_before = frozenset(children_of_self())
        try:
            if kernel_lacks_pidfd():
                # exits come through SIGCHLD, which a thread that does not block it would take and discard
                redirect_to_this_thread(SIGCHLD, &self.children_action_before)
                self.restore_children_action = True
            self.cgroup = create_job_cgroup()
            self.epfd = check(epoll_create1(EPOLL_CLOEXEC), "epoll_create1")
            if signal_fd >= 0:
                epoll_set(self.epfd, EPOLL_CTL_ADD, signal_fd, EPOLLIN, tagged(SOURCE_SIGNALS, 0))
            sigemptyset(&children)
            sigaddset(&children, SIGCHLD)
            error = pthread_sigmask(SIG_BLOCK, &children, &self.mask_before)
            if error:
                raise os_error(error, "pthread_sigmask")
            self.restore_mask = not sigismember(&self.mask_before, SIGCHLD)
            self.children_fd = check(signalfd(-1, &children, SFD_NONBLOCK | SFD_CLOEXEC), "signalfd")
            epoll_set(self.epfd, EPOLL_CTL_ADD, self.children_fd, EPOLLIN, tagged(SOURCE_CHILDREN, 0))
            self.out = self._console(1, 0)
            self.err = self._console(2, 1)
            check(prctl(PR_GET_CHILD_SUBREAPER, <unsigned long>&subreaper, 0, 0, 0), "prctl")
            if not subreaper:
                check(prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl")
                self.restore_subreaper = True
            self.guardian_pid = process_guardian()
            if self.cgroup is not None:
                guardian_cgroup(LAUNCHER_GUARDIAN_CGROUP, self.cgroup)
        except BaseException:
            self._release()
            raise

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

    def spawn(self, list programs, list argv, list envp, cwd, cpus, mem_nodes, OutputRoute stdout not None,
              OutputRoute stderr not None):
        """Start one worker; returns its index. Its output goes where ``stdout`` and ``stderr`` say."""
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
        cdef rlimit open_files
        child_fds[0] = child_fds[1] = -1
        parent_ends = []
        memset(&spec, 0, sizeof(spec))
        try:
            for i, route in enumerate((stdout, stderr)):
                child_fds[i] = self._stream(worker, index, i, route, parent_ends)
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
            spec.started = index
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
            if self.cgroup is not None:
                spec.cgroup = &self.cgroup.c_cgroup
            check(getrlimit(RLIMIT_NOFILE, &open_files), "getrlimit(RLIMIT_NOFILE)")
            if open_files.rlim_cur != min(open_files_at_start.rlim_cur, open_files.rlim_max):
                open_files.rlim_cur = min(open_files_at_start.rlim_cur, open_files.rlim_max)
                spec.open_files = &open_files
            with nogil:
                pid = launcher_spawn(&spec, &stage)
            if pid < 0:
                error = errno
                program = os.fsdecode(argv[0])
                if stage == LAUNCHER_STAGE_CGROUP:
                    raise os_error(error, "cannot join the job's cgroup", self.cgroup.directory)
                if stage == LAUNCHER_STAGE_CWD:
                    raise os_error(error, "cannot change to the working directory", os.fsdecode(cwd))
                if stage == LAUNCHER_STAGE_CPUS:
                    where = sorted(cpus) if cpus is not None else sorted(os.sched_getaffinity(0))
                    raise os_error(error, f"cannot bind to CPUs {where}", program)
                if stage == LAUNCHER_STAGE_MEM_NODES:
                    raise os_error(error, f"cannot bind memory to NUMA nodes {sorted(mem_nodes)}", program)
                if stage == LAUNCHER_STAGE_EXEC:
                    raise os_error(error, "cannot execute", program)
                raise os_error(error, "cannot start", program)
            worker.started_at = now(CLOCK_REALTIME)
            worker.pid = pid
            try:
                if not pidfd_missing:
                    worker.pidfd = check(launcher_pidfd_open(pid, 0), "pidfd_open")
                # From here on the group dies with the launcher.
                guardian_group(LAUNCHER_GUARDIAN_ADD, pid)
            except BaseException:
                # Not one of the group's, so nothing else would end it: kill its process group, reap it.
                killpg(pid, SIGKILL)
                with nogil:
                    while waitpid(pid, NULL, 0) < 0 and errno == EINTR:
                        pass
                if worker.pidfd >= 0:
                    c_close(worker.pidfd)
                    worker.pidfd = -1
                raise
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
                    c_close(fd)
            for fd in parent_ends:  # only left when the spawn failed
                c_close(fd)
            free(c_programs)
            free(c_argv)
            free(c_envp)
            if cpu_set != NULL:
                CPU_FREE(cpu_set)

    cdef int _stream(self, _Worker worker, int index, int which, OutputRoute route, list parent_ends) except -1:
        """Prepare one output stream; returns the fd the child gets."""
        cdef int fds[2]
        cdef int fd, error
        if not route.piped:
            if route.file is None:
                return check(c_open(b"/dev/null", O_RDWR | O_CLOEXEC), "/dev/null")
            fd = c_open(os.fsencode(route.file), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            if fd < 0:
                raise os_error(errno, None, route.file)
            return fd
        cdef _Stream stream = _Stream()
        stream.worker = index
        worker.streams.append(stream)
        if which == 1:
            worker.stderr = stream
        if route.file is not None:
            stream.file = _File(route.file)
        if route.console:
            stream.console = self.out if which == 0 else self.err
        stream.prefix = route.prefix
        if route.filtered is not None:
            stream.filtered = self._filtered_file(route.filtered)
            for needle in route.filters:
                stream.filters.push_back(needle)
        stream.keep_tail = route.keep_tail
        check(pipe2(fds, O_CLOEXEC), "pipe2")
        parent_ends.append(fds[0])
        stream.fd = fds[0]
        if fcntl_nonblock(fds[0]) < 0:
            error = errno
            c_close(fds[1])
            raise os_error(error, "fcntl")
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
                raise os_error(errno, "epoll_wait")
            for i in range(n):
                self._dispatch(<int>(events[i].data.u64 >> 32), <uint32_t>events[i].data.u64, events[i].events)

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

    cdef int _dispatch(self, int source, uint32_t index, uint32_t events) except -1:
        if source == SOURCE_PIPE:
            self._drain(self.streams[index], READS_PER_EVENT)
        elif source == SOURCE_PIDFD:
            self._check_exit(self.workers[index])
        elif source == SOURCE_SIGNALS:
            self._read_signals()
        elif source == SOURCE_CHILDREN:
            self._read_children()
        elif source == SOURCE_CONSOLE:
            console = <_Console>(self.out if index == 0 else self.err)
            if events & (EPOLLERR | EPOLLHUP):
                # its reader is gone; epoll reports that whatever it was asked, at every turn
                console._break(self.epfd)
            else:
                console.flush(self.epfd, False)
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
                raise os_error(errno, "read worker output")
            self._read_from(stream, False)
            c_close(stream.fd)
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
            raise os_error(errno, "waitid")
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
        cdef bint failed = not (info.si_code == CLD_EXITED and info.si_status == 0)
        if failed and self.term_on_failure and self.terminated_at == 0:
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
                raise os_error(errno, "read signalfd")

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
        """Reap the exited processes this subreaper adopted from the workers, and no other child."""
        cdef siginfo_t info
        cdef pid_t pid
        for pid in self._adopted_children():
            memset(&info, 0, sizeof(info))
            if waitid(P_PID, pid, &info, WEXITED | WNOHANG) < 0 and errno != ECHILD:
                raise os_error(errno, "waitid")
        return 0

    cdef bint _adopted(self, pid_t pid) except -1:
        """Whether a child of this process that it did not start descends from the workers.

        Its session tells first: a session is inherited and cannot be joined,
        only made, so a process in a worker's session descends from it, and
        one in the launcher's does not. A process in a session it made (or an
        ancestor made) is in the job's cgroup if it descends from a worker.
        Where the cgroup cannot tell (none, or v1 once the process exited), it
        is taken for the job's unless this process already had it when the
        group was made: the one guess, wrong only for a child that the program
        embedding the launcher starts in a session of its own while the group
        runs, from the main thread or a thread that has ended since.
        """
        cdef pid_t sid = getsid(pid)
        if sid < 0:  # reaped meanwhile
            return False
        if any(sid == (<_Worker>w).pid for w in self.workers):
            return True
        if sid == self.own_sid:
            return False
        held = self.cgroup.holds(pid) if self.cgroup is not None else None
        if held is not None:
            return held
        return pid not in self.children_before

    cdef list _adopted_children(self):
        """The children this process adopted from the workers, exited or not."""
        started = {(<_Worker>w).pid for w in self.workers}
        started.add(self.guardian_pid)
        return [pid for pid in adoptable_children() if pid not in started and self._adopted(pid)]

    cdef list _adopted_alive(self):
        """The adopted processes that have not exited."""
        alive = []
        for pid in self._adopted_children():
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    if f.read().rpartition(b")")[2].split()[0] != b"Z":
                        alive.append(pid)
            except FileNotFoundError:  # reaped meanwhile
                continue
        return alive

    cdef int _kill_job(self) except -1:
        """SIGKILL every process of the job: the job's cgroup whole; without one, the workers'
        process groups and what the launcher adopted from them."""
        self.signal_groups(SIGKILL)
        if self.cgroup is not None:
            self.cgroup.kill()
        self._kill_adopted()
        return 0

    cdef int _kill_adopted(self) except -1:
        """Without a cgroup, SIGKILL what the launcher adopted from the workers (their groups had SIGKILL)."""
        if self.cgroup is None:
            for pid in self._adopted_alive():
                if kill(pid, SIGKILL) < 0 and errno != ESRCH:
                    raise os_error(errno, "kill")
        return 0

    cdef bint _job_alive(self) except -1:
        """Whether a process of the job has not exited yet (stuck in the kernel, or SIGKILL on its way)."""
        if self.cgroup is not None:
            return self.cgroup.populated()
        return self._members_alive() or bool(self._adopted_alive())

    # --- the Python-facing operations ----------------------------------------

    def wait(self, double timeout, watch_fds):
        """Pump until a worker exits, a handled signal arrives, a watched fd is readable,
        or ``timeout`` s (< 0: none) pass.

        Returns what happened since the last call.
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
        cdef Wakeup woke = Wakeup.__new__(Wakeup)
        woke.signals, woke.exited, woke.ready_fds = self.signals, self.exits, self.ready_fds
        self.signals, self.exits, self.ready_fds = [], [], []
        return woke

    def all_exited(self) -> bool:
        return all((<_Worker>w).exited for w in self.workers)

    def signal_groups(self, int sig):
        """Send ``sig`` to every worker's process group (a group whose leader already exited too)."""
        for w in self.workers:
            if not (<_Worker>w).reaped and killpg((<_Worker>w).pid, sig) < 0 and errno not in (ESRCH, EPERM):
                raise os_error(errno, "killpg")

    def stop(self, int first_signal, double timeout, before_kill=None):
        """End the group: ``first_signal`` to every group, up to ``timeout`` s for the workers
        to exit (a SIGINT arriving cuts it short), SIGKILL, wait for every process of the
        groups to be gone, reap, drain the output. Returns the signals read meanwhile.

        ``before_kill(indices)`` is called with the workers still running at the deadline
        (not when a SIGINT cut it short), before their SIGKILL."""
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
        running = [i for i, w in enumerate(self.workers) if not (<_Worker>w).exited]
        try:
            if before_kill is not None and running and SIGINT not in self.signals:
                before_kill(running)
        finally:
            self._kill_job()
        # SIGKILL takes effect unless a process is stuck in the kernel; give that the same time again.
        deadline = now(CLOCK_MONOTONIC) + max(timeout, 1.0)
        self._pump(deadline, UNTIL_EXITED)
        while self._job_alive() and self._pump(min(deadline, now(CLOCK_MONOTONIC) + 0.01), UNTIL_DEADLINE) == 0:
            self._kill_adopted()  # orphaned meanwhile by the processes that died
            self._reap_adopted()
            if now(CLOCK_MONOTONIC) >= deadline:
                break
        self._reap_workers()
        self._finish_output(1.0)
        self._leave_cgroup()
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
                raise os_error(errno, "waitid")
            worker.reaped = True
            if worker.pidfd >= 0:
                c_close(worker.pidfd)
                worker.pidfd = -1
            guardian_group(LAUNCHER_GUARDIAN_FORGET, worker.pid)
        self._reap_adopted()
        return 0

    cdef int _finish_output(self, double grace) except -1:
        """Read the pipes to their end, then flush.

        A process that left the groups may hold a pipe: ``grace`` s at most for those.
        """
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
                    c_close(stream.fd)
                    stream.fd = -1
                    stream.end_partial()
        for f in self.files:
            (<_File>f).close()
        self.out.flush(self.epfd, True)
        self.err.flush(self.epfd, True)
        return 0

    cdef int _leave_cgroup(self) except -1:
        """Remove the job's cgroup; what it still holds (a process stuck in the kernel, a group closed
        without being stopped) is the guardian's to kill, and the cgroup to remove once empty."""
        cgroup, self.cgroup = self.cgroup, None
        if cgroup is None:
            return 0
        removed = cgroup.remove()
        if self.guardian_pid > 0:  # it was told of the cgroup
            try:
                guardian_cgroup(LAUNCHER_GUARDIAN_CGROUP_FORGET if removed else LAUNCHER_GUARDIAN_CGROUP_RELEASE,
                                cgroup)
            except BrokenPipeError:  # it was killed: nothing is left to tell
                pass
        return 0

    def exit_record(self, int index) -> ExitRecord:
        """Worker ``index`` as seen so far; its stderr tail is complete once stop() drained the output."""
        return (<_Worker>self.workers[index]).record()

    def count(self) -> int:
        """How many workers were started."""
        return len(self.workers)

    def pid(self, int index):
        return (<_Worker>self.workers[index]).pid

    def close(self):
        """Release the descriptors, the subreaper and the signal mask (after stop(); a group never
        stopped is killed: its process groups here, its cgroup whole by the guardian)."""
        self._release()

    cdef int _release(self) except -1:
        """Undo what __init__ acquired, as far as it got, and close the workers' descriptors.

        Every step is taken; the first that failed is raised afterwards.
        """
        cdef int error
        failure = None
        for w in self.workers:
            if (<_Worker>w).pidfd >= 0:
                c_close((<_Worker>w).pidfd)
                (<_Worker>w).pidfd = -1
        for s in self.streams:
            if (<_Stream>s).fd >= 0:
                c_close((<_Stream>s).fd)
                (<_Stream>s).fd = -1
        if self.children_fd >= 0:
            c_close(self.children_fd)
            self.children_fd = -1
        if self.epfd >= 0:
            c_close(self.epfd)
            self.epfd = -1
        try:  # the cgroup is empty after a failed construction; a group never stopped is killed
            if not self.finished:
                self.signal_groups(SIGKILL)
            self._leave_cgroup()
        except OSError as leaving:
            failure = leaving
        if self.restore_subreaper:
            self.restore_subreaper = False
            if prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) < 0 and failure is None:
                failure = os_error(errno, "prctl")
        if self.restore_children_action:
            self.restore_children_action = False
            if sigaction(SIGCHLD, &self.children_action_before, NULL) < 0 and failure is None:
                failure = os_error(errno, "sigaction")
        if self.restore_mask:
            self.restore_mask = False
            error = pthread_sigmask(SIG_SETMASK, &self.mask_before, NULL)
            if error and failure is None:
                failure = os_error(error, "pthread_sigmask")
        if failure is not None:
            raise failure
        return 0

    def __dealloc__(self):
        # Dropped neither stopped nor closed, in the process that made it (not a copy in a forked child):
        # killed as close() kills it (what a collected cycle already cleared, None here, is the guardian's
        # when the process exits).
        made_here = self.guardian_pid > 0 and self.guardian_pid == guardian_pid
        if made_here and not self.finished and self.workers is not None:
            for w in self.workers:
                if not (<_Worker>w).reaped:
                    killpg((<_Worker>w).pid, SIGKILL)
        if made_here and self.cgroup is not None:
            try:
                guardian_cgroup(LAUNCHER_GUARDIAN_CGROUP_RELEASE, self.cgroup)
            except OSError:
                pass  # the guardian is gone: nothing is left to tell
        if self.epfd >= 0:
            c_close(self.epfd)
        if self.children_fd >= 0:
            c_close(self.children_fd)


cdef int waitid_worker(_Worker worker, siginfo_t *info, int options) noexcept:
    if worker.pidfd >= 0:
        return launcher_waitid_pidfd(worker.pidfd, info, options)
    return waitid(P_PID, worker.pid, info, options)


cdef bint kernel_lacks_pidfd() except -1:
    """Whether pidfd_open is missing (Linux < 5.3); the first time it is, one warning says so."""
    global pidfd_missing
    if pidfd_missing:
        return True
    cdef int fd = launcher_pidfd_open(getpid(), 0)
    if fd >= 0:
        c_close(fd)
        return False
    if errno != ENOSYS:
        raise os_error(errno, "pidfd_open")
    pidfd_missing = True
    logging.getLogger("launcher").warning(
        "this kernel has no pidfd_open (Linux < 5.3): worker exits are detected through SIGCHLD"
    )
    return True


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


def adoptable_children():
    """The pids of the children of this process's main thread, the only one that adopts orphans
    (the kernel gives them to a subreaper's first live thread): a child that another thread
    started is that thread's and the program's."""
    with open(f"/proc/self/task/{getpid()}/children") as f:
        return [int(pid) for pid in f.read().split()]


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
