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
    L.scratch = NULL
    return L


cdef void release_everything(Loop *L) noexcept nogil:
    """After the loop thread ended: close every socket and free every connection; in-process
    watchers are woken (they own their waiter and find themselves unregistered)."""
    cdef uint64_t one = 1
    # The watchers first: the counting waiters include the connections' (BARRIER), freed below.
    for entry in L.count_waiters:
        for w in entry.second:
            if w.conn == NULL:
                write(w.notify_fd, &one, 8)
    L.count_waiters.clear()
    for c in L.by_fd:
        if c != NULL:
            for w in c.waiters:
                del w
            close(c.fd)
            del c
    L.by_fd.clear()
    for c in L.dead:
        close(c.fd)
        del c
    L.dead.clear()
    L.dirty.clear()
    L.key_waiters.clear()
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
        L.dirty.push_back(c)


cdef void close_conn(Loop *L, Conn *c, const string &reason) noexcept nogil:
    """Stop serving c now; its descriptor is closed at the end of the loop pass, so that a
    later event of this pass cannot reach a connection accepted on the same number."""
    cdef string line
    if c.closing:
        return
    c.closing = True
    if c.out_sent < c.outbuf.size():
        # Best effort: the replies to its valid requests before the bad one. The connection is
        # going away, so a short or failed send changes nothing.
        send(c.fd, c.outbuf.data() + c.out_sent, c.outbuf.size() - c.out_sent, MSG_NOSIGNAL | MSG_DONTWAIT)
    if not reason.empty():
        line.assign(b"closed connection from ")
        line.append(c.peer)
        line.append(b": ")
        line.append(reason)
        log_line(b'E', line)
    cancel_waits(L, c)
    if c.partial_since:
        c.partial_since = 0
        L.partial_conns -= 1
    # Failure here leaves nothing to undo: close() below removes the descriptor from the set anyway.
    epoll_ctl(L.epfd, EPOLL_CTL_DEL, c.fd, NULL)
    L.by_fd[c.fd] = NULL
    L.dead.push_back(c)


cdef void set_interest(Loop *L, Conn *c) noexcept nogil:
    cdef epoll_event ev
    cdef uint32_t want = 0
    cdef string reason
    if not c.paused:
        want |= EPOLLIN
    if c.out_sent < c.outbuf.size():
        want |= EPOLLOUT
    if want == c.events or c.closing:
        return
    ev.events = want
    ev.data.fd = c.fd
    if epoll_ctl(L.epfd, EPOLL_CTL_MOD, c.fd, &ev) != 0:
        reason.assign(b"epoll_ctl: ")
        reason.append(strerror(errno))
        close_conn(L, c, reason)
        return
    c.events = want


cdef ssize_t execute_frames(Loop *L, Conn *c, const char *data, size_t size) noexcept nogil:
    """Execute the complete requests at the start of data; return the bytes they took, -1 if c closed."""
    cdef size_t pos = 0
    cdef int result
    while pos < size:
        if c.outbuf.size() - c.out_sent > OUTPUT_HIGH_WATER:
            c.paused = True
            c.need = 0
            return pos
        result = parse_request(<const uint8_t *>data + pos, size - pos, c.validated, L.max_value,
                               &L.request, &L.error)
        if result == PARSE_INCOMPLETE:
            c.need = L.request.size
            return pos
        if result == PARSE_INVALID or not execute(L, c, data + pos, &L.request, &L.error):
            close_conn(L, c, L.error)
            return -1
        pos += L.request.size
    c.need = 0
    return pos


cdef void track_partial(Loop *L, Conn *c, bint progressed) noexcept nogil:
    """Keep partial_since: when the incomplete request now buffered started arriving."""
    if c.inbuf.empty() or c.paused:
        if c.partial_since:
            c.partial_since = 0
            L.partial_conns -= 1
        if c.inbuf.empty() and c.inbuf.capacity() > KEEP_BUFFER:
            c.inbuf.shrink_to_fit()
    elif c.partial_since == 0:
        c.partial_since = L.now
        L.partial_conns += 1
    elif progressed:
        c.partial_since = L.now


cdef void feed(Loop *L, Conn *c, const char *data, size_t size) noexcept nogil:
    """Take bytes just received: execute what is complete, keep the rest."""
    cdef ssize_t used
    if c.inbuf.empty():
        used = execute_frames(L, c, data, size)
        if used < 0:
            return
        c.inbuf.assign(data + used, size - used)
    else:
        c.inbuf.append(data, size)
        if c.inbuf.size() < c.need:
            track_partial(L, c, False)
            return
        used = execute_frames(L, c, c.inbuf.data(), c.inbuf.size())
        if used < 0:
            return
        c.inbuf.erase(0, used)
    track_partial(L, c, used > 0)


cdef void flush(Loop *L, Conn *c) noexcept nogil:
    """Send what c's replies hold; once they drained, resume a paused connection."""
    cdef ssize_t n, used
    while not c.closing:
        while c.out_sent < c.outbuf.size():
            n = send(c.fd, c.outbuf.data() + c.out_sent, c.outbuf.size() - c.out_sent, MSG_NOSIGNAL | MSG_DONTWAIT)
            if n >= 0:
                c.out_sent += n
            elif errno == EINTR:
                continue
            elif errno == EAGAIN:
                break
            else:
                close_conn(L, c, string())  # the peer went away: not its fault, nothing to log
                return
        if c.out_sent < c.outbuf.size():
            break
        c.outbuf.clear()
        c.out_sent = 0
        if c.outbuf.capacity() > KEEP_BUFFER:
            c.outbuf.shrink_to_fit()
        if not c.paused:
            break
        c.paused = False
        used = execute_frames(L, c, c.inbuf.data(), c.inbuf.size())
        if used < 0:
            return
        c.inbuf.erase(0, used)
        track_partial(L, c, used > 0)
    set_interest(L, c)


cdef void on_readable(Loop *L, Conn *c) noexcept nogil:
    cdef ssize_t n
    cdef size_t budget = READ_BUDGET
    cdef char text[96]
    cdef string reason
    while not c.closing and not c.paused and budget > 0:
        n = recv(c.fd, L.scratch, SCRATCH_SIZE, 0)
        if n > 0:
            feed(L, c, L.scratch, n)
            if <size_t>n < SCRATCH_SIZE:
                break
            budget -= min(budget, <size_t>n)
        elif n == 0:
            reason.clear()
            if not c.inbuf.empty():
                snprintf(text, sizeof(text), "closed in the middle of a request (%zu bytes of it received)",
                         c.inbuf.size())
                reason.assign(<const char *>text)
            close_conn(L, c, reason)
        elif errno == EINTR:
            continue
        elif errno == EAGAIN:
            break
        else:
            close_conn(L, c, string())  # reset by the peer: nothing to log
    if not c.closing:
        flush(L, c)


# --- accepting ------------------------------------------------------------

cdef void format_peer(const sockaddr_storage *addr, string *out) noexcept nogil:
    cdef char host[INET6_ADDRSTRLEN]
    cdef char text[INET6_ADDRSTRLEN + 16]
    cdef int port
    if addr.ss_family == AF_INET6:
        inet_ntop(AF_INET6, &(<const sockaddr_in6 *>addr).sin6_addr, host, sizeof(host))
        port = ntohs((<const sockaddr_in6 *>addr).sin6_port)
        snprintf(text, sizeof(text), "[%s]:%d", host, port)
    else:
        inet_ntop(AF_INET, &(<const sockaddr_in *>addr).sin_addr, host, sizeof(host))
        port = ntohs((<const sockaddr_in *>addr).sin_port)
        snprintf(text, sizeof(text), "%s:%d", host, port)
    out.assign(<const char *>text)


cdef void log_refused(const string &peer, const char *why) noexcept nogil:
    cdef string line
    line.assign(b"refused a connection from ")
    line.append(peer)
    line.append(b": ")
    line.append(why)
    log_line(b'E', line)


cdef void set_accepting(Loop *L, bint accepting) noexcept nogil:
    """Out of descriptors with no reserve left: stop watching the listening sockets (they would
    stay readable and spin the loop) until a connection closes and a reserve can be had again."""
    cdef epoll_event ev
    cdef string line
    L.accepting = accepting
    for fd in L.listen_fds:
        ev.events = EPOLLIN
        ev.data.fd = fd
        # Failure leaves the socket as it was: watched (and spinning) or not (until a later close).
        epoll_ctl(L.epfd, EPOLL_CTL_ADD if accepting else EPOLL_CTL_DEL, fd, &ev)
    line.assign(b"accepting connections again" if accepting else
                b"stopped accepting connections: out of file descriptors; resuming when one closes")
    log_line(b'W' if accepting else b'E', line)


cdef void on_acceptable(Loop *L, int listen_fd) noexcept nogil:
    cdef sockaddr_storage addr
    cdef socklen_t size
    cdef int fd, code, one = 1
    cdef epoll_event ev
    cdef Conn *c
    cdef string peer, line
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
                format_peer(&addr, &peer)
                log_refused(peer, strerror(code))
                continue
            if code == EMFILE or code == ENFILE:
                set_accepting(L, False)
                return
            line.assign(b"accept: ")
            line.append(strerror(code))
            log_line(b'E', line)
            return
        format_peer(&addr, &peer)
        ev.events = EPOLLIN
        ev.data.fd = fd
        # TCP_NODELAY: replies are small and latency-bound; Nagle would hold them back.
        if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0
                or epoll_ctl(L.epfd, EPOLL_CTL_ADD, fd, &ev) != 0):
            log_refused(peer, strerror(errno))
            close(fd)
            continue
        c = new Conn()
        c.fd = fd
        c.peer = peer
        c.validated = False
        c.closing = False
        c.paused = False
        c.dirty = False
        c.need = 0
        c.partial_since = 0
        c.out_sent = 0
        c.events = EPOLLIN
        if L.by_fd.size() <= <size_t>fd:
            L.by_fd.resize(fd + 1, NULL)
        L.by_fd[fd] = c


# --- the loop thread ------------------------------------------------------

cdef void sweep_slow_requests(Loop *L) noexcept nogil:
    cdef char text[160]
    cdef string reason
    cdef Conn *c
    cdef size_t fd
    L.last_sweep = L.now
    for fd in range(L.by_fd.size()):
        c = L.by_fd[fd]
        if c != NULL and c.partial_since and L.now - c.partial_since > L.request_timeout_ms:
            snprintf(text, sizeof(text), "request still incomplete %.1f s after it began (%zu bytes buffered)",
                     (L.now - c.partial_since) / 1000.0, c.inbuf.size())
            reason.assign(<const char *>text)
            close_conn(L, c, reason)


cdef void finish_pass(Loop *L) noexcept nogil:
    cdef size_t i = 0
    cdef Conn *c
    while i < L.dirty.size():  # a flush may resume a connection whose requests mark others dirty
        c = L.dirty[i]
        c.dirty = False
        if not c.closing:
            flush(L, c)
        i += 1
    L.dirty.clear()
    for c in L.dead:
        close(c.fd)
        del c
    if not L.dead.empty() and not L.accepting:
        L.reserve_fd = c_open(b"/dev/null", O_RDONLY | FCNTL_O_CLOEXEC)
        if L.reserve_fd >= 0:
            set_accepting(L, True)
    L.dead.clear()


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
    cdef string line
    while True:
        n = epoll_wait(L.epfd, events, MAX_EVENTS, SWEEP_INTERVAL_MS if L.partial_conns else -1)
        if n < 0:
            if errno == EINTR:
                continue
            line.assign(b"event loop stopped: epoll_wait: ")
            line.append(strerror(errno))
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
                    close_conn(L, c, string())
                if ev & EPOLLOUT and not c.closing:
                    flush(L, c)
        if L.partial_conns and L.now - L.last_sweep >= SWEEP_INTERVAL_MS:
            sweep_slow_requests(L)
        finish_pass(L)
        pthread_mutex_unlock(&L.lock)
