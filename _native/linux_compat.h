/* Linux calls that older C libraries do not wrap: reached through syscall(2). */
#ifndef LAUNCHER_LINUX_COMPAT_H
#define LAUNCHER_LINUX_COMPAT_H

#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef P_PIDFD
#define P_PIDFD 3
#endif

static inline int launcher_pidfd_open(pid_t pid, unsigned int flags) {
    return (int)syscall(SYS_pidfd_open, pid, flags);
}

static inline int launcher_pidfd_send_signal(int pidfd, int sig, siginfo_t *info, unsigned int flags) {
    return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, info, flags);
}

#endif
