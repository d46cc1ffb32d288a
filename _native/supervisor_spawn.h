/* The two places where the launcher starts a child: a worker (clone, set up,
 * exec) and the guardian (fork, then wait for the launcher to go away).
 *
 * Both children start from a multi-threaded process (a worker's shares its
 * memory, see launcher_clone3_run), so before exec/_exit they make only
 * system calls, on memory prepared before the clone. Every call's result is
 * checked; a worker that cannot be set up or executed reports {stage, errno}
 * through a CLOEXEC pipe, which reads empty in the parent once exec has
 * succeeded.
 */
#ifndef LAUNCHER_SUPERVISOR_SPAWN_H
#define LAUNCHER_SUPERVISOR_SPAWN_H

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "linux_compat.h"
#include "supervisor_cgroup.h"

/* waitid on a pidfd: C++ wants P_PIDFD (newer than many C libraries) as an idtype_t. */
static inline int launcher_waitid_pidfd(int pidfd, siginfo_t *info, int options) {
    return waitid((idtype_t)P_PIDFD, (id_t)pidfd, info, options);
}

#ifndef MPOL_BIND
#define MPOL_BIND 2
#endif

/* Where a worker's set-up failed: names the failing step in the parent's error. */
enum launcher_spawn_stage {
    LAUNCHER_STAGE_NONE = 0,
    LAUNCHER_STAGE_SETUP = 1,    /* signals, session, parent-death signal, stdio, descriptors, limits */
    LAUNCHER_STAGE_CWD = 2,
    LAUNCHER_STAGE_CPUS = 3,
    LAUNCHER_STAGE_MEM_NODES = 4,
    LAUNCHER_STAGE_EXEC = 5,
    LAUNCHER_STAGE_CGROUP = 6,
};

struct launcher_spawn_report {
    int32_t stage;
    int32_t error;
};

struct launcher_spawn_spec {
    char *const *programs; /* NULL-terminated: the paths to try, in PATH order */
    char *const *argv;
    char *const *envp;
    const char *cwd;       /* NULL: the launcher's */
    int stdout_fd;
    int stderr_fd;
    const cpu_set_t *cpus; /* NULL: no affinity */
    size_t cpus_size;
    const unsigned long *mem_nodes; /* NULL: no memory binding */
    unsigned long mem_nodes_bits;
    const struct launcher_cgroup *cgroup; /* NULL: the job has no cgroup */
    const struct rlimit *open_files;      /* RLIMIT_NOFILE to give it; NULL: the launcher's */
    unsigned started;                     /* the workers of its group started before it (see launcher_spawn) */
};

#ifndef SYS_close_range
#define SYS_close_range 436
#endif

/* Close the open fds from first to last as listed in /proc/self/fd, with
 * getdents64 into a buffer on the stack: nothing allocated, so a forked child
 * may call it. Closing fds while listing them is safe: the listing goes by fd number. */
static int launcher_close_listed(unsigned int first, unsigned int last) {
    int dir = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir < 0) return -1;
    uint64_t buffer[512]; /* aligned as the entries are */
    for (;;) {
        long got = launcher_getdents64(dir, buffer, sizeof buffer);
        if (got < 0) {
            int error = errno;
            close(dir);
            errno = error;
            return -1;
        }
        if (got == 0) break;
        for (long offset = 0; offset < got;) {
            const struct launcher_dirent64 *entry = (const struct launcher_dirent64 *)((char *)buffer + offset);
            offset += entry->d_reclen;
            if (entry->d_name[0] < '0' || entry->d_name[0] > '9') continue; /* . and .. */
            unsigned long fd = 0;
            for (const char *digit = entry->d_name; *digit; digit++) fd = fd * 10 + (unsigned long)(*digit - '0');
            if (fd >= first && fd <= last && fd != (unsigned long)dir) close((int)fd);
        }
    }
    close(dir);
    return 0;
}

/* Close fds first..last: close_range (Linux 5.9) where the kernel has it, else
 * the open ones among them (the open-files limit may be a million: closing
 * every number below it would take a million calls). */
static int launcher_close_range(unsigned int first, unsigned int last) {
    if (syscall(SYS_close_range, first, last, 0) == 0) return 0;
    if (errno != ENOSYS) return -1;
    return launcher_close_listed(first, last);
}

/* Close every fd from lowfd up, except keep (-1: none). */
static int launcher_close_from(int lowfd, int keep) {
    if (keep < lowfd) return launcher_close_range((unsigned int)lowfd, ~0U);
    if (keep > lowfd && launcher_close_range((unsigned int)lowfd, (unsigned int)keep - 1) != 0) return -1;
    return launcher_close_range((unsigned int)keep + 1, ~0U);
}

/* dup2 that also works when fd already is target (it must lose CLOEXEC). */
static int launcher_dup_to(int fd, int target) {
    if (fd == target) return fcntl(fd, F_SETFD, 0);
    return dup2(fd, target) < 0 ? -1 : 0;
}

static void launcher_report_and_exit(int report_fd, int stage) {
    struct launcher_spawn_report report = {stage, errno};
    ssize_t ignored = write(report_fd, &report, sizeof report);
    (void)ignored; /* nothing more a dying child can do */
    _exit(127);
}

/* The kernel's struct sigaction (the generic layout: x86_64, aarch64, riscv64). */
struct launcher_kernel_sigaction {
    void (*handler)(int);
    unsigned long flags;
    void (*restorer)(void);
    unsigned long mask;
};

/* Reset what a child must not inherit: the launcher blocks the signals it
 * reads from signalfds, Python ignores SIGPIPE, and GNU make starts its
 * commands with the C library's reserved signals (32, 33) ignored -- which
 * sigaction(3) refuses to touch, so the system call does it. */
static int launcher_default_signals(void) {
    struct launcher_kernel_sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.handler = SIG_DFL;
    for (int sig = 1; sig < NSIG; sig++) {
        if (sig == SIGKILL || sig == SIGSTOP) continue;
        if (syscall(SYS_rt_sigaction, sig, &dfl, NULL, sizeof dfl.mask) != 0) return -1;
    }
    sigset_t none;
    sigemptyset(&none);
    return sigprocmask(SIG_SETMASK, &none, NULL);
}

static void launcher_worker_child(const struct launcher_spawn_spec *spec, pid_t parent, int report_fd, int joined,
                                  const cpu_set_t *launcher_cpus) {
    /* First: whatever it starts from here on is in the job's cgroup too. */
    if (spec->cgroup && !joined && launcher_cgroup_join(spec->cgroup) != 0)
        launcher_report_and_exit(report_fd, LAUNCHER_STAGE_CGROUP);
    if (launcher_default_signals() != 0) launcher_report_and_exit(report_fd, LAUNCHER_STAGE_SETUP);
    if (setsid() < 0) launcher_report_and_exit(report_fd, LAUNCHER_STAGE_SETUP);
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) launcher_report_and_exit(report_fd, LAUNCHER_STAGE_SETUP);
    /* The launcher may have died before the death signal was armed. */
    if (getppid() != parent) _exit(127);
    if (launcher_dup_to(spec->stdout_fd, 1) != 0) launcher_report_and_exit(report_fd, LAUNCHER_STAGE_SETUP);
    if (launcher_dup_to(spec->stderr_fd, 2) != 0) launcher_report_and_exit(report_fd, LAUNCHER_STAGE_SETUP);
    if (launcher_close_from(3, report_fd) != 0) launcher_report_and_exit(report_fd, LAUNCHER_STAGE_SETUP);
    if (spec->open_files && setrlimit(RLIMIT_NOFILE, spec->open_files) != 0)
        launcher_report_and_exit(report_fd, LAUNCHER_STAGE_SETUP);
    if (spec->cwd && chdir(spec->cwd) != 0) launcher_report_and_exit(report_fd, LAUNCHER_STAGE_CWD);
    if (spec->cpus && sched_setaffinity(0, spec->cpus_size, spec->cpus) != 0)
        launcher_report_and_exit(report_fd, LAUNCHER_STAGE_CPUS);
    /* Born on the launcher's CPU alone: the worker may use what the launcher may. */
    if (!spec->cpus && launcher_cpus && sched_setaffinity(0, sizeof *launcher_cpus, launcher_cpus) != 0)
        launcher_report_and_exit(report_fd, LAUNCHER_STAGE_CPUS);
    /* The kernel reads maxnode - 1 bits of the mask. */
    if (spec->mem_nodes && syscall(SYS_set_mempolicy, MPOL_BIND, spec->mem_nodes, spec->mem_nodes_bits + 1) != 0)
        launcher_report_and_exit(report_fd, LAUNCHER_STAGE_MEM_NODES);
    /* execvp's rule: go on past a missing candidate, remember any other error. */
    int error = ENOENT;
    for (char *const *program = spec->programs; *program; program++) {
        execve(*program, spec->argv, spec->envp);
        if (errno != ENOENT && errno != ENOTDIR) {
            if (error == ENOENT || error == ENOTDIR) error = errno;
        }
    }
    errno = error;
    launcher_report_and_exit(report_fd, LAUNCHER_STAGE_EXEC);
}

#ifndef SYS_clone3
#define SYS_clone3 435
#endif
#define LAUNCHER_CLONE_VM 0x100ULL
#define LAUNCHER_CLONE_VFORK 0x4000ULL
#define LAUNCHER_CLONE_INTO_CGROUP 0x200000000ULL

/* clone3's arguments, <linux/sched.h>'s struct clone_args up to the cgroup (Linux 5.7). */
struct launcher_clone_args {
    uint64_t flags;
    uint64_t pidfd;
    uint64_t child_tid;
    uint64_t parent_tid;
    uint64_t exit_signal;
    uint64_t stack;
    uint64_t stack_size;
    uint64_t tls;
    uint64_t set_tid;
    uint64_t set_tid_size;
    uint64_t cgroup;
};

#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
/* A worker is started as posix_spawn starts one, sharing the launcher's memory
 * (CLONE_VM) while the calling thread waits for its exec (CLONE_VFORK): fork()
 * copies the page tables of the whole launcher and the child's exec tears the
 * copy down again, about a millisecond of each attempt per worker. Such a
 * child must not return through the caller's frames, which the parent still
 * needs, so it starts on a stack of its own and calls fn(arg) there; fn never
 * returns. Returns the child's pid, or -errno. Only x86_64 has this stub;
 * elsewhere workers are forked, and so they are under AddressSanitizer (make
 * asan), whose stack bookkeeping cannot follow a child running on a stack in
 * the parent's frame: there it checks the same child code after a fork. */
#define LAUNCHER_SPAWN_SHARES_MEMORY 1
#ifdef __cplusplus
extern "C"
#endif
__attribute__((visibility("hidden"))) long launcher_clone3_run(struct launcher_clone_args *args, size_t size,
                                                               void (*fn)(void *), void *arg);
__asm__(
    ".pushsection .text\n"
    ".globl launcher_clone3_run\n"
    ".hidden launcher_clone3_run\n"
    ".type launcher_clone3_run, @function\n"
    ".p2align 4\n"
    "launcher_clone3_run:\n"
    "    mov %rcx, %r8\n" /* arg: syscall clobbers rcx */
    "    mov $435, %eax\n"
    "    syscall\n"
    "    test %rax, %rax\n"
    "    jz 1f\n"
    "    ret\n"
    "1:  xor %ebp, %ebp\n" /* the child, on its own stack: the outermost frame */
    "    mov %r8, %rdi\n"
    "    call *%rdx\n"
    "    mov $60, %eax\n" /* exit(127), were fn ever to return */
    "    mov $127, %edi\n"
    "    syscall\n"
    "    hlt\n"
    ".size launcher_clone3_run, .-launcher_clone3_run\n"
    ".popsection\n");
#else
#define LAUNCHER_SPAWN_SHARES_MEMORY 0
#endif

/* What the child of launcher_spawn needs, whether it was born in the job's cgroup, and the CPUs the
 * launcher may use when it was born on the launcher's alone (NULL otherwise). */
struct launcher_child {
    const struct launcher_spawn_spec *spec;
    pid_t parent;
    int report_fd;
    int joined;
    const cpu_set_t *launcher_cpus;
};

static void launcher_child_main(void *child) {
    const struct launcher_child *c = (const struct launcher_child *)child;
    launcher_worker_child(c->spec, c->parent, c->report_fd, c->joined, c->launcher_cpus);
}

/* Start the worker's child, born in the job's cgroup where the kernel can (cgroup v2, Linux 5.7): a
 * process that moves itself in takes the hierarchy's write lock, which waits out an RCU grace period, 6 to
 * 20 ms at the start of each attempt. Where clone3 fails (Linux < 5.3, Docker's default seccomp profile, a
 * cgroup it cannot clone into) a plain fork(), and the child joins by itself, which reports the error if
 * there is one. Returns the pid in the parent; ``stack`` is the child's when it shares the memory. */
static pid_t launcher_clone_child(struct launcher_child *child, char *stack, size_t stack_size) {
    const struct launcher_cgroup *cgroup = child->spec->cgroup;
    int dir = cgroup && cgroup->version == 2 ? open(cgroup->directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC) : -1;
    struct launcher_clone_args args;
    memset(&args, 0, sizeof args);
    args.exit_signal = SIGCHLD;
    if (dir >= 0) {
        args.flags = LAUNCHER_CLONE_INTO_CGROUP;
        args.cgroup = (uint64_t)dir;
    }
    child->joined = dir >= 0;
    pid_t pid = -1;
#if LAUNCHER_SPAWN_SHARES_MEMORY
    args.flags |= LAUNCHER_CLONE_VM | LAUNCHER_CLONE_VFORK;
    args.stack = (uint64_t)(uintptr_t)stack;
    args.stack_size = stack_size;
    long result = launcher_clone3_run(&args, sizeof args, launcher_child_main, child);
    if (result >= 0) pid = (pid_t)result;
#else
    (void)stack;
    (void)stack_size;
    if (dir >= 0) {
        pid = (pid_t)syscall(SYS_clone3, &args, sizeof args);
        if (pid == 0) launcher_child_main(child);
    }
#endif
    if (dir >= 0) close(dir); /* the child's copy goes with the descriptors it closes */
    if (pid >= 0) return pid;
    child->joined = 0;
    pid = fork();
    if (pid == 0) launcher_child_main(child);
    return pid;
}

/* Where a worker is born. The kernel places a new process on the least loaded CPU it may use; once each
 * of the launcher's other CPUs runs a worker the group just started, that may be behind a worker whose
 * start-up keeps its CPU busy, while this thread's CPU idles until the child's exec (a CPU that was busy
 * until a moment ago does not pull waiting tasks when it goes idle): the worker then starts 5-10 ms late,
 * the last of a 2-worker group on 2 CPUs at nearly every start. From then on the child is born on this
 * thread's CPU, which is free until its exec: this thread takes that CPU alone as its mask, which the
 * child inherits and resets before exec, and takes back ``*launcher_cpus`` once the child has exec'd.
 * Returns whether it did; nothing is changed where the masks cannot be read or set (over 1024 CPUs). */
static int launcher_pin_to_this_cpu(unsigned started, cpu_set_t *launcher_cpus) {
    if (sched_getaffinity(0, sizeof *launcher_cpus, launcher_cpus) != 0) return 0;
    if (started + 1 < (unsigned)CPU_COUNT(launcher_cpus)) return 0;
    int cpu = sched_getcpu();
    if (cpu < 0 || cpu >= CPU_SETSIZE || !CPU_ISSET(cpu, launcher_cpus)) return 0;
    cpu_set_t here;
    CPU_ZERO(&here);
    CPU_SET(cpu, &here);
    return sched_setaffinity(0, sizeof here, &here) == 0;
}

/* Start and exec one worker. Returns its pid once exec has succeeded; -1 with
 * errno set and *stage naming the failed step otherwise (the child is reaped). */
static pid_t launcher_spawn(const struct launcher_spawn_spec *spec, int *stage) {
    int report[2];
    /* the child's stack when it shares the launcher's memory: this thread waits meanwhile */
    alignas(16) char stack[64 * 1024];
    *stage = LAUNCHER_STAGE_SETUP;
    if (pipe2(report, O_CLOEXEC) != 0) return -1;
    /* No launcher signal handler may run in the child before it resets them. */
    sigset_t all, previous;
    sigfillset(&all);
    int error = pthread_sigmask(SIG_SETMASK, &all, &previous);
    if (error != 0) {
        close(report[0]);
        close(report[1]);
        errno = error;
        return -1;
    }
    struct launcher_child child = {spec, getpid(), report[1], 0, NULL};
    cpu_set_t launcher_cpus;
    int born_here = launcher_pin_to_this_cpu(spec->started, &launcher_cpus);
    if (born_here) child.launcher_cpus = &launcher_cpus;
    pid_t pid = launcher_clone_child(&child, stack, sizeof stack);
    int fork_errno = errno;
    /* Back to the CPUs it had a moment ago. Only a cpuset that changed meanwhile to none of them refuses
     * this, and such a change has given the thread the cpuset's CPUs already. */
    if (born_here) (void)sched_setaffinity(0, sizeof launcher_cpus, &launcher_cpus);
    error = pthread_sigmask(SIG_SETMASK, &previous, NULL);
    close(report[1]);
    if (pid < 0 || error != 0) {
        close(report[0]);
        errno = pid < 0 ? fork_errno : error;
        return -1;
    }
    struct launcher_spawn_report failure;
    ssize_t got;
    do {
        got = read(report[0], &failure, sizeof failure);
    } while (got < 0 && errno == EINTR);
    int read_errno = errno;
    close(report[0]);
    if (got == 0) {
        *stage = LAUNCHER_STAGE_NONE;
        return pid;
    }
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
    }
    if (got == (ssize_t)sizeof failure) {
        *stage = failure.stage;
        errno = failure.error;
    } else {
        errno = got < 0 ? read_errno : EPIPE;
    }
    return -1;
}

/* The guardian: holds the read end of a pipe whose write end only the
 * launcher has. One guardian serves every group a launcher starts: forking a
 * launcher-sized process, its copy-on-write faults and the child's exit cost
 * milliseconds of every restart, so it is forked once. The launcher writes a
 * record for each process group it starts or reaps (ADD, FORGET) and for each
 * job cgroup it makes (CGROUP, with the cgroup's version and directory),
 * removes (CGROUP_FORGET), or cannot remove and leaves to the guardian
 * (CGROUP_RELEASE: a process of it stuck in the kernel, or a group closed
 * without being stopped; the guardian kills it whole and removes it once
 * empty). When the pipe reads EOF (the launcher is gone, however it went) the
 * guardian SIGKILLs every group and cgroup it still knows, removes the
 * cgroups once empty, and exits. */
#define LAUNCHER_GUARDIAN_ADD 1
#define LAUNCHER_GUARDIAN_FORGET 2
#define LAUNCHER_GUARDIAN_CGROUP 3
#define LAUNCHER_GUARDIAN_CGROUP_FORGET 4
#define LAUNCHER_GUARDIAN_CGROUP_RELEASE 5
#define LAUNCHER_GUARDIAN_CAPACITY 65536
/* The cgroups it can hold at once: the running group's and those left stuck in the kernel. */
#define LAUNCHER_GUARDIAN_CGROUPS 64
/* A cgroup record's directory: NUL-terminated, in a block of this size after the record, which makes the
 * whole PIPE_BUF (4096) bytes: a write of at most PIPE_BUF to a pipe is never split, so records that two
 * threads write (a group dropped on another thread) never interleave. */
#define LAUNCHER_GUARDIAN_PATH_SIZE (4096 - 8)
/* How long the guardian waits for a killed cgroup to empty before it leaves it (LAUNCHER_CGROUP_PAUSE_NS each). */
#define LAUNCHER_GUARDIAN_CGROUP_TRIES 1000

struct launcher_guardian_record {
    int32_t op;
    int32_t value; /* ADD, FORGET: the process group; CGROUP: the cgroup's version */
};
static_assert(sizeof(struct launcher_guardian_record) + LAUNCHER_GUARDIAN_PATH_SIZE <= PIPE_BUF,
              "a cgroup record is written whole");

struct launcher_guardian_cgroup {
    char directory[LAUNCHER_GUARDIAN_PATH_SIZE];
    int version; /* 0: a free slot */
};

/* The guardian's state, in the forked child's own copy of this memory. */
static pid_t launcher_guardian_groups[LAUNCHER_GUARDIAN_CAPACITY];
static struct launcher_guardian_cgroup launcher_guardian_cgroups[LAUNCHER_GUARDIAN_CGROUPS];

static void launcher_guardian_kill_cgroup(const struct launcher_guardian_cgroup *slot) {
    struct launcher_cgroup cgroup = {slot->directory, slot->version};
    launcher_cgroup_kill(&cgroup);
}

/* Kill a cgroup whole, remove it once empty (or past the tries), and forget it. */
static void launcher_guardian_end_cgroup(struct launcher_guardian_cgroup *slot) {
    struct launcher_cgroup cgroup = {slot->directory, slot->version};
    launcher_cgroup_kill(&cgroup);
    launcher_cgroup_remove(&cgroup, LAUNCHER_GUARDIAN_CGROUP_TRIES);
    slot->version = 0;
}

/* Apply one record (its path block, for a cgroup's, follows it in memory). */
static void launcher_guardian_apply(const struct launcher_guardian_record *record, size_t *count) {
    const char *directory = (const char *)(record + 1);
    if (record->op == LAUNCHER_GUARDIAN_ADD && *count < LAUNCHER_GUARDIAN_CAPACITY) {
        launcher_guardian_groups[(*count)++] = record->value;
    } else if (record->op == LAUNCHER_GUARDIAN_FORGET) {
        for (size_t j = 0; j < *count; j++) {
            if (launcher_guardian_groups[j] == record->value) {
                launcher_guardian_groups[j] = launcher_guardian_groups[--*count];
                break;
            }
        }
    } else if (record->op == LAUNCHER_GUARDIAN_CGROUP) {
        for (size_t j = 0; j < LAUNCHER_GUARDIAN_CGROUPS; j++) {
            if (launcher_guardian_cgroups[j].version == 0) {
                memcpy(launcher_guardian_cgroups[j].directory, directory, LAUNCHER_GUARDIAN_PATH_SIZE);
                launcher_guardian_cgroups[j].directory[LAUNCHER_GUARDIAN_PATH_SIZE - 1] = '\0';
                launcher_guardian_cgroups[j].version = record->value;
                break;
            }
        }
    } else if (record->op == LAUNCHER_GUARDIAN_CGROUP_FORGET || record->op == LAUNCHER_GUARDIAN_CGROUP_RELEASE) {
        for (size_t j = 0; j < LAUNCHER_GUARDIAN_CGROUPS; j++) {
            struct launcher_guardian_cgroup *slot = &launcher_guardian_cgroups[j];
            if (slot->version != 0 && strncmp(slot->directory, directory, LAUNCHER_GUARDIAN_PATH_SIZE) == 0) {
                if (record->op == LAUNCHER_GUARDIAN_CGROUP_RELEASE)
                    launcher_guardian_end_cgroup(slot);
                else
                    slot->version = 0;
                break;
            }
        }
    }
}

static size_t launcher_guardian_record_size(const struct launcher_guardian_record *record) {
    int with_path = record->op == LAUNCHER_GUARDIAN_CGROUP || record->op == LAUNCHER_GUARDIAN_CGROUP_FORGET ||
                    record->op == LAUNCHER_GUARDIAN_CGROUP_RELEASE;
    return sizeof *record + (with_path ? LAUNCHER_GUARDIAN_PATH_SIZE : 0);
}

static void launcher_guardian_child(int read_fd) {
    /* Its own session: a terminal's Ctrl-C or hang-up for the launcher's
     * foreground group never reaches it; it ignores the rest of what a job
     * scheduler sends, so only the pipe decides when it acts. */
    if (setsid() < 0) _exit(1);
    prctl(PR_SET_NAME, (unsigned long)"launcher-guard", 0, 0, 0);
    struct sigaction ignore;
    memset(&ignore, 0, sizeof ignore);
    ignore.sa_handler = SIG_IGN;
    const int ignored[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGPIPE};
    for (size_t i = 0; i < sizeof ignored / sizeof ignored[0]; i++) {
        if (sigaction(ignored[i], &ignore, NULL) != 0) _exit(1);
    }
    sigset_t none;
    sigemptyset(&none);
    if (sigprocmask(SIG_SETMASK, &none, NULL) != 0) _exit(1);
    if (dup2(read_fd, 0) < 0) _exit(1);
    if (launcher_close_from(1, -1) != 0) _exit(1);
    size_t count = 0;
    /* room for several records, each at most PIPE_BUF bytes; aligned as they are */
    alignas(8) static char buffer[4 * PIPE_BUF];
    size_t pending = 0; /* bytes read and not yet applied: a record may be split across reads */
    for (;;) {
        ssize_t got = read(0, buffer + pending, sizeof buffer - pending);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) break; /* EOF: the launcher is gone */
        pending += (size_t)got;
        size_t used = 0;
        while (pending - used >= sizeof(struct launcher_guardian_record)) {
            const struct launcher_guardian_record *record = (const struct launcher_guardian_record *)(buffer + used);
            size_t size = launcher_guardian_record_size(record);
            if (pending - used < size) break;
            launcher_guardian_apply(record, &count);
            used += size;
        }
        pending -= used;
        memmove(buffer, buffer + used, pending);
    }
    for (size_t j = 0; j < count; j++) kill(-launcher_guardian_groups[j], SIGKILL);
    /* Every cgroup killed before any is waited for: none runs on while another empties. */
    for (size_t j = 0; j < LAUNCHER_GUARDIAN_CGROUPS; j++) {
        if (launcher_guardian_cgroups[j].version != 0) launcher_guardian_kill_cgroup(&launcher_guardian_cgroups[j]);
    }
    for (size_t j = 0; j < LAUNCHER_GUARDIAN_CGROUPS; j++) {
        if (launcher_guardian_cgroups[j].version != 0) launcher_guardian_end_cgroup(&launcher_guardian_cgroups[j]);
    }
    _exit(0);
}

/* Start the guardian; *write_fd receives the launcher's end of its pipe (CLOEXEC). */
static pid_t launcher_guardian_start(int *write_fd) {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) return -1;
    sigset_t all, previous;
    sigfillset(&all);
    int error = pthread_sigmask(SIG_SETMASK, &all, &previous);
    if (error != 0) {
        close(fds[0]);
        close(fds[1]);
        errno = error;
        return -1;
    }
    pid_t pid = fork();
    if (pid == 0) launcher_guardian_child(fds[0]);
    int fork_errno = errno;
    error = pthread_sigmask(SIG_SETMASK, &previous, NULL);
    close(fds[0]);
    if (pid < 0 || error != 0) {
        close(fds[1]);
        errno = pid < 0 ? fork_errno : error;
        return -1;
    }
    *write_fd = fds[1];
    return pid;
}

#endif
