/* Linux calls that older C libraries do not wrap: reached through syscall(2). */
#ifndef LAUNCHER_LINUX_COMPAT_H
#define LAUNCHER_LINUX_COMPAT_H

#include <signal.h>
#include <stdint.h>
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

/* One entry of what getdents64 reads (glibc declares neither before 2.30). */
struct launcher_dirent64 {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

static inline long launcher_getdents64(int fd, void *buffer, size_t size) {
    return syscall(SYS_getdents64, fd, buffer, size);
}

#endif
