# Server, the Python face of the store server: it resolves and binds the listening sockets, opens
# the loop's descriptors and starts its thread (store/loop.pyx), and serves the in-process calls
# (clear, wait_count) under the loop's lock. close() stops the thread and releases everything.

cdef enum:
    LISTEN_RACE_ATTEMPTS = 50  # see open_listener
    LISTEN_RACE_PAUSE_NS = 10 * 1000 * 1000


# --- listening sockets ----------------------------------------------------

cdef void set_port(sockaddr_storage *addr, int port) noexcept nogil:
    if addr.ss_family == AF_INET6:
        (<sockaddr_in6 *>addr).sin6_port = htons(port)
    else:
        (<sockaddr_in *>addr).sin_port = htons(port)


cdef int bound_port(int fd) noexcept nogil:
    cdef sockaddr_storage addr
    cdef socklen_t size = sizeof(addr)
    if getsockname(fd, <sockaddr *>&addr, &size) != 0:
        return -1
    if addr.ss_family == AF_INET6:
        return ntohs((<sockaddr_in6 *>&addr).sin6_port)
    return ntohs((<sockaddr_in *>&addr).sin_port)


cdef int open_listener(const addrinfo *ai, const sockaddr_storage *addr, bint v6only) noexcept nogil:
    """A listening socket on addr, or -errno.

    Two servers that bind one port at the same moment can both fail to listen: SO_REUSEADDR
    lets both bind, then each listen finds the other bound. Retried after a random pause,
    such a race has one winner, and the others fail to bind: someone listens there.
    """
    cdef int fd, saved, one = 1
    cdef uint32_t pause_ns
    cdef timespec pause
    for _ in range(LISTEN_RACE_ATTEMPTS):
        fd = socket(ai.ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, ai.ai_protocol)
        if fd < 0:
            return -errno
        # SO_REUSEADDR: a restarted launcher can listen again while old connections linger in TIME_WAIT.
        # IPV6_V6ONLY: with an IPv4 address in the list as well, an IPv6 wildcard must not claim IPv4 too.
        if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0
                or (v6only and setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) != 0)
                or bind(fd, <const sockaddr *>addr, ai.ai_addrlen) != 0):
            saved = errno
            close(fd)
            return -saved
        if listen(fd, SOMAXCONN) == 0:
            return fd
        saved = errno
        close(fd)
        if saved != EADDRINUSE:
            return -saved
        if getrandom(&pause_ns, sizeof(pause_ns), 0) != sizeof(pause_ns):
            pause_ns = <uint32_t>getpid()  # no entropy: the pids still differ
        pause.tv_sec = 0
        pause.tv_nsec = pause_ns % LISTEN_RACE_PAUSE_NS
        nanosleep(&pause, NULL)
    return -EADDRINUSE


cdef bint any_equal(const vector[string] &items, const string &item) noexcept nogil:
    cdef size_t i
    for i in range(items.size()):
        if items[i] == item:
            return True
    return False


cdef int bind_listeners(Loop *L, const char *host, int port, char *error, int *code) noexcept nogil:
    """Listen on every address host resolves to, all on one port (port 0: the kernel picks
    it for the first address). Returns the port, or -1 with error (ERROR_SIZE bytes) and code
    (errno, or 0 for a resolver error)."""
    cdef addrinfo hints
    cdef addrinfo *found = NULL
    cdef addrinfo *ai
    cdef char service[8]
    cdef int fd, rc, skipped = EADDRNOTAVAIL
    cdef bint has_ipv4 = False
    cdef sockaddr_storage addr
    cdef vector[string] bound
    cdef string this_addr
    memset(&hints, 0, sizeof(hints))
    hints.ai_family = AF_UNSPEC
    hints.ai_socktype = SOCK_STREAM
    hints.ai_flags = AI_PASSIVE
    snprintf(service, sizeof(service), "%d", port)
    code[0] = 0
    rc = getaddrinfo(host, service, &hints, &found)
    if rc != 0:
        snprintf(error, ERROR_SIZE, "%s", gai_strerror(rc))
        return -1
    ai = found
    while ai != NULL:
        has_ipv4 = has_ipv4 or ai.ai_family == AF_INET
        ai = ai.ai_next
    ai = found
    while ai != NULL:
        memcpy(&addr, ai.ai_addr, ai.ai_addrlen)
        set_port(&addr, port)
        if not string_assign(this_addr, <const char *>&addr, ai.ai_addrlen):
            code[0] = ENOMEM
            break
        if any_equal(bound, this_addr):  # the same address listed twice (/etc/hosts)
            ai = ai.ai_next
            continue
        fd = open_listener(ai, &addr, ai.ai_family == AF_INET6 and has_ipv4)
        if fd < 0:
            rc = -fd
            if rc == EADDRNOTAVAIL or rc == EAFNOSUPPORT:  # e.g. ::1 on a host without IPv6
                skipped = rc
                ai = ai.ai_next
                continue
            code[0] = rc
            break
        if port == 0:
            port = bound_port(fd)
            if port < 0:
                code[0] = errno
                close(fd)
                break
        if not vector_push_back(L.listen_fds, fd):
            code[0] = ENOMEM
            close(fd)
            break
        if not push_back_moved(bound, this_addr):
            code[0] = ENOMEM
            break
        ai = ai.ai_next
    freeaddrinfo(found)
    if code[0] == 0 and L.listen_fds.empty():
        code[0] = skipped
    if code[0] != 0:
        snprintf(error, ERROR_SIZE, "%s", strerror(code[0]))
        return -1
    return port


# --- the server -----------------------------------------------------------

cdef void raise_open_file_limit():
    """Thousands of idle connections each hold a descriptor: allow as many as the hard limit does."""
    cdef rlimit limit
    check(getrlimit(RLIMIT_NOFILE, &limit), "getrlimit(RLIMIT_NOFILE)")
    if limit.rlim_cur < limit.rlim_max:
        limit.rlim_cur = limit.rlim_max
        check(setrlimit(RLIMIT_NOFILE, &limit), "setrlimit(RLIMIT_NOFILE)")


cdef class Server:
    """A TCPStore server on host:port (port 0: a free port, see .port), served by a native thread.

    ``Server(host, port=0, max_value_size=1 << 30, *, request_timeout=60.0)``: host is
    resolved with getaddrinfo and the server listens on each address it names, nowhere else.
    """
    def __cinit__(self):
        self.loop = new_loop()
        pthread_mutex_init(&self.loop.lock, NULL)

    def __init__(self, str host, int port=0, max_value_size=1 << 30, *, double request_timeout=60.0):
        cdef Loop *L = self.loop
        cdef char error[ERROR_SIZE]
        cdef int code = 0, bound = -1
        cdef epoll_event ev
        cdef sigset_t all_signals, previous
        cdef bytes host_bytes = host.encode()
        cdef const char *host_c = host_bytes
        if L.epfd >= 0 or L.stopping:
            raise RuntimeError("Server.__init__ called twice")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        if not 0 < max_value_size < (1 << 62):
            raise ValueError(f"max_value_size must be positive, got {max_value_size}")
        if not request_timeout > 0:
            raise ValueError(f"request_timeout must be positive, got {request_timeout}")
        self.host = host
        L.max_value = max_value_size
        L.max_request = request_limit(L.max_value)
        L.request_timeout_ms = <int64_t>(request_timeout * 1000)
        raise_open_file_limit()
        # With port 0 the kernel picks a port free on the first address only; another address
        # may have it taken. Rare: pick again.
        for _ in range(8):
            with nogil:
                bound = bind_listeners(L, host_c, port, error, &code)
            if bound >= 0 or port != 0 or code != EADDRINUSE:
                break
            self._close_listeners()
        if bound < 0:
            self._close_listeners()
            message = errno_text(code) if code else error.decode()
            raise DistNetworkError(f"cannot listen on {host}:{port}: {message}")
        self.port = bound
        try:
            L.epfd = check(epoll_create1(EPOLL_CLOEXEC), "epoll_create1")
            L.wake_fd = check(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK), "eventfd")
            L.reserve_fd = check(c_open(b"/dev/null", O_RDONLY | FCNTL_O_CLOEXEC), "open /dev/null")
            for fd in [L.wake_fd] + list(L.listen_fds):
                ev.events = EPOLLIN
                ev.data.fd = fd
                check(epoll_ctl(L.epfd, EPOLL_CTL_ADD, fd, &ev), "epoll_ctl")
            L.scratch = <char *>malloc(SCRATCH_SIZE)
            if L.scratch == NULL:
                raise MemoryError()
            # The loop thread takes no signals: they belong to the agent's own handling (its signalfd).
            sigfillset(&all_signals)
            pthread_sigmask(SIG_SETMASK, &all_signals, &previous)
            code = pthread_create(&L.thread, NULL, run_loop, L)
            pthread_sigmask(SIG_SETMASK, &previous, NULL)
            if code != 0:
                raise os_error(code, "pthread_create")
            L.running = True
            # Named here rather than by the thread itself, so the name is there once this returns.
            code = pthread_setname_np(L.thread, b"launcher-store")
            if code != 0:
                raise os_error(code, "pthread_setname_np")
        except BaseException:
            self.close()
            raise

    cdef void _close_listeners(self):
        for fd in self.loop.listen_fds:
            close(fd)
        self.loop.listen_fds.clear()

    def close(self):
        """Stop serving: every connection is closed (a client waiting on a key gets an error),
        the thread is joined and every descriptor released. Closing twice does nothing."""
        with nogil:
            self.stop()

    cdef void stop(self) noexcept nogil:
        cdef Loop *L = self.loop
        cdef uint64_t one = 1
        cdef bint first
        pthread_mutex_lock(&L.lock)
        first = not L.stopping
        L.stopping = True
        pthread_mutex_unlock(&L.lock)
        if not first:
            return
        if L.running:
            write(L.wake_fd, &one, 8)  # cannot fail: the counter is far from full
            pthread_join(L.thread, NULL)
            L.running = False
        pthread_mutex_lock(&L.lock)
        release_everything(L)
        pthread_mutex_unlock(&L.lock)

    def clear(self, bytes keep_prefix=b""):
        """Drop every key and queue, except those whose wire key starts with keep_prefix
        (when it is not empty): a restarted attempt must not see the previous one's keys."""
        cdef Loop *L = self.loop
        cdef string prefix = keep_prefix
        with nogil:
            pthread_mutex_lock(&L.lock)
            drop_all_but(L, prefix)
            pthread_mutex_unlock(&L.lock)

    def wait_count(self, bytes key, int64_t count, double timeout, int interrupt_fd=-1):
        """Block until the integer stored at key (an ADD counter) reaches count, at most timeout
        seconds; return the value then (0 while the key is missing). Answered by the loop
        thread when the key changes, without polling. Raises StoreInterrupted when
        interrupt_fd becomes readable, DistStoreError when the server closes meanwhile."""
        cdef Loop *L = self.loop
        cdef string wire_key = key
        cdef int status = OK, err = 0
        cdef int64_t value = 0
        cdef int64_t deadline = deadline_after(timeout)
        cdef bint closed, out_of_memory = False
        cdef Waiter watch  # in line only while this call waits, so it can live on the stack
        cdef Registration place
        memset(&watch, 0, sizeof(watch))
        watch.counting = True
        watch.target = count
        watch.regs = &place
        watch.notify_fd = check(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK), "eventfd")
        with nogil:
            pthread_mutex_lock(&L.lock)
            closed = L.stopping
            if not closed and not (read_count(L, wire_key, &value) and value >= count):
                if register(&watch, &L.count_waiters, wire_key):
                    pthread_mutex_unlock(&L.lock)
                    status = wait_io(watch.notify_fd, POLLIN, interrupt_fd, deadline, &err)
                    pthread_mutex_lock(&L.lock)
                    unregister(L, &watch)
                    closed = L.stopping
                    read_count(L, wire_key, &value)
                else:
                    out_of_memory = True
            pthread_mutex_unlock(&L.lock)
        close(watch.notify_fd)
        if out_of_memory:
            raise MemoryError(f"no memory to wait for {key!r} to reach {count}")
        if status == INTERRUPTED:
            raise StoreInterrupted(f"waiting for {key!r} to reach {count} interrupted: "
                                   f"interrupt_fd {interrupt_fd} became readable")
        if status == BAD_INTERRUPT_FD:
            raise ValueError(f"interrupt_fd {interrupt_fd} is not an open file descriptor")
        if status == IO_FAILED:
            raise os_error(err, "poll")
        if closed:
            raise DistStoreError(f"store server on {self.host}:{self.port} closed "
                                 f"while waiting for {key!r} to reach {count}")
        return value

    def __dealloc__(self):
        if self.loop == NULL:  # new_loop failed in __cinit__
            return
        self.stop()
        pthread_mutex_destroy(&self.loop.lock)
        del self.loop

    def __repr__(self):
        return f"<StoreServer {self.host}:{self.port}{' closed' if self.loop.stopping else ''}>"


# --- what its in-process calls read and drop ------------------------------

cdef bint read_count(Loop *L, const string &key, int64_t *value) noexcept nogil:
    cdef unordered_map[string, string].iterator it = L.kv.find(key)
    value[0] = 0
    return it != L.kv.end() and parse_int(deref(it).second, value)


cdef inline bint starts_with(const string &text, const string &prefix) noexcept nogil:
    return text.size() >= prefix.size() and memcmp(text.data(), prefix.data(), prefix.size()) == 0


cdef void drop_all_but(Loop *L, const string &prefix) noexcept nogil:
    """Drop every key and queue, but those whose name starts with a non-empty prefix."""
    cdef unordered_map[string, string].iterator kv = L.kv.begin()
    cdef unordered_map[string, deque[string]].iterator q = L.queues.begin()
    cdef bint keep_some = not prefix.empty()
    while kv != L.kv.end():
        if keep_some and starts_with(deref(kv).first, prefix):
            inc(kv)
        else:
            kv = L.kv.erase(kv)
    while q != L.queues.end():
        if keep_some and starts_with(deref(q).first, prefix):
            inc(q)
        else:
            q = L.queues.erase(q)
