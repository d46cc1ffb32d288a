# Client, one blocking connection to a store server: it connects with back-off and handshakes like
# torch's client, sends a request and reads its reply (the Reply shape says how), each step bounded
# by a deadline and an interrupt_fd (store/waiting.pyx). A failed step abandons the connection;
# the next call connects again, unless the failure says the server is gone.

cdef enum Reply:
    NO_REPLY
    ONE_BYTE
    NUMBER  # i64
    VALUE  # one length-prefixed value
    VALUES  # as many values as keys were sent
    COUNTED_VALUES  # a u64 count, then that many values
    QUEUE_ITEM  # an i64 (0: empty), then one value unless 0


cdef void put_key(Buffer *out, key):
    if not isinstance(key, bytes):
        raise TypeError(f"store keys and values are bytes here, got {type(key).__name__}")
    put_bytes(out, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))


cdef void put_keys(Buffer *out, keys):
    keys = list(keys)
    put_u64(out, len(keys))
    for key in keys:
        put_key(out, key)


cdef class Client:
    """One connection to a store server, used by one call at a time (calls from several
    threads take turns). ``Client(host, port, timeout=300.0, interrupt_fd=-1)`` connects,
    retrying with back-off until timeout seconds have passed, and handshakes like torch's
    client (VALIDATE, then a PING whose nonce must come back).

    Keys and values are bytes, as they travel. Every call waits at most ``timeout``
    seconds for its reply; every blocking step also watches interrupt_fd and raises
    StoreInterrupted as soon as it is readable (without reading it). A call that was
    interrupted or timed out leaves its connection behind; the next call connects again.
    """
    def __cinit__(self):
        self.fd = -1
        self.rbuf = NULL
        self.rcap = self.rlen = self.rpos = 0
        pthread_mutex_init(&self.lock, NULL)

    def __init__(self, str host, int port, double timeout=300.0, int interrupt_fd=-1):
        cdef Buffer nothing
        cdef Answer unused
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        if port == 0:
            raise DistNetworkError(f"cannot connect to store at {host}:0: port 0 names no server")
        self.host = host
        self.port = port
        self.host_c = host.encode()
        self.timeout = timeout
        self.interrupt_fd = interrupt_fd
        self.call(nothing, NO_REPLY, 0, &unused, "connect")

    @property
    def timeout(self):
        """Seconds a call may wait for its reply (and a connect for the server)."""
        return self.timeout_ms / 1000.0

    @timeout.setter
    def timeout(self, double seconds):
        if not seconds >= 0:
            raise ValueError(f"timeout must be at least 0 seconds, got {seconds}")
        self.timeout_ms = <int64_t>(seconds * 1000)

    def close(self):
        with nogil:
            pthread_mutex_lock(&self.lock)
            self.abandon()
            pthread_mutex_unlock(&self.lock)
        self.lost = f"the client of store at {self.host}:{self.port} is closed"

    def __dealloc__(self):
        self.abandon()
        free(self.rbuf)
        pthread_mutex_destroy(&self.lock)

    # Blocking steps; each returns a Status.

    cdef void abandon(self) noexcept nogil:
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1
        self.rlen = self.rpos = 0

    cdef void trim(self) noexcept nogil:
        """Between calls: give back a buffer a large reply grew."""
        if self.rcap > KEEP_BUFFER and self.rpos == self.rlen:
            free(self.rbuf)
            self.rbuf = NULL
            self.rcap = self.rlen = self.rpos = 0

    cdef int send_all(self, const char *data, size_t size, int64_t deadline) noexcept nogil:
        cdef size_t pos = 0
        cdef ssize_t n
        cdef int status
        while pos < size:
            n = send(self.fd, data + pos, size - pos, MSG_NOSIGNAL)
            if n >= 0:
                pos += n
            elif errno == EINTR:
                continue
            elif errno == EAGAIN:
                status = wait_io(self.fd, POLLOUT, self.interrupt_fd, deadline, &self.err)
                if status != OK:
                    return status
            else:
                self.err = errno
                return IO_FAILED
        return OK

    cdef int fill(self, size_t n, int64_t deadline) noexcept nogil:
        """Receive until n unread bytes are buffered."""
        cdef size_t want
        cdef ssize_t got
        cdef int status
        cdef char *grown
        while self.rlen - self.rpos < n:
            if self.rpos > 0:
                memmove(self.rbuf, self.rbuf + self.rpos, self.rlen - self.rpos)
                self.rlen -= self.rpos
                self.rpos = 0
            want = max(n - self.rlen, <size_t>65536)
            if self.rcap - self.rlen < want:
                grown = <char *>realloc(self.rbuf, self.rlen + want)
                if grown == NULL:
                    self.err = ENOMEM
                    return IO_FAILED
                self.rbuf = grown
                self.rcap = self.rlen + want
            got = recv(self.fd, self.rbuf + self.rlen, self.rcap - self.rlen, 0)
            if got > 0:
                self.rlen += got
                continue
            if got == 0:
                return PEER_CLOSED
            if errno == EINTR:
                continue
            if errno != EAGAIN:
                self.err = errno
                return IO_FAILED
            status = wait_io(self.fd, POLLIN, self.interrupt_fd, deadline, &self.err)
            if status != OK:
                return status
        return OK

    cdef int read_value(self, Answer *answer, int64_t deadline) noexcept nogil:
        cdef uint64_t size
        cdef string value
        cdef int status = self.fill(8, deadline)
        if status != OK:
            return status
        size = load_u64(<const uint8_t *>self.rbuf + self.rpos)
        self.rpos += 8
        status = self.fill(size, deadline)
        if status != OK:
            return status
        if not (string_assign(value, self.rbuf + self.rpos, size) and push_back_moved(answer.values, value)):
            self.err = ENOMEM
            return IO_FAILED
        self.rpos += size
        return OK

    cdef int read_reply(self, int reply, size_t count, Answer *answer, int64_t deadline) noexcept nogil:
        cdef int status = OK
        if reply == ONE_BYTE:
            status = self.fill(1, deadline)
            if status == OK:
                answer.number = <uint8_t>self.rbuf[self.rpos]
                self.rpos += 1
        elif reply == NUMBER or reply == COUNTED_VALUES or reply == QUEUE_ITEM:
            status = self.fill(8, deadline)
            if status != OK:
                return status
            answer.number = <int64_t>load_u64(<const uint8_t *>self.rbuf + self.rpos)
            self.rpos += 8
            if reply == COUNTED_VALUES:
                count = <size_t>answer.number
            elif reply == QUEUE_ITEM:
                count = 1 if answer.number > 0 else 0
            else:
                count = 0
            for _ in range(count):
                status = self.read_value(answer, deadline)
                if status != OK:
                    return status
        elif reply == VALUE or reply == VALUES:
            for _ in range(1 if reply == VALUE else count):
                status = self.read_value(answer, deadline)
                if status != OK:
                    return status
        return status

    cdef int handshake(self, int64_t deadline) noexcept nogil:
        cdef char request[10]
        cdef uint32_t nonce = <uint32_t>(monotonic_ms() * 2654435761u) ^ <uint32_t>getpid()
        cdef uint32_t wire
        cdef int status
        request[0] = VALIDATE
        wire = htole32(MAGIC)
        memcpy(request + 1, &wire, 4)
        request[5] = PING
        wire = htole32(nonce)
        memcpy(request + 6, &wire, 4)
        status = self.send_all(request, sizeof(request), deadline)
        if status == OK:
            status = self.fill(4, deadline)
        if status == OK:
            if load_u32(<const uint8_t *>self.rbuf + self.rpos) != nonce:
                return UNEXPECTED_REPLY
            self.rpos += 4
        return status

    cdef int try_connect(self, int64_t deadline) noexcept nogil:
        """One attempt at every address host resolves to: OK, RETRY (why says why), or
        INTERRUPTED / BAD_INTERRUPT_FD."""
        cdef addrinfo hints
        cdef addrinfo *found = NULL
        cdef addrinfo *ai
        cdef char service[8]
        cdef int fd, rc, status = RETRY, one = 1, so_error = 0
        cdef socklen_t size = sizeof(so_error)
        memset(&hints, 0, sizeof(hints))
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = SOCK_STREAM
        snprintf(service, sizeof(service), "%d", self.port)
        rc = getaddrinfo(self.host_c.c_str(), service, &hints, &found)
        if rc != 0:
            snprintf(self.why, ERROR_SIZE, "%s", gai_strerror(rc))
            return RETRY
        ai = found
        while ai != NULL and status == RETRY:
            fd = socket(ai.ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, ai.ai_protocol)
            if fd < 0:
                snprintf(self.why, ERROR_SIZE, "%s", strerror(errno))
                ai = ai.ai_next
                continue
            rc = connect(fd, ai.ai_addr, ai.ai_addrlen)
            if rc != 0 and errno == EINPROGRESS:
                rc = wait_io(fd, POLLOUT, self.interrupt_fd, deadline, &self.err)
                if rc == TIMED_OUT:
                    snprintf(self.why, ERROR_SIZE, "connect timed out")
                    close(fd)
                    break
                if rc != OK:
                    close(fd)
                    status = rc
                    break
                rc = getsockopt(fd, SOL_SOCKET, SO_ERROR, &so_error, &size)
            # Requests are small and each waits for its reply: Nagle would only delay them.
            if rc != 0 or so_error != 0 or setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0:
                snprintf(self.why, ERROR_SIZE, "%s", strerror(so_error if so_error != 0 else errno))
                close(fd)
                so_error = 0
                ai = ai.ai_next
                continue
            self.fd = fd
            rc = self.handshake(deadline)
            if rc == OK:
                status = OK
                break
            self.abandon()
            if rc == INTERRUPTED or rc == BAD_INTERRUPT_FD:
                status = rc
            elif rc == UNEXPECTED_REPLY:
                snprintf(self.why, ERROR_SIZE, "the PING nonce did not come back (not a store server?)")
            elif rc == PEER_CLOSED:
                snprintf(self.why, ERROR_SIZE, "the server closed the connection during the handshake")
            elif rc == IO_FAILED:
                snprintf(self.why, ERROR_SIZE, "%s", strerror(self.err))
            else:
                snprintf(self.why, ERROR_SIZE, "no answer to the handshake")
            ai = ai.ai_next
        freeaddrinfo(found)
        return status

    cdef int connect_retrying(self, int64_t deadline) noexcept nogil:
        """Attempts with exponential back-off (10 ms doubling to 1 s, jittered) until deadline."""
        cdef int64_t delay = 10, now, pause
        cdef int status
        while True:
            status = self.try_connect(deadline)
            if status != RETRY:
                return status
            now = monotonic_ms()
            if now >= deadline:
                return RETRY
            pause = delay // 2 + (now * 7919) % (delay // 2 + 1)
            status = wait_io(-1, 0, self.interrupt_fd, min(deadline, now + pause), &self.err)
            if status != TIMED_OUT:
                return status
            delay = min(delay * 2, <int64_t>1000)

    cdef int exchange(self, const Buffer &request, int reply, size_t count, Answer *answer,
                      int64_t deadline) noexcept nogil:
        cdef int status = OK
        if self.fd < 0:
            status = self.connect_retrying(deadline)
        if status == OK and request.size != 0:
            status = self.send_all(request.data, request.size, deadline)
        if status == OK:
            status = self.read_reply(reply, count, answer, deadline)
        return status

    cdef int wait_keys(self, const Buffer &request, int64_t wait_deadline, int64_t deadline) noexcept nogil:
        """WAIT as torch's client does it: past wait_deadline, send CANCEL_WAIT and read up to
        WAIT_CANCELED (a STOP_WAITING may come first, when the keys arrived meanwhile)."""
        cdef Answer answer
        cdef int status = self.exchange(request, NO_REPLY, 0, &answer, deadline)
        cdef char cancel = CANCEL_WAIT
        if status != OK:
            return status
        status = self.read_reply(ONE_BYTE, 0, &answer, wait_deadline)
        if status == OK:
            return OK if answer.number == STOP_WAITING else UNEXPECTED_REPLY
        if status != TIMED_OUT:
            return status
        deadline = monotonic_ms() + self.timeout_ms
        status = self.send_all(&cancel, 1, deadline)
        while status == OK:
            status = self.read_reply(ONE_BYTE, 0, &answer, deadline)
            if status == OK and answer.number == WAIT_CANCELED:
                return WAIT_TIMED_OUT
            if status == OK and answer.number != STOP_WAITING:
                return UNEXPECTED_REPLY
        return status

    cdef int call(self, const Buffer &request, int reply, size_t count, Answer *answer, str what) except -1:
        cdef int status
        cdef int64_t deadline = monotonic_ms() + self.timeout_ms
        self.check_sendable(request, what)
        with nogil:
            pthread_mutex_lock(&self.lock)
            status = self.exchange(request, reply, count, answer, deadline)
            if status != OK:
                self.abandon()
            self.trim()
            pthread_mutex_unlock(&self.lock)
        if status != OK:
            self.fail(status, what)
        return 0

    cdef int check_sendable(self, const Buffer &request, str what) except -1:
        """Raise if request cannot be sent: memory ran out while it was written, or the connection is
        gone for good."""
        if request.failed:
            raise MemoryError(f"no memory for a {what} request of more than {request.size} bytes")
        if self.lost is not None:
            raise DistNetworkError(self.lost)
        return 0

    cdef fail(self, int status, str what):
        where = f"store at {self.host}:{self.port}"
        if status == RETRY:
            raise DistNetworkError(f"cannot connect to {where} within {self.timeout:g} s: {self.why.decode()}")
        if status == TIMED_OUT:
            raise DistStoreError(f"{what}: no reply from {where} within {self.timeout:g} s")
        if status == INTERRUPTED:
            raise StoreInterrupted(f"{what} on {where} interrupted: interrupt_fd {self.interrupt_fd} became readable")
        if status == BAD_INTERRUPT_FD:
            raise ValueError(f"interrupt_fd {self.interrupt_fd} is not an open file descriptor")
        if status == PEER_CLOSED:
            self.lost = f"connection to {where} lost: the server closed it"
        elif status == IO_FAILED:
            self.lost = f"connection to {where} lost: {errno_text(self.err)}"
        else:
            self.lost = f"connection to {where} lost: unexpected reply to {what}"
        raise DistNetworkError(self.lost)

    # Operations, on wire keys.

    def set(self, bytes key, bytes value):
        cdef Buffer request
        cdef Answer answer
        put_u8(&request, SET)
        put_key(&request, key)
        put_key(&request, value)
        self.call(request, NO_REPLY, 0, &answer, "SET")

    def get(self, bytes key):
        """The value now stored at key; b"" when it is missing (no waiting: see wait)."""
        cdef Buffer request
        cdef Answer answer
        put_u8(&request, GET)
        put_key(&request, key)
        self.call(request, VALUE, 0, &answer, "GET")
        return answer.values[0]

    def add(self, bytes key, int64_t delta):
        cdef Buffer request
        cdef Answer answer
        put_u8(&request, ADD)
        put_key(&request, key)
        put_u64(&request, <uint64_t>delta)
        self.call(request, NUMBER, 0, &answer, "ADD")
        return answer.number

    def compare_set(self, bytes key, bytes expected, bytes desired):
        cdef Buffer request
        cdef Answer answer
        put_u8(&request, COMPARE_SET)
        put_key(&request, key)
        put_key(&request, expected)
        put_key(&request, desired)
        self.call(request, VALUE, 0, &answer, "COMPARE_SET")
        return answer.values[0]

    def check(self, keys):
        cdef Buffer request
        cdef Answer answer
        put_u8(&request, CHECK)
        put_keys(&request, keys)
        self.call(request, ONE_BYTE, 0, &answer, "CHECK")
        return answer.number == CHECK_READY

    def wait(self, keys, double timeout):
        """Block until every key exists, at most timeout seconds (then DistStoreError with
        torch's message: "wait timeout after Nms, keys: ...")."""
        cdef Buffer request
        cdef int status
        cdef int64_t now = monotonic_ms()
        cdef int64_t wait_deadline = now + <int64_t>(timeout * 1000)
        cdef int64_t deadline = now + self.timeout_ms
        keys = list(keys)
        put_u8(&request, WAIT)
        put_keys(&request, keys)
        self.check_sendable(request, "WAIT")
        with nogil:
            pthread_mutex_lock(&self.lock)
            status = self.wait_keys(request, wait_deadline, deadline)
            if status != OK and status != WAIT_TIMED_OUT:
                self.abandon()
            self.trim()
            pthread_mutex_unlock(&self.lock)
        if status == WAIT_TIMED_OUT or status == TIMED_OUT:
            raise DistStoreError(f"wait timeout after {int(timeout * 1000)}ms, keys: "
                                 + ", ".join(k.decode(errors="replace") for k in keys))
        if status != OK:
            self.fail(status, "WAIT")

    def num_keys(self):
        cdef Answer answer
        cdef Buffer request
        put_u8(&request, GETNUMKEYS)
        self.call(request, NUMBER, 0, &answer, "GETNUMKEYS")
        return answer.number

    def delete_key(self, bytes key):
        cdef Buffer request
        cdef Answer answer
        put_u8(&request, DELETE_KEY)
        put_key(&request, key)
        self.call(request, NUMBER, 0, &answer, "DELETE_KEY")
        return answer.number == 1

    def append(self, bytes key, bytes value):
        cdef Buffer request
        cdef Answer answer
        put_u8(&request, APPEND)
        put_key(&request, key)
        put_key(&request, value)
        self.call(request, NO_REPLY, 0, &answer, "APPEND")

    def multi_get(self, keys):
        cdef Buffer request
        cdef Answer answer
        keys = list(keys)
        put_u8(&request, MULTI_GET)
        put_keys(&request, keys)
        self.call(request, VALUES, len(keys), &answer, "MULTI_GET")
        return [value for value in answer.values]

    def multi_set(self, keys, values):
        cdef Buffer request
        cdef Answer answer
        keys, values = list(keys), list(values)
        if len(keys) != len(values):
            raise ValueError(f"multi_set needs as many values as keys, got {len(keys)} keys and {len(values)} values")
        put_u8(&request, MULTI_SET)
        put_u64(&request, len(keys))
        for key, value in zip(keys, values):
            put_key(&request, key)
            put_key(&request, value)
        self.call(request, NO_REPLY, 0, &answer, "MULTI_SET")

    def queue_push(self, bytes key, bytes value):
        cdef Buffer request
        cdef Answer answer
        put_u8(&request, QUEUE_PUSH)
        put_key(&request, key)
        put_key(&request, value)
        self.call(request, NO_REPLY, 0, &answer, "QUEUE_PUSH")

    def queue_pop(self, bytes key):
        """The first item of the queue, or None when it is empty (no waiting: see wait)."""
        cdef Buffer request
        cdef Answer answer
        put_u8(&request, QUEUE_POP)
        put_key(&request, key)
        self.call(request, QUEUE_ITEM, 0, &answer, "QUEUE_POP")
        return answer.values[0] if answer.number > 0 else None

    def queue_len(self, bytes key):
        cdef Buffer request
        cdef Answer answer
        put_u8(&request, QUEUE_LEN)
        put_key(&request, key)
        self.call(request, NUMBER, 0, &answer, "QUEUE_LEN")
        return answer.number

    def list_keys(self):
        cdef Answer answer
        cdef Buffer request
        put_u8(&request, LIST_KEYS)
        self.call(request, COUNTED_VALUES, 0, &answer, "LIST_KEYS")
        return [key for key in answer.values]

    def __repr__(self):
        return f"<StoreClient {self.host}:{self.port}>"
