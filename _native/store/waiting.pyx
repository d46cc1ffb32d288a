# Time and blocking: the monotonic clock (ms) that the loop and every deadline read, and wait_io,
# which blocks a Python-facing call (Client, Server.wait_count) on a descriptor, its interrupt_fd and
# a deadline at once. Status is what each blocking step returns.

cdef inline int64_t monotonic_ms() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return <int64_t>now.tv_sec * 1000 + now.tv_nsec // 1000000


cdef int64_t deadline_after(double seconds) noexcept nogil:
    return monotonic_ms() + <int64_t>(seconds * 1000)


cdef enum Status:
    OK = 0
    TIMED_OUT = 1
    INTERRUPTED = 2
    PEER_CLOSED = 3
    IO_FAILED = 4  # errno in the caller's err
    BAD_INTERRUPT_FD = 5
    UNEXPECTED_REPLY = 6
    RETRY = 7  # connect: this attempt failed, Client.why says why
    WAIT_TIMED_OUT = 8  # WAIT: the keys did not come and the server confirmed the cancel


cdef int wait_io(int fd, short events, int interrupt_fd, int64_t deadline, int *err) noexcept nogil:
    """Block until fd is ready for events (fd < 0: only sleep), interrupt_fd is readable or the
    monotonic deadline (ms; -1: none) passes."""
    cdef pollfd fds[2]
    cdef int64_t remaining
    cdef int rc
    fds[0].fd = fd
    fds[0].events = events
    fds[1].fd = interrupt_fd
    fds[1].events = POLLIN
    while True:
        fds[0].revents = 0
        fds[1].revents = 0
        remaining = -1
        if deadline >= 0:
            remaining = deadline - monotonic_ms()
            if remaining <= 0:
                remaining = 0
            elif remaining > 0x7fffffff:
                remaining = 0x7fffffff
        rc = poll(fds, 2, <int>remaining)
        if rc < 0:
            if errno == EINTR:
                continue
            err[0] = errno
            return IO_FAILED
        if fds[1].revents & POLLNVAL:
            return BAD_INTERRUPT_FD
        if fds[1].revents:
            return INTERRUPTED
        if fds[0].revents:
            return OK
        if rc == 0 and remaining == 0:
            return TIMED_OUT
