/* The job's cgroup from C: join it, kill it whole, remove it.
 *
 * The forked children use these (a worker joins before it execs, the guardian
 * kills and removes the cgroup when the launcher is gone), so every call is
 * async-signal-safe and works on paths prepared before the fork; the launcher
 * uses the same ones at the end of the group. Cgroup v2 kills with cgroup.kill
 * (Linux 5.14); the v1 freezer freezes the cgroup, so that nothing in it can
 * fork meanwhile, SIGKILLs every process it lists and thaws it.
 */
#ifndef LAUNCHER_SUPERVISOR_CGROUP_H
#define LAUNCHER_SUPERVISOR_CGROUP_H

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

struct launcher_cgroup {
    const char *directory;     /* NULL: the job has no cgroup */
    const char *procs;         /* its cgroup.procs */
    const char *kill;          /* v2: its cgroup.kill; NULL on v1 */
    const char *freezer_state; /* v1: its freezer.state; NULL on v2 */
};

/* How long a v1 cgroup may take to freeze, and the pause between looks at it. */
#define LAUNCHER_CGROUP_FREEZE_TRIES 100
#define LAUNCHER_CGROUP_PAUSE_NS 10000000L

static void launcher_cgroup_pause(void) {
    struct timespec pause = {0, LAUNCHER_CGROUP_PAUSE_NS};
    while (nanosleep(&pause, &pause) != 0 && errno == EINTR) {
    }
}

/* Write text to an existing file (a cgroup's control file). 0, or -1 with errno. */
static int launcher_cgroup_write(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
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
    return launcher_cgroup_write(cgroup->procs, "0");
}

/* Whether a v1 freezer.state reads FROZEN: 1, 0, or -1 with errno. */
static int launcher_cgroup_frozen(const char *state_path) {
    int fd = open(state_path, O_RDONLY | O_CLOEXEC);
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

/* SIGKILL every process a cgroup.procs lists. */
static int launcher_cgroup_kill_listed(const char *procs_path) {
    int fd = open(procs_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    char buffer[4096];
    pid_t pid = 0;
    int digits = 0;
    for (;;) {
        ssize_t got = read(fd, buffer, sizeof buffer);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) {
            int error = errno;
            close(fd);
            errno = error;
            return -1;
        }
        if (got == 0) break;
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
    return 0;
}

/* SIGKILL every process in the cgroup, and those it would fork meanwhile. A
 * cgroup already removed has nothing left to kill. 0, or -1 with errno. */
static int launcher_cgroup_kill(const struct launcher_cgroup *cgroup) {
    if (cgroup->kill) {
        if (launcher_cgroup_write(cgroup->kill, "1") != 0) return errno == ENOENT ? 0 : -1;
        return 0;
    }
    if (launcher_cgroup_write(cgroup->freezer_state, "FROZEN") != 0) return errno == ENOENT ? 0 : -1;
    /* A process stuck in the kernel can keep it FREEZING: kill what is there after a while anyway. */
    for (int tries = 0; tries < LAUNCHER_CGROUP_FREEZE_TRIES; tries++) {
        int frozen = launcher_cgroup_frozen(cgroup->freezer_state);
        if (frozen < 0) return -1;
        if (frozen) break;
        launcher_cgroup_pause();
    }
    int killed = launcher_cgroup_kill_listed(cgroup->procs);
    int error = errno;
    if (launcher_cgroup_write(cgroup->freezer_state, "THAWED") != 0) return -1;
    errno = error;
    return killed;
}

/* Remove the cgroup once its processes are gone, looking up to `tries` times
 * (LAUNCHER_CGROUP_PAUSE_NS apart). 0 once it is gone, -1 with errno (EBUSY:
 * something is still in it). */
static int launcher_cgroup_remove(const struct launcher_cgroup *cgroup, int tries) {
    for (;;) {
        if (rmdir(cgroup->directory) == 0 || errno == ENOENT) return 0;
        if (errno != EBUSY || --tries <= 0) return -1;
        launcher_cgroup_pause();
    }
}

#endif
