# The server's event loop: one epoll loop on its own thread (run_loop), over a Loop that holds every
# connection, the store's data and the listening sockets. It reads requests, executes the complete
# ones (store/commands.pyx), sends the replies, accepts connections and closes slow or bad ones.
# It never takes the GIL; Python calls reach the Loop only under its lock (store/server.pyx).

cdef enum:
    OUTPUT_HIGH_WATER = 4 * 1024 * 1024
    KEEP_BUFFER = 1024 * 1024  # buffers grown past this are released once empty (the client's too)
    SCRATCH_SIZE = 256 * 1024
    READ_BUDGET = 4 * 1024 * 1024  # bytes read from one connection per loop pass, for fairness
    ACCEPT_BUDGET = 64
    MAX_EVENTS = 256
    SWEEP_INTERVAL_MS = 1000


# --- making and releasing a Loop ------------------------------------------

cdef Loop *new_loop() except NULL:
    """A Loop that holds nothing yet: no descriptor, no thread, no buffer (Server.__init__ opens them)."""
    cdef Loop *L = new Loop()
    L.running = False
    L.stopping = False
    L.accepting = True
    L.epfd = -1
    L.wake_fd = -1
    L.reserve_fd = -1
    L.partial_conns = 0
    L.last_sweep = 0
    L.dirty = NULL
    L.dead = NULL
    L.scratch = NULL
    return L


cdef void free_conn(Conn *c) noexcept nogil:
    """Close c's socket and free it with its waiters (in no line any more, or in none that lasts)."""
    while c.waiters != NULL:
        free_waiter(c.waiters)
    close(c.fd)
    del c


cdef void release_everything(Loop *L) noexcept nogil:
    """After the loop thread ended: close every socket and free every connection; in-process
    watchers are woken (they own their waiter and find it in no line)."""
    cdef unordered_map[string, WaitList].iterator it = L.count_waiters.begin()
    cdef Registration *r
    cdef uint64_t one = 1
    # The watchers first, while every waiter in the lines (the connections' BARRIERs too) is alive.
    while it != L.count_waiters.end():
        r = deref(it).second.first
        while r != NULL:
            if r.waiter.conn == NULL:
                r.line = NULL
                write(r.waiter.notify_fd, &one, 8)
            r = r.next
        inc(it)
    L.count_waiters.clear()
    L.key_waiters.clear()
    for c in L.by_fd:
        if c != NULL:
            free_conn(c)
    L.by_fd.clear()
    while L.dead != NULL:
        c = L.dead
        L.dead = c.next_dead
        free_conn(c)
    L.dirty = NULL
    L.kv.clear()
    L.queues.clear()
    for fd in L.listen_fds:
        close(fd)
    L.listen_fds.clear()
    if L.epfd >= 0:
        close(L.epfd)
    if L.wake_fd >= 0:
        close(L.wake_fd)
    if L.reserve_fd >= 0:
        close(L.reserve_fd)
    L.epfd = L.wake_fd = L.reserve_fd = -1
    free(L.scratch)
    L.scratch = NULL


# --- connections: reading, executing, replying, closing -------------------

cdef void mark_dirty(Loop *L, Conn *c) noexcept nogil:
    if not c.dirty:
        c.dirty = True
        c.next_dirty = L.dirty
        L.dirty = c


cdef void close_conn(Loop *L, Conn *c, const char *reason) noexcept nogil:
    """Stop serving c now, logging reason unless it is NULL; its descriptor is closed at the end
    of the loop pass, so that a later event of this pass cannot reach a connection accepted on the
    same number."""
    cdef char line[LOG_LINE_SIZE]
    if c.closing:
        return
    c.closing = True
    if c.out_sent < c.outbuf.size:
        # Best effort: the replies to its valid requests before the bad one. The connection is
        # going away, so a short or failed send changes nothing.
        send(c.fd, c.outbuf.data + c.out_sent, c.outbuf.size - c.out_sent, MSG_NOSIGNAL | MSG_DONTWAIT)
    if reason != NULL:
        snprintf(line, sizeof(line), "closed connection from %s: %s", c.peer, reason)
        log_line(b'E', line)
    cancel_waits(L, c)
    if c.partial_since:
        c.partial_since = 0
        L.partial_conns -= 1
    # Failure here leaves nothing to undo: close() below removes the descriptor from the set anyway.
    epoll_ctl(L.epfd, EPOLL_CTL_DEL, c.fd, NULL)
    L.by_fd[c.fd] = NULL
    c.next_dead = L.dead
    L.dead = c


cdef void set_interest(Loop *L, Conn *c) noexcept nogil:
    cdef epoll_event ev
    cdef uint32_t want = 0
    cdef char reason[ERROR_SIZE]
    if not c.paused:
        want |= EPOLLIN
    if c.out_sent < c.outbuf.size:
        want |= EPOLLOUT
    if want == c.events or c.closing:
        return
    ev.events = want
    ev.data.fd = c.fd
    if epoll_ctl(L.epfd, EPOLL_CTL_MOD, c.fd, &ev) != 0:
        snprintf(reason, sizeof(reason), "epoll_ctl: %s", strerror(errno))
        close_conn(L, c, reason)
        return
    c.events = want


cdef ssize_t execute_frames(Loop *L, Conn *c, const char *data, size_t size) noexcept nogil:
    """Execute the complete requests at the start of data, parsing on the one c is receiving;
    return the bytes they took, -1 if c closed."""
    cdef size_t pos = 0
    cdef int result
    while pos < size:
        if c.outbuf.size - c.out_sent > OUTPUT_HIGH_WATER:
            c.paused = True
            c.need = 0
            return pos
        result = parse_request(<const uint8_t *>data + pos, size - pos, c.validated, L.max_value,
                               &c.request, L.error)
        if result == PARSE_INCOMPLETE:
            c.need = c.request.size
            return pos
        if result == PARSE_INVALID or not execute(L, c, data + pos, &c.request):
            close_conn(L, c, L.error)
            return -1
        pos += c.request.size
        memset(&c.request, 0, sizeof(Request))
    c.need = 0
    return pos


cdef void track_partial(Loop *L, Conn *c, bint progressed) noexcept nogil:
    """Keep partial_since: when the incomplete request now buffered started arriving."""
    if c.inbuf.size == 0 or c.paused:
        if c.partial_since:
            c.partial_since = 0
            L.partial_conns -= 1
        release_if_large(&c.inbuf, KEEP_BUFFER)
    elif c.partial_since == 0:
        c.partial_since = L.now
        L.partial_conns += 1
    elif progressed:
        c.partial_since = L.now


cdef bint buffer_input(Loop *L, Conn *c, const char *data, size_t size) noexcept nogil:
    """Keep bytes received for a request not yet complete; False: out of memory, c closed."""
    cdef char reason[ERROR_SIZE]
    if not reserve(&c.inbuf, size):
        snprintf(reason, sizeof(reason), "out of memory for %zu bytes of a request", c.inbuf.size + size)
        close_conn(L, c, reason)
        return False
    put(&c.inbuf, data, size)
    return True


cdef void feed(Loop *L, Conn *c, const char *data, size_t size) noexcept nogil:
    """Take bytes just received: execute what is complete, keep the rest."""
    cdef ssize_t used
    if c.inbuf.size == 0:
        used = execute_frames(L, c, data, size)
        if used < 0 or (<size_t>used < size and not buffer_input(L, c, data + used, size - used)):
            return
    else:
        if not buffer_input(L, c, data, size):
            return
        if c.inbuf.size < c.need:
            track_partial(L, c, False)
            return
        used = execute_frames(L, c, c.inbuf.data, c.inbuf.size)
        if used < 0:
            return
        consume(&c.inbuf, used)
    track_partial(L, c, used > 0)


cdef void flush(Loop *L, Conn *c) noexcept nogil:
    """Send what c's replies hold; once they drained, resume a paused connection."""
    cdef ssize_t n, used
    while not c.closing:
        if c.outbuf.failed:  # a reply is missing (see release): what follows it cannot be sent
            close_conn(L, c, "out of memory for a reply")
            return
        while c.out_sent < c.outbuf.size:
            n = send(c.fd, c.outbuf.data + c.out_sent, c.outbuf.size - c.out_sent, MSG_NOSIGNAL | MSG_DONTWAIT)
            if n >= 0:
                c.out_sent += n
            elif errno == EINTR:
                continue
            elif errno == EAGAIN:
                break
            else:
                close_conn(L, c, NULL)  # the peer went away: not its fault, nothing to log
                return
        if c.out_sent < c.outbuf.size:
            break
        c.outbuf.size = 0
        c.out_sent = 0
        release_if_large(&c.outbuf, KEEP_BUFFER)
        if not c.paused:
            break
        c.paused = False
        used = execute_frames(L, c, c.inbuf.data, c.inbuf.size)
        if used < 0:
            return
        consume(&c.inbuf, used)
        track_partial(L, c, used > 0)
    set_interest(L, c)


cdef void on_readable(Loop *L, Conn *c) noexcept nogil:
    cdef ssize_t n
    cdef size_t budget = READ_BUDGET
    cdef char reason[ERROR_SIZE]
    while not c.closing and not c.paused and budget > 0:
        n = recv(c.fd, L.scratch, SCRATCH_SIZE, 0)
        if n > 0:
            feed(L, c, L.scratch, n)
            if <size_t>n < SCRATCH_SIZE:
                break
            budget -= min(budget, <size_t>n)
        elif n == 0:
            if c.inbuf.size == 0:
                close_conn(L, c, NULL)
            else:
                snprintf(reason, sizeof(reason), "closed in the middle of a request (%zu bytes of it received)",
                         c.inbuf.size)
                close_conn(L, c, reason)
        elif errno == EINTR:
            continue
        elif errno == EAGAIN:
            break
        else:
            close_conn(L, c, NULL)  # reset by the peer: nothing to log
    if not c.closing:
        flush(L, c)


# --- accepting ------------------------------------------------------------

cdef void format_peer(const sockaddr_storage *addr, char *out) noexcept nogil:
    """addr as "host:port" ("[host]:port" for IPv6) into out (PEER_SIZE bytes)."""
    cdef char host[INET6_ADDRSTRLEN]
    if addr.ss_family == AF_INET6:
        inet_ntop(AF_INET6, &(<const sockaddr_in6 *>addr).sin6_addr, host, sizeof(host))
        snprintf(out, PEER_SIZE, "[%s]:%d", host, ntohs((<const sockaddr_in6 *>addr).sin6_port))
    else:
        inet_ntop(AF_INET, &(<const sockaddr_in *>addr).sin_addr, host, sizeof(host))
        snprintf(out, PEER_SIZE, "%s:%d", host, ntohs((<const sockaddr_in *>addr).sin_port))


cdef void log_refused(const char *peer, const char *why) noexcept nogil:
    cdef char line[LOG_LINE_SIZE]
    snprintf(line, sizeof(line), "refused a connection from %s: %s", peer, why)
    log_line(b'E', line)


cdef void set_accepting(Loop *L, bint accepting) noexcept nogil:
    """Out of descriptors with no reserve left: stop watching the listening sockets (they would
    stay readable and spin the loop) until a connection closes and a reserve can be had again."""
    cdef epoll_event ev
    L.accepting = accepting
    for fd in L.listen_fds:
        ev.events = EPOLLIN
        ev.data.fd = fd
        # Failure leaves the socket as it was: watched (and spinning) or not (until a later close).
        epoll_ctl(L.epfd, EPOLL_CTL_ADD if accepting else EPOLL_CTL_DEL, fd, &ev)
    if accepting:
        log_line(b'W', "accepting connections again")
    else:
        log_line(b'E', "stopped accepting connections: out of file descriptors; resuming when one closes")


cdef Conn *new_conn(Loop *L, int fd, const char *peer) noexcept nogil:
    """The connection of fd, found by L.by_fd; NULL: out of memory."""
    cdef Conn *c
    if L.by_fd.size() <= <size_t>fd and not vector_grow(L.by_fd, fd + 1):
        return NULL
    c = new_nothrow[Conn]()
    if c == NULL:
        return NULL
    c.fd = fd
    snprintf(c.peer, PEER_SIZE, "%s", peer)
    c.events = EPOLLIN
    L.by_fd[fd] = c
    return c


cdef void on_acceptable(Loop *L, int listen_fd) noexcept nogil:
    cdef sockaddr_storage addr
    cdef socklen_t size
    cdef int fd, code, one = 1
    cdef epoll_event ev
    cdef char peer[PEER_SIZE]
    cdef char line[LOG_LINE_SIZE]
    for _ in range(ACCEPT_BUDGET):
        size = sizeof(addr)
        fd = accept4(listen_fd, <sockaddr *>&addr, &size, SOCK_NONBLOCK | SOCK_CLOEXEC)
        if fd < 0:
            code = errno
            if code == EINTR or code == ECONNABORTED:
                continue
            if code == EAGAIN:
                return
            if (code == EMFILE or code == ENFILE) and L.reserve_fd >= 0:
                # Out of descriptors: give up the reserve to take the connection off the backlog
                # and close it, else the listening socket would stay readable forever.
                close(L.reserve_fd)
                size = sizeof(addr)
                fd = accept4(listen_fd, <sockaddr *>&addr, &size, SOCK_CLOEXEC)
                if fd >= 0:
                    close(fd)
                L.reserve_fd = c_open(b"/dev/null", O_RDONLY | FCNTL_O_CLOEXEC)
                if fd < 0:
                    return  # nothing was waiting after all
                format_peer(&addr, peer)
                log_refused(peer, strerror(code))
                continue
            if code == EMFILE or code == ENFILE:
                set_accepting(L, False)
                return
            snprintf(line, sizeof(line), "accept: %s", strerror(code))
            log_line(b'E', line)
            return
        format_peer(&addr, peer)
        ev.events = EPOLLIN
        ev.data.fd = fd
        # TCP_NODELAY: replies are small and latency-bound; Nagle would hold them back.
        if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0
                or epoll_ctl(L.epfd, EPOLL_CTL_ADD, fd, &ev) != 0):
            log_refused(peer, strerror(errno))
            close(fd)
            continue
        if new_conn(L, fd, peer) == NULL:
            log_refused(peer, "out of memory")
            close(fd)  # which takes it out of the epoll set too


# --- the loop thread ------------------------------------------------------

cdef void sweep_slow_requests(Loop *L) noexcept nogil:
    cdef char reason[ERROR_SIZE]
    cdef Conn *c
    cdef size_t fd
    L.last_sweep = L.now
    for fd in range(L.by_fd.size()):
        c = L.by_fd[fd]
        if c != NULL and c.partial_since and L.now - c.partial_since > L.request_timeout_ms:
            snprintf(reason, sizeof(reason), "request still incomplete %.1f s after it began (%zu bytes buffered)",
                     (L.now - c.partial_since) / 1000.0, c.inbuf.size)
            close_conn(L, c, reason)


cdef void finish_pass(Loop *L) noexcept nogil:
    cdef Conn *c
    cdef bint closed
    while L.dirty != NULL:  # a flush may resume a connection whose requests mark others dirty
        c = L.dirty
        L.dirty = c.next_dirty
        c.dirty = False
        if not c.closing:
            flush(L, c)
    closed = L.dead != NULL
    while L.dead != NULL:
        c = L.dead
        L.dead = c.next_dead
        free_conn(c)
    if closed and not L.accepting:
        L.reserve_fd = c_open(b"/dev/null", O_RDONLY | FCNTL_O_CLOEXEC)
        if L.reserve_fd >= 0:
            set_accepting(L, True)


cdef bint is_listener(Loop *L, int fd) noexcept nogil:
    for listen_fd in L.listen_fds:
        if listen_fd == fd:
            return True
    return False


cdef void *run_loop(void *arg) noexcept nogil:
    cdef Loop *L = <Loop *>arg
    cdef epoll_event events[MAX_EVENTS]
    cdef int n, i, fd
    cdef uint32_t ev
    cdef uint64_t drained
    cdef Conn *c
    cdef char line[LOG_LINE_SIZE]
    while True:
        n = epoll_wait(L.epfd, events, MAX_EVENTS, SWEEP_INTERVAL_MS if L.partial_conns else -1)
        if n < 0:
            if errno == EINTR:
                continue
            snprintf(line, sizeof(line), "event loop stopped: epoll_wait: %s", strerror(errno))
            log_line(b'E', line)
            return NULL
        pthread_mutex_lock(&L.lock)
        if L.stopping:
            pthread_mutex_unlock(&L.lock)
            return NULL
        L.now = monotonic_ms()
        for i in range(n):
            fd = events[i].data.fd
            ev = events[i].events
            if fd == L.wake_fd:
                read(L.wake_fd, &drained, 8)  # only to rearm it; stopping is what matters
            elif is_listener(L, fd):
                on_acceptable(L, fd)
            elif <size_t>fd < L.by_fd.size() and L.by_fd[fd] != NULL:
                c = L.by_fd[fd]
                if ev & EPOLLIN:
                    on_readable(L, c)
                elif ev & (EPOLLERR | EPOLLHUP):
                    close_conn(L, c, NULL)
                if ev & EPOLLOUT and not c.closing:
                    flush(L, c)
        if L.partial_conns and L.now - L.last_sweep >= SWEEP_INTERVAL_MS:
            sweep_slow_requests(L)
        finish_pass(L)
        pthread_mutex_unlock(&L.lock)
