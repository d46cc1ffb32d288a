/* The job's cgroup from C: join it, kill it whole, remove it.
 *
 * The forked children use these (a worker joins before it execs, the guardian
 * kills and removes the cgroup when the launcher is gone), so every call is
 * async-signal-safe, on a path prepared before the fork; the launcher uses the
 * same ones at the end of the group. Cgroup v2 kills with cgroup.kill (Linux
 * 5.14); the v1 freezer freezes the cgroup, so that nothing in it can fork
 * meanwhile, SIGKILLs every process it and the cgroups below it list, and
 * thaws it. Cgroups below the job's (a launcher among the workers makes its
 * own) are removed with it.
 */
#ifndef LAUNCHER_SUPERVISOR_CGROUP_H
#define LAUNCHER_SUPERVISOR_CGROUP_H

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "linux_compat.h"

struct launcher_cgroup {
    const char *directory; /* the cgroup's directory */
    int version;           /* 2: cgroup.kill; 1: the v1 freezer */
};

/* How long a v1 cgroup may take to freeze, and the pause between looks at a cgroup. */
#define LAUNCHER_CGROUP_FREEZE_TRIES 100
#define LAUNCHER_CGROUP_PAUSE_NS 10000000L

static void launcher_cgroup_pause(void) {
    struct timespec pause = {0, LAUNCHER_CGROUP_PAUSE_NS};
    while (nanosleep(&pause, &pause) != 0 && errno == EINTR) {
    }
}

/* Write text to a control file of the cgroup open as dir. 0, or -1 with errno. */
static int launcher_cgroup_write(int dir, const char *name, const char *text) {
    int fd = openat(dir, name, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    size_t size = strlen(text);
    ssize_t written;
    do {
        written = write(fd, text, size);
    } while (written < 0 && errno == EINTR);
    int error = errno;
    close(fd);
    if (written != (ssize_t)size) {
        errno = written < 0 ? error : EIO;
        return -1;
    }
    return 0;
}

/* Move the calling process into the cgroup ("0" names the writer); its children follow it. */
static int launcher_cgroup_join(const struct launcher_cgroup *cgroup) {
    int dir = open(cgroup->directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir < 0) return -1;
    int joined = launcher_cgroup_write(dir, "cgroup.procs", "0");
    int error = errno;
    close(dir);
    errno = error;
    return joined;
}

/* Call visit(dir, name) for each cgroup directly below the one open as dir. */
static int launcher_cgroup_each_below(int dir, void (*visit)(int dir, const char *name)) {
    uint64_t buffer[512]; /* aligned as the entries are */
    for (;;) {
        long got = launcher_getdents64(dir, buffer, sizeof buffer);
        if (got < 0) return -1;
        if (got == 0) return 0;
        for (long offset = 0; offset < got;) {
            const struct launcher_dirent64 *entry = (const struct launcher_dirent64 *)((char *)buffer + offset);
            offset += entry->d_reclen;
            if (entry->d_type == DT_DIR && strcmp(entry->d_name, ".") != 0 && strcmp(entry->d_name, "..") != 0)
                visit(dir, entry->d_name);
        }
    }
}

static void launcher_cgroup_kill_listed(int dir);

/* A v1 cgroup below the job's may be frozen on its own (the guardian of a
 * launcher among the workers froze it, then died): thawed after its processes
 * are killed, or they would never get to die. */
static void launcher_cgroup_kill_listed_below(int parent, const char *name) {
    int below = openat(parent, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (below < 0) return;
    launcher_cgroup_kill_listed(below);
    launcher_cgroup_write(below, "freezer.state", "THAWED");
    close(below);
}

/* SIGKILL every process the v1 cgroup (open as dir) and the cgroups below it list. */
static void launcher_cgroup_kill_listed(int dir) {
    int fd = openat(dir, "cgroup.procs", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        char buffer[4096];
        pid_t pid = 0;
        int digits = 0;
        for (;;) {
            ssize_t got = read(fd, buffer, sizeof buffer);
            if (got < 0 && errno == EINTR) continue;
            if (got <= 0) break;
            for (ssize_t i = 0; i < got; i++) { /* one pid a line; a line may span two reads */
                if (buffer[i] >= '0' && buffer[i] <= '9') {
                    pid = pid * 10 + (buffer[i] - '0');
                    digits = 1;
                } else {
                    if (digits) kill(pid, SIGKILL);
                    pid = 0;
                    digits = 0;
                }
            }
        }
        if (digits) kill(pid, SIGKILL);
        close(fd);
    }
    launcher_cgroup_each_below(dir, launcher_cgroup_kill_listed_below);
}

/* Whether a v1 freezer.state reads FROZEN: 1, 0, or -1 with errno. */
static int launcher_cgroup_frozen(int dir) {
    int fd = openat(dir, "freezer.state", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    char state[16];
    ssize_t got;
    do {
        got = read(fd, state, sizeof state - 1);
    } while (got < 0 && errno == EINTR);
    int error = errno;
    close(fd);
    if (got < 0) {
        errno = error;
        return -1;
    }
    state[got] = '\0';
    return strncmp(state, "FROZEN", 6) == 0;
}

/* SIGKILL every process in the cgroup and below it, and those they would fork
 * meanwhile. A cgroup already removed has nothing left to kill. 0, or -1 with errno. */
static int launcher_cgroup_kill(const struct launcher_cgroup *cgroup) {
    int dir = open(cgroup->directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir < 0) return errno == ENOENT ? 0 : -1;
    int result = 0;
    if (cgroup->version == 2) {
        result = launcher_cgroup_write(dir, "cgroup.kill", "1");
    } else if ((result = launcher_cgroup_write(dir, "freezer.state", "FROZEN")) == 0) {
        /* A process stuck in the kernel can keep it FREEZING: kill what is there after a while anyway. */
        for (int tries = 0; tries < LAUNCHER_CGROUP_FREEZE_TRIES && launcher_cgroup_frozen(dir) == 0; tries++)
            launcher_cgroup_pause();
        launcher_cgroup_kill_listed(dir);
        result = launcher_cgroup_write(dir, "freezer.state", "THAWED");
    }
    int error = errno;
    close(dir);
    errno = error;
    return result;
}

/* Remove the (empty) cgroup named name below the one open as parent, and those below it first. */
static void launcher_cgroup_remove_below(int parent, const char *name) {
    int dir = openat(parent, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir < 0) return;
    launcher_cgroup_each_below(dir, launcher_cgroup_remove_below);
    close(dir);
    unlinkat(parent, name, AT_REMOVEDIR);
}

/* Remove the cgroup, and those below it, once their processes are gone, looking
 * up to `tries` times (LAUNCHER_CGROUP_PAUSE_NS apart). 0 once it is gone, -1
 * with errno (EBUSY: something is still in it). */
static int launcher_cgroup_remove(const struct launcher_cgroup *cgroup, int tries) {
    for (;;) {
        int dir = open(cgroup->directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dir < 0) return errno == ENOENT ? 0 : -1;
        launcher_cgroup_each_below(dir, launcher_cgroup_remove_below);
        close(dir);
        if (rmdir(cgroup->directory) == 0 || errno == ENOENT) return 0;
        if (errno != EBUSY || --tries <= 0) return -1;
        launcher_cgroup_pause();
    }
}

#endif
