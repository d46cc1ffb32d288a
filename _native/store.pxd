# The state of launcher._native.store, declared apart from the code that uses it (as uvloop's
# .pxd files do): a parsed request (store/protocol.pyx), the server loop's waiters, connections
# and loop (store/commands.pyx, store/loop.pyx), and the typed attributes and C methods of the
# two classes (store/server.pyx, store/client.pyx); _native/store.pyx includes those files.
# Cython reads it through launcher/_native/store.pxd, the module's package path. The types cimported
# here serve every included file as well.
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libcpp.deque cimport deque
from libcpp.string cimport string
from libcpp.unordered_map cimport unordered_map
from libcpp.vector cimport vector

from linux cimport pthread_mutex_t, pthread_t


# --- a request, as the parser finds it (store/protocol.pyx) ---------------

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


# --- the server loop (store/commands.pyx, store/loop.pyx) -----------------

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


# Made by new_loop (store/loop.pyx), which sets its initial values.
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


cdef class Server:
    cdef Loop *loop
    cdef readonly str host
    cdef readonly int port
    cdef object __weakref__

    cdef void _close_listeners(self)
    cdef void stop(self) noexcept nogil


# --- the client (store/client.pyx) ----------------------------------------

cdef cppclass Answer:
    int64_t number
    vector[string] values


cdef class Client:
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

    cdef void abandon(self) noexcept nogil
    cdef void trim(self) noexcept nogil
    cdef int send_all(self, const string &data, int64_t deadline) noexcept nogil
    cdef int fill(self, size_t n, int64_t deadline) noexcept nogil
    cdef int read_value(self, Answer *answer, int64_t deadline) noexcept nogil
    cdef int read_reply(self, int reply, size_t count, Answer *answer, int64_t deadline) noexcept nogil
    cdef int handshake(self, int64_t deadline) noexcept nogil
    cdef int try_connect(self, int64_t deadline) noexcept nogil
    cdef int connect_retrying(self, int64_t deadline) noexcept nogil
    cdef int exchange(self, const string &request, int reply, size_t count, Answer *answer,
                      int64_t deadline) noexcept nogil
    cdef int wait_keys(self, const string &request, int64_t wait_deadline, int64_t deadline) noexcept nogil
    cdef int call(self, const string &request, int reply, size_t count, Answer *answer, str what) except -1
    cdef fail(self, int status, str what)
