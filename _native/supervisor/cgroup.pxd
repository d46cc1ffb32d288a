# The state of the job's cgroup: the C side (supervisor_cgroup.h) and a JobCgroup.

cdef extern from "supervisor_cgroup.h" nogil:
    struct launcher_cgroup:
        const char *directory
        const char *procs
        const char *kill
        const char *freezer_state
    int launcher_cgroup_kill(const launcher_cgroup *cgroup)
    int launcher_cgroup_remove(const launcher_cgroup *cgroup, int tries)


cdef class JobCgroup:
    cdef readonly int version  # 2: killed with cgroup.kill; 1: with the v1 freezer
    cdef readonly str directory
    cdef str path  # as /proc/<pid>/cgroup names it
    cdef bytes c_directory, c_procs, c_kill, c_freezer_state  # what ``files`` points into
    cdef launcher_cgroup files

    cdef object holds(self, pid_t pid)
    cdef bint populated(self) except -1
    cdef int kill(self) except -1
    cdef bint remove(self) except -1


cdef JobCgroup create_job_cgroup()
