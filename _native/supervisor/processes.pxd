# The state of the process lifecycle: the child side's C interface
# (supervisor_spawn.h), what wait() saw, a worker's exit record, a worker, and
# the Supervisor.

cdef extern from "supervisor_spawn.h" nogil:
    enum:
        LAUNCHER_STAGE_NONE
        LAUNCHER_STAGE_SETUP
        LAUNCHER_STAGE_CWD
        LAUNCHER_STAGE_CPUS
        LAUNCHER_STAGE_MEM_NODES
        LAUNCHER_STAGE_EXEC
        LAUNCHER_STAGE_CGROUP
        LAUNCHER_GUARDIAN_ADD
        LAUNCHER_GUARDIAN_FORGET
        LAUNCHER_GUARDIAN_CGROUP
        LAUNCHER_GUARDIAN_CGROUP_FORGET
        LAUNCHER_GUARDIAN_CGROUP_RELEASE
        LAUNCHER_GUARDIAN_CAPACITY
        LAUNCHER_GUARDIAN_PATH_SIZE
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
        const launcher_cgroup *cgroup
        const rlimit *open_files
        unsigned started
    struct launcher_guardian_record:
        int32_t op
        int32_t value
    pid_t launcher_spawn(const launcher_spawn_spec *spec, int *stage)
    pid_t launcher_guardian_start(int *write_fd)
    int launcher_waitid_pidfd(int pidfd, siginfo_t *info, int options)


cdef class ExitRecord:
    cdef readonly pid_t pid
    cdef readonly object exitcode  # int when it exited, else None
    cdef readonly object signal  # the number of the signal that killed it, else None
    cdef readonly bint core_dumped
    cdef readonly double started_at
    cdef readonly object ended_at  # float once it exited, else None
    cdef readonly list stderr_tail


cdef class Wakeup:
    cdef readonly list signals  # handled signals, in the order read
    cdef readonly list exited  # indices of the workers that exited
    cdef readonly list ready_fds  # watched descriptors found readable


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

    cdef ExitRecord record(self)


cdef class Supervisor:
    cdef int epfd
    cdef int signal_fd  # the SignalWatch's, not owned; -1 without one
    cdef int children_fd  # SIGCHLD, for adopted orphans
    cdef sigset_t mask_before
    cdef bint restore_mask
    cdef sigaction_t children_action_before
    cdef bint restore_children_action  # SIGCHLD is redirected to this thread (exits come through it)
    cdef bint restore_subreaper
    cdef pid_t guardian_pid  # the process's guardian (process_guardian()), when this group was made
    cdef pid_t own_sid
    cdef JobCgroup cgroup  # None: the job has none
    cdef frozenset children_before  # this process's children when the group was made: not the job's
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

    cdef _Console _console(self, int fd, int index)
    cdef int _stream(self, _Worker worker, int index, int which, OutputRoute route, list parent_ends) except -1
    cdef _File _filtered_file(self, str path)
    cdef int _read_from(self, _Stream stream, bint on) except -1
    cdef int _pump(self, double deadline, int until) except -1
    cdef double _show_due_partials(self) except? -2
    cdef bint _holds(self, int until)
    cdef int _dispatch(self, int source, uint32_t index, uint32_t events) except -1
    cdef int _drain(self, _Stream stream, int reads) except -1
    cdef int _flush_outputs(self) except -1
    cdef int _check_exit(self, _Worker worker) except -1
    cdef int _read_signals(self) except -1
    cdef int _read_children(self) except -1
    cdef int _reap_adopted(self) except -1
    cdef bint _adopted(self, pid_t pid) except -1
    cdef list _adopted_children(self)
    cdef list _adopted_alive(self)
    cdef int _kill_job(self) except -1
    cdef int _kill_adopted(self) except -1
    cdef bint _job_alive(self) except -1
    cdef bint _members_alive(self) except -1
    cdef int _reap_workers(self) except -1
    cdef int _finish_output(self, double grace) except -1
    cdef int _leave_cgroup(self) except -1
    cdef int _release(self) except -1
