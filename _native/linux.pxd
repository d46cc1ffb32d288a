# The Linux C surface shared by the native modules: what Cython's own
# libc/posix declarations do not cover. Add to the section a call belongs to.
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from posix.types cimport pid_t, sigset_t
from posix.signal cimport siginfo_t


# --- event loop -----------------------------------------------------------

cdef extern from "<sys/epoll.h>" nogil:
    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL

    ctypedef union epoll_data_t:
        int fd
        uint64_t u64

    struct epoll_event:
        uint32_t events
        epoll_data_t data

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)

cdef extern from "<sys/eventfd.h>" nogil:
    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK
    int eventfd(unsigned int initval, int flags)

cdef extern from "<poll.h>" nogil:
    enum:
        POLLIN
        POLLOUT
        POLLNVAL
        POLLERR
    struct pollfd:
        int fd
        short events
        short revents
    ctypedef unsigned long nfds_t
    int poll(pollfd *fds, nfds_t nfds, int timeout)

cdef extern from "<fcntl.h>" nogil:
    enum:
        O_CLOEXEC
        O_NONBLOCK
    int pipe2(int pipefd[2], int flags)


# --- signals and processes ------------------------------------------------

cdef extern from "<signal.h>" nogil:
    int pthread_sigmask(int how, const sigset_t *set, sigset_t *oldset)

cdef extern from "<sched.h>" nogil:
    ctypedef struct cpu_set_t:
        pass
    size_t CPU_ALLOC_SIZE(int count)
    cpu_set_t *CPU_ALLOC(int count)
    void CPU_FREE(cpu_set_t *set)
    void CPU_ZERO_S(size_t size, cpu_set_t *set)
    void CPU_SET_S(int cpu, size_t size, cpu_set_t *set)

cdef extern from "<sys/wait.h>" nogil:
    enum:
        CLD_EXITED
        CLD_KILLED
        CLD_DUMPED

cdef extern from "<sys/signalfd.h>" nogil:
    enum:
        SFD_CLOEXEC
        SFD_NONBLOCK
    struct signalfd_siginfo:
        uint32_t ssi_signo
    int signalfd(int fd, const sigset_t *mask, int flags)

cdef extern from "<sys/prctl.h>" nogil:
    enum:
        PR_SET_PDEATHSIG
        PR_SET_CHILD_SUBREAPER
        PR_GET_CHILD_SUBREAPER
        PR_SET_NAME
    int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4, unsigned long arg5)

cdef extern from "linux_compat.h" nogil:
    enum:
        P_PIDFD
    int launcher_pidfd_open(pid_t pid, unsigned int flags)
    int launcher_pidfd_send_signal(int pidfd, int sig, siginfo_t *info, unsigned int flags)

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_attr_t:
        pass
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_mutexattr_t:
        pass
    int pthread_create(pthread_t *thread, const pthread_attr_t *attr,
                       void *(*start)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t thread, void **retval)
    pthread_t pthread_self()
    int pthread_kill(pthread_t thread, int sig)
    int pthread_setname_np(pthread_t thread, const char *name)
    int pthread_mutex_init(pthread_mutex_t *mutex, const pthread_mutexattr_t *attr)
    int pthread_mutex_destroy(pthread_mutex_t *mutex)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)


# --- sockets --------------------------------------------------------------

cdef extern from "<sys/random.h>" nogil:
    ssize_t getrandom(void *buf, size_t buflen, unsigned int flags)

cdef extern from "<sys/socket.h>" nogil:
    ctypedef uint32_t socklen_t
    ctypedef unsigned short sa_family_t
    enum:
        AF_UNSPEC
        AF_INET
        AF_INET6
        SOCK_STREAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        SOL_SOCKET
        SO_REUSEADDR
        SO_ERROR
        SOMAXCONN
        MSG_NOSIGNAL
        MSG_DONTWAIT
    struct sockaddr:
        pass
    struct sockaddr_storage:
        sa_family_t ss_family
    int socket(int domain, int type, int protocol)
    int bind(int fd, const sockaddr *addr, socklen_t len)
    int listen(int fd, int backlog)
    int accept4(int fd, sockaddr *addr, socklen_t *len, int flags)
    int connect(int fd, const sockaddr *addr, socklen_t len)
    int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
    int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
    int getsockname(int fd, sockaddr *addr, socklen_t *len)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)

cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_TCP
        INET6_ADDRSTRLEN
    struct in_addr:
        pass
    struct sockaddr_in:
        uint16_t sin_port
        in_addr sin_addr
    struct in6_addr:
        pass
    struct sockaddr_in6:
        uint16_t sin6_port
        in6_addr sin6_addr
    uint16_t ntohs(uint16_t)
    uint16_t htons(uint16_t)

cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY

cdef extern from "<arpa/inet.h>" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)

cdef extern from "<netdb.h>" nogil:
    enum:
        AI_PASSIVE
    struct addrinfo:
        int ai_flags
        int ai_family
        int ai_socktype
        int ai_protocol
        socklen_t ai_addrlen
        sockaddr *ai_addr
        addrinfo *ai_next
    int getaddrinfo(const char *node, const char *service, const addrinfo *hints, addrinfo **res)
    void freeaddrinfo(addrinfo *res)
    const char *gai_strerror(int errcode)

cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_IPV6
        IPV6_V6ONLY

cdef extern from "<endian.h>" nogil:
    uint32_t htole32(uint32_t)
    uint32_t le32toh(uint32_t)
    uint64_t htole64(uint64_t)
    uint64_t le64toh(uint64_t)
