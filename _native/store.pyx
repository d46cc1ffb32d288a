# cython: boundscheck=False, wraparound=False, cdivision=True, auto_pickle=False
"""The c10d TCPStore wire protocol (PyTorch 2.13): a server and a blocking client.

The server is one epoll loop on a native thread. Keys, values, queues and
waiters live in C++ containers and the loop never takes the GIL, so Python
code in the hosting process cannot stall it. Waiters are answered by the
write that completes their keys; nothing polls.

Limits, so that no client can take the server down or grow it without bound:

* a key or value may hold at most ``max_value_size`` bytes and one request at
  most ``max_value_size + 64 KiB``; a longer length prefix closes the
  connection before anything is buffered;
* a request must arrive completely within ``request_timeout`` seconds
  (default 60) of its first byte; a client trickling bytes slower than that is
  closed at the next sweep, which runs once a second while any request is
  incomplete. A slow client never delays anyone else: the loop never blocks
  on one. Idle connections (nothing buffered) are never closed;
* a connection stops being read while more than 4 MiB of its replies are
  unsent, so a client that does not read cannot grow the server either.

Every closed-for-cause connection gets one log line on stderr, written by the
loop thread with a single write(2).
"""
from cython.operator cimport dereference as deref, preincrement as inc
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.errno cimport (EADDRINUSE, EADDRNOTAVAIL, ENOMEM, EAFNOSUPPORT, EAGAIN, ECONNABORTED, EINPROGRESS, EINTR,
                         EMFILE, ENFILE, errno)
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, memset, strerror
from libc.time cimport localtime_r, time_t, tm
from libcpp.deque cimport deque
from libcpp.string cimport string
from libcpp.unordered_map cimport unordered_map
from libcpp.vector cimport vector
from posix.fcntl cimport O_CLOEXEC as FCNTL_O_CLOEXEC, O_RDONLY, open as c_open
from posix.resource cimport RLIMIT_NOFILE, getrlimit, rlimit, setrlimit
from posix.signal cimport SIG_SETMASK, sigfillset
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, nanosleep, timespec
from posix.unistd cimport close, getpid, read, write

from linux cimport (AF_INET, AF_INET6, AF_UNSPEC, AI_PASSIVE, EFD_CLOEXEC, EFD_NONBLOCK, EPOLL_CLOEXEC,
                    EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD, EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT,
                    INET6_ADDRSTRLEN, IPPROTO_IPV6, IPPROTO_TCP, IPV6_V6ONLY, MSG_DONTWAIT, MSG_NOSIGNAL,
                    POLLIN, POLLNVAL, POLLOUT, SO_ERROR, SO_REUSEADDR,
                    SOCK_CLOEXEC, SOCK_NONBLOCK, SOCK_STREAM, SOL_SOCKET, SOMAXCONN, TCP_NODELAY, accept4,
                    addrinfo, bind, connect, epoll_create1, epoll_ctl, epoll_event, epoll_wait, eventfd,
                    freeaddrinfo, gai_strerror, getaddrinfo, getrandom, getsockname, getsockopt, htole32, htole64,
                    htons, inet_ntop, le32toh, le64toh, listen, ntohs, poll, pollfd, pthread_create,
                    pthread_join, pthread_setname_np, pthread_mutex_destroy, pthread_mutex_init, pthread_mutex_lock,
                    pthread_mutex_t, pthread_mutex_unlock, pthread_sigmask, pthread_t, recv, send,
                    setsockopt, sigset_t, sockaddr, sockaddr_in, sockaddr_in6, sockaddr_storage, socket,
                    socklen_t)


class DistError(RuntimeError):
    """A store failure; torch.distributed's name for it."""


class DistStoreError(DistError):
    """A store operation timed out (a wait, the master waiting for its workers)."""


class DistNetworkError(DistError):
    """The store cannot be reached, the server cannot bind, or the connection was lost."""


class QueueEmptyError(DistStoreError):
    """queue_pop(block=False) on an empty queue."""


class StoreInterrupted(DistError):
    """A blocking store call ended because its interrupt_fd became readable."""


# --- wire format ----------------------------------------------------------

cdef enum Command:
    VALIDATE = 0x00
    SET = 0x01
    COMPARE_SET = 0x02
    GET = 0x03
    ADD = 0x04
    CHECK = 0x05
    WAIT = 0x06
    GETNUMKEYS = 0x07
    DELETE_KEY = 0x08
    APPEND = 0x09
    MULTI_GET = 0x0a
    MULTI_SET = 0x0b
    CANCEL_WAIT = 0x0c
    PING = 0x0d
    QUEUE_PUSH = 0x0e
    QUEUE_POP = 0x0f
    QUEUE_LEN = 0x10
    LIST_KEYS = 0x11
    BARRIER = 0x12  # torch 2.13's Store.barrier(key, world_size); not in the spec's table

cdef enum:
    MAGIC = 0x3C85F7CE
    STOP_WAITING = 0
    WAIT_CANCELED = 1
    CHECK_READY = 0
    CHECK_NOT_READY = 1
    REQUEST_OVERHEAD = 64 * 1024  # what a request may hold beyond its largest value: keys, lengths
    OUTPUT_HIGH_WATER = 4 * 1024 * 1024
    KEEP_BUFFER = 1024 * 1024  # buffers grown past this are released once empty
    SCRATCH_SIZE = 256 * 1024
    READ_BUDGET = 4 * 1024 * 1024  # bytes read from one connection per loop pass, for fairness
    ACCEPT_BUDGET = 64
    MAX_EVENTS = 256
    SWEEP_INTERVAL_MS = 1000
    LISTEN_RACE_ATTEMPTS = 50  # see open_listener
    LISTEN_RACE_PAUSE_NS = 10 * 1000 * 1000

cdef enum Parse:
    PARSE_INVALID = -1
    PARSE_INCOMPLETE = 0
    PARSE_COMPLETE = 1


cdef struct Span:
    size_t start
    size_t size


cdef cppclass Request:
    uint8_t command
    size_t size  # complete: the frame's length; incomplete: bytes needed before it is worth parsing again
    int64_t number  # ADD delta, BARRIER world size, PING nonce, VALIDATE magic
    vector[Span] strings  # every key and value, in frame order


cdef struct Cursor:
    const uint8_t *data
    size_t size
    size_t pos
    uint64_t max_value
    uint64_t max_request


cdef inline uint64_t load_u64(const uint8_t *p) noexcept nogil:
    cdef uint64_t value
    memcpy(&value, p, 8)
    return le64toh(value)


cdef inline uint32_t load_u32(const uint8_t *p) noexcept nogil:
    cdef uint32_t value
    memcpy(&value, p, 4)
    return le32toh(value)


cdef void set_error(string *error, const char *text) noexcept nogil:
    error.assign(text)


cdef int parse_fixed(Cursor *c, size_t n, Request *req) noexcept nogil:
    if c.size - c.pos < n:
        req.size = c.pos + n
        return PARSE_INCOMPLETE
    return PARSE_COMPLETE


cdef int parse_string(Cursor *c, Request *req, string *error) noexcept nogil:
    cdef char text[160]
    cdef uint64_t n
    if parse_fixed(c, 8, req) != PARSE_COMPLETE:
        return PARSE_INCOMPLETE
    n = load_u64(c.data + c.pos)
    if n > c.max_value:
        snprintf(text, sizeof(text), "length prefix %llu exceeds the limit of %llu bytes",
                 <unsigned long long>n, <unsigned long long>c.max_value)
        set_error(error, text)
        return PARSE_INVALID
    c.pos += 8
    if c.pos + n > c.max_request:
        snprintf(text, sizeof(text), "request of at least %llu bytes exceeds the limit of %llu bytes",
                 <unsigned long long>(c.pos + n), <unsigned long long>c.max_request)
        set_error(error, text)
        return PARSE_INVALID
    if parse_fixed(c, n, req) != PARSE_COMPLETE:
        return PARSE_INCOMPLETE
    req.strings.push_back(Span(c.pos, n))
    c.pos += n
    return PARSE_COMPLETE


cdef int parse_strings(Cursor *c, Request *req, string *error, size_t per_item) noexcept nogil:
    """A u64 count, then count * per_item strings."""
    cdef char text[160]
    cdef uint64_t count, i
    cdef int result
    if parse_fixed(c, 8, req) != PARSE_COMPLETE:
        return PARSE_INCOMPLETE
    count = load_u64(c.data + c.pos)
    c.pos += 8
    # Each string takes at least its 8-byte length prefix.
    if count > (c.max_request - c.pos) // (8 * per_item):
        snprintf(text, sizeof(text), "key count %llu cannot fit in a request of at most %llu bytes",
                 <unsigned long long>count, <unsigned long long>c.max_request)
        set_error(error, text)
        return PARSE_INVALID
    for i in range(count * per_item):
        result = parse_string(c, req, error)
        if result != PARSE_COMPLETE:
            return result
    return PARSE_COMPLETE


cdef int parse_request(const uint8_t *data, size_t size, bint validated, uint64_t max_value,
                       Request *req, string *error) noexcept nogil:
    """Parse the request at the start of data[:size].

    Complete: req holds it and req.size is its length. Incomplete: req.size is
    how many bytes must be buffered before parsing again. Invalid: error says why.
    """
    cdef Cursor c
    cdef char text[160]
    cdef int result = PARSE_COMPLETE
    cdef int i
    c.data = data
    c.size = size
    c.pos = 1
    c.max_value = max_value
    c.max_request = max_value + REQUEST_OVERHEAD
    req.strings.clear()
    req.number = 0
    if size == 0:
        req.size = 1
        return PARSE_INCOMPLETE
    req.command = data[0]
    if not validated:
        if req.command != VALIDATE:
            snprintf(text, sizeof(text), "expected VALIDATE (0x00) first, got command byte 0x%02x", req.command)
            set_error(error, text)
            return PARSE_INVALID
        if parse_fixed(&c, 4, req) != PARSE_COMPLETE:
            return PARSE_INCOMPLETE
        req.number = load_u32(data + 1)
        if req.number != MAGIC:
            snprintf(text, sizeof(text), "wrong VALIDATE magic 0x%08x", <unsigned>req.number)
            set_error(error, text)
            return PARSE_INVALID
        c.pos += 4
    elif req.command == SET or req.command == APPEND or req.command == QUEUE_PUSH:
        for i in range(2):
            result = parse_string(&c, req, error)
            if result != PARSE_COMPLETE:
                return result
    elif req.command == COMPARE_SET:
        for i in range(3):
            result = parse_string(&c, req, error)
            if result != PARSE_COMPLETE:
                return result
    elif (req.command == GET or req.command == DELETE_KEY or req.command == QUEUE_POP
          or req.command == QUEUE_LEN):
        result = parse_string(&c, req, error)
    elif req.command == ADD or req.command == BARRIER:
        result = parse_string(&c, req, error)
        if result != PARSE_COMPLETE:
            return result
        if parse_fixed(&c, 8, req) != PARSE_COMPLETE:
            return PARSE_INCOMPLETE
        req.number = <int64_t>load_u64(data + c.pos)
        c.pos += 8
    elif req.command == CHECK or req.command == WAIT or req.command == MULTI_GET:
        result = parse_strings(&c, req, error, 1)
    elif req.command == MULTI_SET:
        result = parse_strings(&c, req, error, 2)
    elif req.command == PING:
        if parse_fixed(&c, 4, req) != PARSE_COMPLETE:
            return PARSE_INCOMPLETE
        req.number = load_u32(data + 1)
        c.pos += 4
    elif not (req.command == GETNUMKEYS or req.command == CANCEL_WAIT or req.command == LIST_KEYS):
        snprintf(text, sizeof(text), "unknown command byte 0x%02x", req.command)
        set_error(error, text)
        return PARSE_INVALID
    if result != PARSE_COMPLETE:
        return result
    req.size = c.pos
    return PARSE_COMPLETE


def parse_frame(data, bint validated=True, max_value_size=1 << 30):
    """Run the server's request parser over ``data`` (bytes), without a socket.

    Returns None when data holds no complete request yet, else
    ``(length, command, [keys and values], number)``; raises ValueError with the
    reason the server would give when closing the connection.
    """
    cdef bytes buffer = bytes(data)
    cdef Request req
    cdef string error
    cdef int result = parse_request(<const uint8_t *>PyBytes_AS_STRING(buffer), PyBytes_GET_SIZE(buffer),
                                    validated, max_value_size, &req, &error)
    if result == PARSE_INVALID:
        raise ValueError(error.decode())
    if result == PARSE_INCOMPLETE:
        return None
    return (req.size, req.command,
            [buffer[span.start:span.start + span.size] for span in req.strings], req.number)


# --- integers as the store keeps them: ASCII decimal -----------------------

cdef bint parse_int(const string &text, int64_t *out) noexcept nogil:
    """Read an integer the way torch's server does (std::stoll): leading white
    space, an optional sign, at least one digit; what follows the digits is ignored."""
    cdef const char *p = text.data()
    cdef size_t i = 0, n = text.size()
    cdef bint negative = False
    cdef uint64_t value = 0, digit, limit
    cdef bint digits = False
    while i < n and (p[i] == b' ' or b'\t' <= p[i] <= b'\r'):
        i += 1
    if i < n and (p[i] == b'+' or p[i] == b'-'):
        negative = p[i] == b'-'
        i += 1
    limit = (<uint64_t>1) << 63
    if not negative:
        limit -= 1
    while i < n and b'0' <= p[i] <= b'9':
        digit = <uint64_t>(p[i] - ord('0'))
        if value > (limit - digit) // 10:
            return False
        value = value * 10 + digit
        digits = True
        i += 1
    if not digits:
        return False
    out[0] = <int64_t>(0 - value) if negative else <int64_t>value
    return True


cdef void format_int(int64_t value, string *out) noexcept nogil:
    cdef char text[24]
    cdef int n = snprintf(text, sizeof(text), "%lld", <long long>value)
    out.assign(text, n)


# --- logging --------------------------------------------------------------

cdef void log_line(char level, const string &message) noexcept nogil:
    """One glog-shaped line on stderr, in a single write(2) so lines never interleave."""
    cdef timespec now
    cdef time_t seconds
    cdef tm local
    cdef char head[96]
    cdef int n
    cdef string line
    clock_gettime(CLOCK_REALTIME, &now)
    seconds = now.tv_sec
    localtime_r(&seconds, &local)
    n = snprintf(head, sizeof(head), "%c%02d%02d %02d:%02d:%02d.%03d %d launcher] store: ", level,
                 local.tm_mon + 1, local.tm_mday, local.tm_hour, local.tm_min, local.tm_sec,
                 <int>(now.tv_nsec // 1000000), <int>getpid())
    line.assign(head, n)
    line.append(message)
    line.push_back(b'\n')
    # A failed write to stderr has nowhere to be reported.
    write(2, line.data(), line.size())


cdef void append_printable(string *out, const string &raw) noexcept nogil:
    """raw for a log line: non-printable bytes as \\xNN, at most 80 of them."""
    cdef char text[8]
    cdef const char *p = raw.data()
    cdef size_t i
    for i in range(min(raw.size(), <size_t>80)):
        if 0x20 <= <uint8_t>p[i] < 0x7f and p[i] != b'\\':
            out.push_back(p[i])
        else:
            snprintf(text, sizeof(text), "\\x%02x", <uint8_t>p[i])
            out.append(<const char *>text)
    if raw.size() > 80:
        out.append(<const char *>b"...")


cdef inline int64_t monotonic_ms() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return <int64_t>now.tv_sec * 1000 + now.tv_nsec // 1000000


cdef str os_error(int code):
    return f"[Errno {code}] {strerror(code).decode()}"


# --- the server -----------------------------------------------------------

cdef cppclass Waiter:
    Conn *conn  # the connection to answer; NULL for an in-process watch (Server.wait_count)
    bint counting  # released by the integer at its key reaching target (BARRIER, watch); else by keys appearing
    size_t missing  # keys still missing (WAIT)
    int64_t target
    int notify_fd  # in-process watch: the eventfd to signal
    vector[string] keys  # the keys it is registered under


cdef cppclass Conn:
    int fd
    string peer  # "127.0.0.1:55555", for log lines
    bint validated
    bint closing
    bint paused  # not read while its unsent replies exceed OUTPUT_HIGH_WATER
    bint dirty  # queued for a flush at the end of this loop pass
    uint32_t events  # the epoll interest registered now
    string inbuf  # received bytes not yet executed
    size_t need  # inbuf must hold this many bytes before parsing again
    int64_t partial_since  # when the incomplete request now buffered began (ms); 0: none
    string outbuf
    size_t out_sent
    vector[Waiter *] waiters


cdef cppclass Loop:
    pthread_mutex_t lock  # the loop thread holds it while it handles events; Python calls take it briefly
    pthread_t thread
    bint running
    bint stopping
    bint accepting  # the listening sockets are watched (see set_accepting)
    int epfd
    int wake_fd  # eventfd: written to stop the loop
    int reserve_fd  # given up to accept (and refuse) a connection when out of descriptors
    vector[int] listen_fds
    uint64_t max_value
    int64_t request_timeout_ms
    int64_t now
    int64_t last_sweep
    size_t partial_conns
    vector[Conn *] by_fd
    vector[Conn *] dirty
    vector[Conn *] dead
    unordered_map[string, string] kv
    unordered_map[string, deque[string]] queues
    unordered_map[string, vector[Waiter *]] key_waiters
    unordered_map[string, vector[Waiter *]] count_waiters
    Request request
    string error
    char *scratch

    __init__():
        this.running = False
        this.stopping = False
        this.accepting = True
        this.epfd = -1
        this.wake_fd = -1
        this.reserve_fd = -1
        this.partial_conns = 0
        this.last_sweep = 0
        this.scratch = NULL


cdef inline string span_string(const char *frame, Request *req, size_t i) noexcept nogil:
    return string(frame + req.strings[i].start, req.strings[i].size)


cdef inline void put_u8(string *out, uint8_t value) noexcept nogil:
    out.push_back(<char>value)


cdef inline void put_u64(string *out, uint64_t value) noexcept nogil:
    cdef uint64_t wire = htole64(value)
    out.append(<const char *>&wire, 8)


cdef inline void put_bytes(string *out, const char *data, size_t size) noexcept nogil:
    put_u64(out, size)
    out.append(data, size)


cdef inline void put_string(string *out, const string &value) noexcept nogil:
    put_bytes(out, value.data(), value.size())


cdef void mark_dirty(Loop *L, Conn *c) noexcept nogil:
    if not c.dirty:
        c.dirty = True
        L.dirty.push_back(c)


cdef void remove_from(vector[Waiter *] *waiters, Waiter *w) noexcept nogil:
    cdef size_t i
    for i in range(waiters.size()):
        if waiters[0][i] == w:
            waiters.erase(waiters.begin() + i)
            return


cdef void unregister(Loop *L, Waiter *w) noexcept nogil:
    """Take w out of the waiter lists of every key it is still registered under."""
    cdef unordered_map[string, vector[Waiter *]] *table = &L.count_waiters if w.counting else &L.key_waiters
    cdef unordered_map[string, vector[Waiter *]].iterator it
    for key in w.keys:
        it = table.find(key)
        if it != table.end():
            remove_from(&deref(it).second, w)
            if deref(it).second.empty():
                table.erase(it)


cdef void release(Loop *L, Waiter *w) noexcept nogil:
    """w's condition holds: answer its connection (or signal its watcher). w is already unregistered."""
    cdef uint64_t one = 1
    if w.conn == NULL:
        # The watcher owns w and frees it; a full eventfd counter cannot happen with one write per watch.
        write(w.notify_fd, &one, 8)
        return
    put_u8(&w.conn.outbuf, STOP_WAITING)
    mark_dirty(L, w.conn)
    remove_from(&w.conn.waiters, w)
    del w


cdef void release_counts(Loop *L, const string &key) noexcept nogil:
    """Release the counting waiters of key whose target its integer value has reached."""
    cdef unordered_map[string, vector[Waiter *]].iterator it = L.count_waiters.find(key)
    cdef unordered_map[string, string].iterator value
    cdef int64_t count
    cdef vector[Waiter *] keep, done
    if it == L.count_waiters.end():
        return
    value = L.kv.find(key)
    if value == L.kv.end() or not parse_int(deref(value).second, &count):
        return
    for w in deref(it).second:
        if w.target <= count:
            done.push_back(w)
        else:
            keep.push_back(w)
    if done.empty():
        return
    if keep.empty():
        L.count_waiters.erase(it)
    else:
        deref(it).second.swap(keep)
    for w in done:
        release(L, w)


cdef void key_written(Loop *L, const string &key) noexcept nogil:
    """key was set, added to, appended to or created: release who waited for it."""
    cdef unordered_map[string, vector[Waiter *]].iterator it = L.key_waiters.find(key)
    cdef vector[Waiter *] waiting
    if it != L.key_waiters.end():
        waiting.swap(deref(it).second)
        L.key_waiters.erase(it)
        for w in waiting:
            w.missing -= 1
            if w.missing == 0:
                release(L, w)
    release_counts(L, key)


cdef void queue_pushed(Loop *L, const string &key) noexcept nogil:
    """One item arrived: it releases at most one waiter (a blocking queue_pop), the first in line
    for which it is the last missing key; waiters on several keys ahead of it count it as present."""
    cdef unordered_map[string, vector[Waiter *]].iterator it = L.key_waiters.find(key)
    cdef Waiter *w
    if it == L.key_waiters.end():
        return
    while not deref(it).second.empty():
        w = deref(it).second.front()
        deref(it).second.erase(deref(it).second.begin())
        w.missing -= 1
        if w.missing == 0:
            release(L, w)
            break
    if deref(it).second.empty():
        L.key_waiters.erase(it)


cdef bint key_present(Loop *L, const string &key) noexcept nogil:
    cdef unordered_map[string, deque[string]].iterator q
    if L.kv.count(key):
        return True
    q = L.queues.find(key)
    return q != L.queues.end() and not deref(q).second.empty()


cdef void cancel_waits(Loop *L, Conn *c) noexcept nogil:
    for w in c.waiters:
        unregister(L, w)
        del w
    c.waiters.clear()


cdef bint add_to(Loop *L, const string &key, int64_t delta, int64_t *result, const char *command,
                 string *error) noexcept nogil:
    """ADD's arithmetic: the stored decimal plus delta, wrapping like torch's server."""
    cdef unordered_map[string, string].iterator it = L.kv.find(key)
    cdef int64_t current = 0
    if it != L.kv.end() and not parse_int(deref(it).second, &current):
        error.assign(command)
        error.append(<const char *>b" on a value that is not a 64-bit integer (key ")
        append_printable(error, key)
        error.append(b")")
        return False
    result[0] = <int64_t>(<uint64_t>current + <uint64_t>delta)
    format_int(result[0], &L.kv[key])
    key_written(L, key)
    return True


cdef bint execute(Loop *L, Conn *c, const char *frame, Request *req, string *error) noexcept nogil:
    """Apply one parsed request and append its reply. False: close the connection (error says why)."""
    cdef string key, value
    cdef unordered_map[string, string].iterator it
    cdef unordered_map[string, deque[string]].iterator q
    cdef int64_t number
    cdef size_t i
    cdef Waiter *w
    cdef string *out = &c.outbuf
    cmd = req.command
    if cmd == VALIDATE:
        c.validated = True
    elif cmd == SET:
        key = span_string(frame, req, 0)
        L.kv[key].assign(frame + req.strings[1].start, req.strings[1].size)
        key_written(L, key)
    elif cmd == GET:
        it = L.kv.find(span_string(frame, req, 0))
        if it == L.kv.end():
            put_u64(out, 0)
        else:
            put_string(out, deref(it).second)
    elif cmd == ADD:
        if not add_to(L, span_string(frame, req, 0), req.number, &number, "ADD", error):
            return False
        put_u64(out, <uint64_t>number)
    elif cmd == CHECK:
        for i in range(req.strings.size()):
            if not key_present(L, span_string(frame, req, i)):
                put_u8(out, CHECK_NOT_READY)
                break
        else:
            put_u8(out, CHECK_READY)
    elif cmd == WAIT:
        w = NULL
        for i in range(req.strings.size()):
            key = span_string(frame, req, i)
            if key_present(L, key):
                continue
            if w == NULL:
                w = new Waiter()
                w.conn = c
                w.counting = False
                w.missing = 0
            elif any_equal(w.keys, key):
                continue  # the same key twice counts once
            w.keys.push_back(key)
            w.missing += 1
            L.key_waiters[key].push_back(w)
        if w == NULL:
            put_u8(out, STOP_WAITING)
        else:
            c.waiters.push_back(w)
    elif cmd == COMPARE_SET:
        key = span_string(frame, req, 0)
        it = L.kv.find(key)
        if it == L.kv.end():
            if req.strings[1].size == 0:
                L.kv[key].assign(frame + req.strings[2].start, req.strings[2].size)
                put_bytes(out, frame + req.strings[2].start, req.strings[2].size)
                key_written(L, key)
            else:
                # torch's answer for a missing key: the expected value, nothing stored.
                put_bytes(out, frame + req.strings[1].start, req.strings[1].size)
        else:
            if (deref(it).second.size() == req.strings[1].size
                    and memcmp(deref(it).second.data(), frame + req.strings[1].start, req.strings[1].size) == 0):
                deref(it).second.assign(frame + req.strings[2].start, req.strings[2].size)
                put_string(out, deref(it).second)
                release_counts(L, key)
            else:
                put_string(out, deref(it).second)
    elif cmd == GETNUMKEYS:
        put_u64(out, L.kv.size())
    elif cmd == DELETE_KEY:
        put_u64(out, L.kv.erase(span_string(frame, req, 0)))
    elif cmd == APPEND:
        key = span_string(frame, req, 0)
        L.kv[key].append(frame + req.strings[1].start, req.strings[1].size)
        key_written(L, key)
    elif cmd == MULTI_GET:
        for i in range(req.strings.size()):
            it = L.kv.find(span_string(frame, req, i))
            if it == L.kv.end():
                put_u64(out, 0)
            else:
                put_string(out, deref(it).second)
    elif cmd == MULTI_SET:
        for i in range(0, req.strings.size(), 2):
            key = span_string(frame, req, i)
            L.kv[key].assign(frame + req.strings[i + 1].start, req.strings[i + 1].size)
            key_written(L, key)
    elif cmd == CANCEL_WAIT:
        cancel_waits(L, c)
        put_u8(out, WAIT_CANCELED)
    elif cmd == PING:
        number = htole32(<uint32_t>req.number)
        out.append(<const char *>&number, 4)
    elif cmd == QUEUE_PUSH:
        key = span_string(frame, req, 0)
        value.assign(frame + req.strings[1].start, req.strings[1].size)
        L.queues[key].push_back(value)
        queue_pushed(L, key)
    elif cmd == QUEUE_POP:
        q = L.queues.find(span_string(frame, req, 0))
        if q == L.queues.end():
            put_u64(out, 0)
        else:
            # torch's server answers the length before the pop, then one value.
            put_u64(out, deref(q).second.size())
            put_string(out, deref(q).second.front())
            deref(q).second.pop_front()
            if deref(q).second.empty():
                L.queues.erase(q)
    elif cmd == QUEUE_LEN:
        q = L.queues.find(span_string(frame, req, 0))
        put_u64(out, 0 if q == L.queues.end() else deref(q).second.size())
    elif cmd == LIST_KEYS:
        put_u64(out, L.kv.size())
        for entry in L.kv:
            put_string(out, entry.first)
    elif cmd == BARRIER:
        key = span_string(frame, req, 0)
        if not add_to(L, key, 1, &number, "BARRIER", error):
            return False
        if number >= req.number:
            put_u8(out, STOP_WAITING)
        else:
            w = new Waiter()
            w.conn = c
            w.counting = True
            w.target = req.number
            w.keys.push_back(key)
            L.count_waiters[key].push_back(w)
            c.waiters.push_back(w)
    return True


cdef bint any_equal(const vector[string] &keys, const string &key) noexcept nogil:
    cdef size_t i
    for i in range(keys.size()):
        if keys[i] == key:
            return True
    return False


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
    cdef int fd, code, one = 1, i
    cdef epoll_event ev
    cdef Conn *c
    cdef string peer, line
    for i in range(ACCEPT_BUDGET):
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


cdef int bind_listeners(Loop *L, const char *host, int port, string *error, int *code) noexcept nogil:
    """Listen on every address host resolves to, all on one port (port 0: the kernel picks
    it for the first address). Returns the port, or -1 with error (and code: errno or 0)."""
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
        error.assign(gai_strerror(rc))
        return -1
    ai = found
    while ai != NULL:
        has_ipv4 = has_ipv4 or ai.ai_family == AF_INET
        ai = ai.ai_next
    ai = found
    while ai != NULL:
        memcpy(&addr, ai.ai_addr, ai.ai_addrlen)
        set_port(&addr, port)
        this_addr.assign(<const char *>&addr, ai.ai_addrlen)
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
        L.listen_fds.push_back(fd)
        bound.push_back(this_addr)
        ai = ai.ai_next
    freeaddrinfo(found)
    if code[0] == 0 and L.listen_fds.empty():
        code[0] = skipped
    if code[0] != 0:
        error.assign(strerror(code[0]))
        return -1
    return port


cdef enum Status:
    OK = 0
    TIMED_OUT = 1
    INTERRUPTED = 2
    PEER_CLOSED = 3
    IO_FAILED = 4  # errno in the caller's err
    BAD_INTERRUPT_FD = 5
    UNEXPECTED_REPLY = 6
    RETRY = 7  # connect: this attempt failed, err_text says why
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


cdef int64_t deadline_after(double seconds) noexcept nogil:
    return monotonic_ms() + <int64_t>(seconds * 1000)


cdef void raise_open_file_limit():
    """Thousands of idle connections each hold a descriptor: allow as many as the hard limit does."""
    cdef rlimit limit
    if getrlimit(RLIMIT_NOFILE, &limit) != 0:
        raise OSError(errno, f"getrlimit(RLIMIT_NOFILE): {strerror(errno).decode()}")
    if limit.rlim_cur < limit.rlim_max:
        limit.rlim_cur = limit.rlim_max
        if setrlimit(RLIMIT_NOFILE, &limit) != 0:
            raise OSError(errno, f"setrlimit(RLIMIT_NOFILE): {strerror(errno).decode()}")


cdef class Server:
    """A TCPStore server on host:port (port 0: a free port, see .port), served by a native thread.

    ``Server(host, port=0, max_value_size=1 << 30, *, request_timeout=60.0)``: host is
    resolved with getaddrinfo and the server listens on each address it names, nowhere else.
    """
    cdef Loop *loop
    cdef readonly str host
    cdef readonly int port
    cdef object __weakref__

    def __cinit__(self):
        self.loop = new Loop()
        pthread_mutex_init(&self.loop.lock, NULL)

    def __init__(self, str host, int port=0, max_value_size=1 << 30, *, double request_timeout=60.0):
        cdef Loop *L = self.loop
        cdef string error
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
        L.request_timeout_ms = <int64_t>(request_timeout * 1000)
        raise_open_file_limit()
        # With port 0 the kernel picks a port free on the first address only; another address
        # may have it taken. Rare: pick again.
        for _ in range(8):
            with nogil:
                bound = bind_listeners(L, host_c, port, &error, &code)
            if bound >= 0 or port != 0 or code != EADDRINUSE:
                break
            self._close_listeners()
        if bound < 0:
            self._close_listeners()
            message = f"[Errno {code}] {error.decode()}" if code else error.decode()
            raise DistNetworkError(f"cannot listen on {host}:{port}: {message}")
        self.port = bound
        try:
            L.epfd = epoll_create1(EPOLL_CLOEXEC)
            if L.epfd < 0:
                raise OSError(errno, f"epoll_create1: {strerror(errno).decode()}")
            L.wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
            if L.wake_fd < 0:
                raise OSError(errno, f"eventfd: {strerror(errno).decode()}")
            L.reserve_fd = c_open(b"/dev/null", O_RDONLY | FCNTL_O_CLOEXEC)
            if L.reserve_fd < 0:
                raise OSError(errno, f"open /dev/null: {strerror(errno).decode()}")
            for fd in [L.wake_fd] + list(L.listen_fds):
                ev.events = EPOLLIN
                ev.data.fd = fd
                if epoll_ctl(L.epfd, EPOLL_CTL_ADD, fd, &ev) != 0:
                    raise OSError(errno, f"epoll_ctl: {strerror(errno).decode()}")
            L.scratch = <char *>malloc(SCRATCH_SIZE)
            if L.scratch == NULL:
                raise MemoryError()
            # The loop thread takes no signals: they belong to the agent's own handling (its signalfd).
            sigfillset(&all_signals)
            pthread_sigmask(SIG_SETMASK, &all_signals, &previous)
            code = pthread_create(&L.thread, NULL, run_loop, L)
            pthread_sigmask(SIG_SETMASK, &previous, NULL)
            if code != 0:
                raise OSError(code, f"pthread_create: {strerror(code).decode()}")
            L.running = True
            # Named here rather than by the thread itself, so the name is there once this returns.
            code = pthread_setname_np(L.thread, b"launcher-store")
            if code != 0:
                raise OSError(code, f"pthread_setname_np: {strerror(code).decode()}")
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
        cdef Waiter *w = new Waiter()
        cdef int status = OK, err = 0
        cdef int64_t value = 0
        cdef int64_t deadline = deadline_after(timeout)
        cdef bint closed
        w.conn = NULL
        w.counting = True
        w.target = count
        w.keys.push_back(wire_key)
        w.notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if w.notify_fd < 0:
            del w
            raise OSError(errno, f"eventfd: {strerror(errno).decode()}")
        with nogil:
            pthread_mutex_lock(&L.lock)
            closed = L.stopping
            if not closed and not (read_count(L, wire_key, &value) and value >= count):
                L.count_waiters[wire_key].push_back(w)
                pthread_mutex_unlock(&L.lock)
                status = wait_io(w.notify_fd, POLLIN, interrupt_fd, deadline, &err)
                pthread_mutex_lock(&L.lock)
                unregister(L, w)
                closed = L.stopping
                read_count(L, wire_key, &value)
            pthread_mutex_unlock(&L.lock)
        close(w.notify_fd)
        del w
        if status == INTERRUPTED:
            raise StoreInterrupted(f"waiting for {key!r} to reach {count} interrupted: interrupt_fd {interrupt_fd} became readable")
        if status == BAD_INTERRUPT_FD:
            raise ValueError(f"interrupt_fd {interrupt_fd} is not an open file descriptor")
        if status == IO_FAILED:
            raise OSError(err, f"poll: {strerror(err).decode()}")
        if closed:
            raise DistStoreError(f"store server on {self.host}:{self.port} closed while waiting for {key!r} to reach {count}")
        return value

    def __dealloc__(self):
        self.stop()
        pthread_mutex_destroy(&self.loop.lock)
        del self.loop

    def __repr__(self):
        return f"<StoreServer {self.host}:{self.port}{' closed' if self.loop.stopping else ''}>"


cdef bint read_count(Loop *L, const string &key, int64_t *value) noexcept nogil:
    cdef unordered_map[string, string].iterator it = L.kv.find(key)
    value[0] = 0
    return it != L.kv.end() and parse_int(deref(it).second, value)


cdef void drop_all_but(Loop *L, const string &prefix) noexcept nogil:
    """Drop every key and queue, but those whose name starts with a non-empty prefix."""
    cdef unordered_map[string, string].iterator kv = L.kv.begin()
    cdef unordered_map[string, deque[string]].iterator q = L.queues.begin()
    cdef bint keep_some = not prefix.empty()
    while kv != L.kv.end():
        if keep_some and deref(kv).first.compare(0, prefix.size(), prefix) == 0:
            inc(kv)
        else:
            kv = L.kv.erase(kv)
    while q != L.queues.end():
        if keep_some and deref(q).first.compare(0, prefix.size(), prefix) == 0:
            inc(q)
        else:
            q = L.queues.erase(q)


cdef void release_everything(Loop *L) noexcept nogil:
    """After the loop thread ended: close every socket and free every connection; in-process
    watchers are woken (they own their waiter and find themselves unregistered)."""
    cdef uint64_t one = 1
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
    for entry in L.count_waiters:
        for w in entry.second:
            if w.conn == NULL:
                write(w.notify_fd, &one, 8)
    L.count_waiters.clear()
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


# --- the client -----------------------------------------------------------

cdef enum Reply:
    NO_REPLY
    ONE_BYTE
    NUMBER  # i64
    VALUE  # one length-prefixed value
    VALUES  # as many values as keys were sent
    COUNTED_VALUES  # a u64 count, then that many values
    QUEUE_ITEM  # an i64 (0: empty), then one value unless 0


cdef cppclass Answer:
    int64_t number
    vector[string] values


cdef inline void put_u32(string *out, uint32_t value) noexcept nogil:
    cdef uint32_t wire = htole32(value)
    out.append(<const char *>&wire, 4)


cdef void put_key(string *out, key):
    if not isinstance(key, bytes):
        raise TypeError(f"store keys and values are bytes here, got {type(key).__name__}")
    put_bytes(out, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))


cdef void put_keys(string *out, keys):
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
    cdef int fd
    cdef readonly str host
    cdef readonly int port
    cdef string host_c
    cdef int64_t timeout_ms
    cdef readonly int interrupt_fd
    cdef char *rbuf  # received bytes: rlen of them in rcap, the unread ones from rpos
    cdef size_t rcap, rlen, rpos
    cdef int err  # IO_FAILED: the errno
    cdef string why  # RETRY: why the last connect attempt failed
    cdef object lost  # why the connection is gone for good, else None
    cdef pthread_mutex_t lock

    def __cinit__(self):
        self.fd = -1
        self.rbuf = NULL
        self.rcap = self.rlen = self.rpos = 0
        pthread_mutex_init(&self.lock, NULL)

    def __init__(self, str host, int port, double timeout=300.0, int interrupt_fd=-1):
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
        self.call(string(), NO_REPLY, 0, &unused, "connect")

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

    cdef int send_all(self, const string &data, int64_t deadline) noexcept nogil:
        cdef size_t pos = 0
        cdef ssize_t n
        cdef int status
        while pos < data.size():
            n = send(self.fd, data.data() + pos, data.size() - pos, MSG_NOSIGNAL)
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
        cdef int status = self.fill(8, deadline)
        if status != OK:
            return status
        size = load_u64(<const uint8_t *>self.rbuf + self.rpos)
        self.rpos += 8
        status = self.fill(size, deadline)
        if status != OK:
            return status
        answer.values.push_back(string(self.rbuf + self.rpos, size))
        self.rpos += size
        return OK

    cdef int read_reply(self, int reply, size_t count, Answer *answer, int64_t deadline) noexcept nogil:
        cdef int status = OK
        cdef size_t i
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
            for i in range(count):
                status = self.read_value(answer, deadline)
                if status != OK:
                    return status
        elif reply == VALUE or reply == VALUES:
            for i in range(1 if reply == VALUE else count):
                status = self.read_value(answer, deadline)
                if status != OK:
                    return status
        return status

    cdef int handshake(self, int64_t deadline) noexcept nogil:
        cdef string request
        cdef uint32_t nonce = <uint32_t>(monotonic_ms() * 2654435761u) ^ <uint32_t>getpid()
        cdef int status
        request.push_back(VALIDATE)
        put_u32(&request, MAGIC)
        request.push_back(PING)
        put_u32(&request, nonce)
        status = self.send_all(request, deadline)
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
            self.why.assign(gai_strerror(rc))
            return RETRY
        ai = found
        while ai != NULL and status == RETRY:
            fd = socket(ai.ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, ai.ai_protocol)
            if fd < 0:
                self.why.assign(strerror(errno))
                ai = ai.ai_next
                continue
            rc = connect(fd, ai.ai_addr, ai.ai_addrlen)
            if rc != 0 and errno == EINPROGRESS:
                rc = wait_io(fd, POLLOUT, self.interrupt_fd, deadline, &self.err)
                if rc == TIMED_OUT:
                    self.why.assign(b"connect timed out")
                    close(fd)
                    break
                if rc != OK:
                    close(fd)
                    status = rc
                    break
                rc = getsockopt(fd, SOL_SOCKET, SO_ERROR, &so_error, &size)
            # Requests are small and each waits for its reply: Nagle would only delay them.
            if rc != 0 or so_error != 0 or setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0:
                self.why.assign(strerror(so_error if so_error != 0 else errno))
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
                self.why.assign(b"the PING nonce did not come back (not a store server?)")
            elif rc == PEER_CLOSED:
                self.why.assign(b"the server closed the connection during the handshake")
            elif rc == IO_FAILED:
                self.why.assign(strerror(self.err))
            else:
                self.why.assign(b"no answer to the handshake")
            ai = ai.ai_next
        freeaddrinfo(found)
        return status

    cdef int connect(self, int64_t deadline) noexcept nogil:
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

    cdef int exchange(self, const string &request, int reply, size_t count, Answer *answer,
                      int64_t deadline) noexcept nogil:
        cdef int status = OK
        if self.fd < 0:
            status = self.connect(deadline)
        if status == OK and not request.empty():
            status = self.send_all(request, deadline)
        if status == OK:
            status = self.read_reply(reply, count, answer, deadline)
        return status

    cdef int wait_keys(self, const string &request, int64_t wait_deadline, int64_t deadline) noexcept nogil:
        """WAIT as torch's client does it: past wait_deadline, send CANCEL_WAIT and read up to
        WAIT_CANCELED (a STOP_WAITING may come first, when the keys arrived meanwhile)."""
        cdef Answer answer
        cdef int status = self.exchange(request, NO_REPLY, 0, &answer, deadline)
        cdef string cancel
        if status != OK:
            return status
        status = self.read_reply(ONE_BYTE, 0, &answer, wait_deadline)
        if status == OK:
            return OK if answer.number == STOP_WAITING else UNEXPECTED_REPLY
        if status != TIMED_OUT:
            return status
        cancel.push_back(CANCEL_WAIT)
        deadline = monotonic_ms() + self.timeout_ms
        status = self.send_all(cancel, deadline)
        while status == OK:
            status = self.read_reply(ONE_BYTE, 0, &answer, deadline)
            if status == OK and answer.number == WAIT_CANCELED:
                return WAIT_TIMED_OUT
            if status == OK and answer.number != STOP_WAITING:
                return UNEXPECTED_REPLY
        return status

    cdef int call(self, const string &request, int reply, size_t count, Answer *answer, str what) except -1:
        cdef int status
        cdef int64_t deadline = monotonic_ms() + self.timeout_ms
        if self.lost is not None:
            raise DistNetworkError(self.lost)
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
            self.lost = f"connection to {where} lost: {os_error(self.err)}"
        else:
            self.lost = f"connection to {where} lost: unexpected reply to {what}"
        raise DistNetworkError(self.lost)

    # Operations, on wire keys.

    def set(self, bytes key, bytes value):
        cdef string request
        cdef Answer answer
        request.push_back(SET)
        put_key(&request, key)
        put_key(&request, value)
        self.call(request, NO_REPLY, 0, &answer, "SET")

    def get(self, bytes key):
        """The value now stored at key; b"" when it is missing (no waiting: see wait)."""
        cdef string request
        cdef Answer answer
        request.push_back(GET)
        put_key(&request, key)
        self.call(request, VALUE, 0, &answer, "GET")
        return answer.values[0]

    def add(self, bytes key, int64_t delta):
        cdef string request
        cdef Answer answer
        request.push_back(ADD)
        put_key(&request, key)
        put_u64(&request, <uint64_t>delta)
        self.call(request, NUMBER, 0, &answer, "ADD")
        return answer.number

    def compare_set(self, bytes key, bytes expected, bytes desired):
        cdef string request
        cdef Answer answer
        request.push_back(COMPARE_SET)
        put_key(&request, key)
        put_key(&request, expected)
        put_key(&request, desired)
        self.call(request, VALUE, 0, &answer, "COMPARE_SET")
        return answer.values[0]

    def check(self, keys):
        cdef string request
        cdef Answer answer
        request.push_back(CHECK)
        put_keys(&request, keys)
        self.call(request, ONE_BYTE, 0, &answer, "CHECK")
        return answer.number == CHECK_READY

    def wait(self, keys, double timeout):
        """Block until every key exists, at most timeout seconds (then DistStoreError with
        torch's message: "wait timeout after Nms, keys: ...")."""
        cdef string request
        cdef int status
        cdef int64_t now = monotonic_ms()
        cdef int64_t wait_deadline = now + <int64_t>(timeout * 1000)
        cdef int64_t deadline = now + self.timeout_ms
        keys = list(keys)
        request.push_back(WAIT)
        put_keys(&request, keys)
        if self.lost is not None:
            raise DistNetworkError(self.lost)
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
        self.call(string(1, GETNUMKEYS), NUMBER, 0, &answer, "GETNUMKEYS")
        return answer.number

    def delete_key(self, bytes key):
        cdef string request
        cdef Answer answer
        request.push_back(DELETE_KEY)
        put_key(&request, key)
        self.call(request, NUMBER, 0, &answer, "DELETE_KEY")
        return answer.number == 1

    def append(self, bytes key, bytes value):
        cdef string request
        cdef Answer answer
        request.push_back(APPEND)
        put_key(&request, key)
        put_key(&request, value)
        self.call(request, NO_REPLY, 0, &answer, "APPEND")

    def multi_get(self, keys):
        cdef string request
        cdef Answer answer
        keys = list(keys)
        request.push_back(MULTI_GET)
        put_keys(&request, keys)
        self.call(request, VALUES, len(keys), &answer, "MULTI_GET")
        return [value for value in answer.values]

    def multi_set(self, keys, values):
        cdef string request
        cdef Answer answer
        keys, values = list(keys), list(values)
        if len(keys) != len(values):
            raise ValueError(f"multi_set needs as many values as keys, got {len(keys)} keys and {len(values)} values")
        request.push_back(MULTI_SET)
        put_u64(&request, len(keys))
        for key, value in zip(keys, values):
            put_key(&request, key)
            put_key(&request, value)
        self.call(request, NO_REPLY, 0, &answer, "MULTI_SET")

    def queue_push(self, bytes key, bytes value):
        cdef string request
        cdef Answer answer
        request.push_back(QUEUE_PUSH)
        put_key(&request, key)
        put_key(&request, value)
        self.call(request, NO_REPLY, 0, &answer, "QUEUE_PUSH")

    def queue_pop(self, bytes key):
        """The first item of the queue, or None when it is empty (no waiting: see wait)."""
        cdef string request
        cdef Answer answer
        request.push_back(QUEUE_POP)
        put_key(&request, key)
        self.call(request, QUEUE_ITEM, 0, &answer, "QUEUE_POP")
        return answer.values[0] if answer.number > 0 else None

    def queue_len(self, bytes key):
        cdef string request
        cdef Answer answer
        request.push_back(QUEUE_LEN)
        put_key(&request, key)
        self.call(request, NUMBER, 0, &answer, "QUEUE_LEN")
        return answer.number

    def list_keys(self):
        cdef Answer answer
        self.call(string(1, LIST_KEYS), COUNTED_VALUES, 0, &answer, "LIST_KEYS")
        return [key for key in answer.values]

    def __repr__(self):
        return f"<StoreClient {self.host}:{self.port}>"
