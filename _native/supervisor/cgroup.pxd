# The state of the job's cgroup: the C side (supervisor_cgroup.h) and a JobCgroup.

cdef extern from "supervisor_cgroup.h" nogil:
    struct launcher_cgroup:
        const char *directory
        int version
    int launcher_cgroup_kill(const launcher_cgroup *cgroup)
    int launcher_cgroup_remove(const launcher_cgroup *cgroup, int tries)


cdef class JobCgroup:
    cdef readonly int version  # 2: killed with cgroup.kill; 1: with the v1 freezer
    cdef readonly str directory
    cdef str path  # as /proc/<pid>/cgroup names it
    cdef bytes c_directory  # what ``c_cgroup`` points into
    cdef launcher_cgroup c_cgroup  # for the C side

    cdef object holds(self, pid_t pid)
    cdef bint populated(self) except -1
    cdef int kill(self) except -1
    cdef bint remove(self) except -1


cdef JobCgroup create_job_cgroup()
