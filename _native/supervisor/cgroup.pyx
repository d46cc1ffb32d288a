# The job's cgroup: made below the launcher's own (cgroup v2 with cgroup.kill,
# else the v1 freezer) where the launcher may make one. Every worker joins it
# before it execs, so every descendant is in it, whatever session or process
# group it makes; it is killed whole at the end of the group (and by the
# guardian if the launcher dies), then removed.

cdef unsigned long cgroup_serial = 0  # tells this process's job cgroups apart


cdef class JobCgroup:
    """A cgroup for one worker group; ``create_job_cgroup()`` makes one."""

    def __cinit__(self, int version, str directory, str path):
        self.version = version
        self.directory = directory
        self.path = path
        self.c_directory = os.fsencode(directory)
        self.c_cgroup.directory = self.c_directory
        self.c_cgroup.version = version

    cdef object holds(self, pid_t pid):
        """Whether process ``pid`` is in this cgroup; None when the cgroup cannot tell: v1 forgets the
        cgroup of a process that exited (v2 keeps it until the process is reaped)."""
        try:
            if self.version == 1:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    if f.read().rpartition(b")")[2].split()[0] == b"Z":
                        return None
            with open(f"/proc/{pid}/cgroup") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:  # reaped meanwhile
            return False
        for line in lines:
            hierarchy, controllers, path = line.split(":", 2)
            if (hierarchy == "0") if self.version == 2 else ("freezer" in controllers.split(",")):
                return path == self.path
        return False

    cdef bint populated(self) except -1:
        """Whether a process that has not exited is still in it."""
        if self.version == 2:
            with open(self.directory + "/cgroup.events") as f:
                return "populated 1" in f.read().splitlines()
        with open(self.directory + "/cgroup.procs") as f:
            return bool(f.read().strip())

    cdef int kill(self) except -1:
        """SIGKILL every process in it, and what they fork meanwhile."""
        cdef int result
        with nogil:
            result = launcher_cgroup_kill(&self.c_cgroup)
        if result < 0:
            raise os_error(errno, "cannot kill the job's cgroup", self.directory)
        return 0

    cdef bint remove(self) except -1:
        """Remove it: True once it is gone, False while a process is still in it."""
        if launcher_cgroup_remove(&self.c_cgroup, 1) == 0:
            return True
        if errno == EBUSY:
            return False
        raise os_error(errno, "cannot remove the job's cgroup", self.directory)


cdef JobCgroup create_job_cgroup():
    """A new cgroup below the launcher's own: v2 where the kernel has cgroup.kill, else the v1
    freezer; None where the launcher cannot make one (no write access: not root and no cgroup
    delegated to the user, a read-only cgroupfs; neither hierarchy mounted)."""
    global cgroup_serial
    cdef int version
    own = {}  # hierarchy version: the launcher's cgroup there, as /proc/self/cgroup names it
    try:
        with open("/proc/self/cgroup") as f:
            for line in f.read().splitlines():
                hierarchy, controllers, path = line.split(":", 2)
                if hierarchy == "0":
                    own[2] = path
                elif "freezer" in controllers.split(","):
                    own[1] = path
    except FileNotFoundError:  # a kernel without cgroups
        return None
    mounts = {2: [], 1: []}  # hierarchy version: (the cgroup at the mount's root, the mount point)
    with open("/proc/self/mountinfo") as f:
        for line in f.read().splitlines():
            fields = line.split()
            fstype, options = fields[fields.index("-") + 1], fields[-1].split(",")
            if fstype == "cgroup2":
                mounts[2].append((fields[3], fields[4]))
            elif fstype == "cgroup" and "freezer" in options:
                mounts[1].append((fields[3], fields[4]))
    for version in (2, 1):
        path = own.get(version)
        for root, point in mounts[version]:
            if path is None or not (root == "/" or path == root or path.startswith(root + "/")):
                continue
            parent = point + (path if root == "/" else path[len(root):]).rstrip("/")
            while True:
                name = f"launcher-{os.getpid()}-{cgroup_serial}"
                cgroup_serial += 1
                try:
                    os.mkdir(f"{parent}/{name}", 0o755)
                except FileExistsError:  # left by an earlier process of the same pid
                    continue
                except OSError:
                    break
                cgroup = JobCgroup(version, f"{parent}/{name}", f"{path.rstrip('/')}/{name}")
                if version == 2 and not os.path.exists(cgroup.directory + "/cgroup.kill"):  # Linux < 5.14
                    os.rmdir(cgroup.directory)
                    break
                return cgroup
    return None
