"""Run a command where the launcher cannot create the cgroups it would: they are mounted read-only.

    sup_readonly_cgroups.py v2|all COMMAND ARGS...    (needs CAP_SYS_ADMIN, e.g. root)

The command runs in a mount namespace of its own in which the cgroup2 mounts (v2: the launcher
then uses the v1 freezer) or every cgroup mount (all: no cgroup, the launcher's fallback) are
read-only, as on a machine whose cgroups the user may not write. Nothing changes outside.
"""
import ctypes
import os
import sys

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x1, 0x20, 0x1000, 0x4000, 0x40000
libc = ctypes.CDLL(None, use_errno=True)


def check(result, what):
    if result != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def cgroup_mounts(kinds):
    """Mount points of the given filesystem types, from /proc/self/mountinfo."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype in kinds:
                points.append(fields[4])
    return points


def main(which, command):
    kinds = {"v2": ("cgroup2",), "all": ("cgroup2", "cgroup")}[which]
    check(libc.unshare(CLONE_NEWNS), "unshare")
    check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    for point in cgroup_mounts(kinds):
        check(libc.mount(None, os.fsencode(point), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None), f"remount {point}")
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
