# The state of launcher._native.store, declared apart from the code that uses it (as uvloop's
# .pxd files do): the buffers and the container operations that allocate without throwing
# (_native/store_alloc.h), a parsed request (store/protocol.pyx), the server loop's waiters,
# connections and loop (store/commands.pyx, store/loop.pyx), and the typed attributes and C methods
# of the two classes (store/server.pyx, store/client.pyx); _native/store.pyx includes those files.
# Cython reads it through launcher/_native/store.pxd, the module's package path. The types cimported
# here serve every included file as well.
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libcpp.deque cimport deque
from libcpp.string cimport string
from libcpp.unordered_map cimport unordered_map
from libcpp.vector cimport vector

from linux cimport INET6_ADDRSTRLEN, pthread_mutex_t, pthread_t


# --- memory without C++ exceptions (_native/store_alloc.h) ----------------

cdef extern from "store_alloc.h" nogil:
    cdef cppclass Buffer:
        char *data
        size_t size
        size_t capacity
        bint failed

    T *new_nothrow[T]()
    string *value_slot "map_slot"(unordered_map[string, string] &, const string &, const string **)
    deque[string] *queue_slot "map_slot"(unordered_map[string, deque[string]] &, const string &, const string **)
    bint string_assign(string &, const char *, size_t)
    bint string_append(string &, const char *, size_t)
    bint push_back_moved[C](C &, string &)
    bint vector_push_back[T](vector[T] &, const T &)
    bint vector_grow[T](vector[T] &, size_t)


# --- a request, as the parser finds it (store/protocol.pyx) ---------------

cdef struct Request:  # zeroed: no byte parsed yet
    uint8_t command
    uint8_t stage  # what parse_request reads next
    size_t parsed  # bytes of the frame parsed so far: parsing resumes there
    size_t size  # complete: the frame's length; incomplete: bytes needed before parsing on
    size_t first  # where the first key or value starts in the frame
    uint64_t count  # keys and values in the frame
    uint64_t left  # of those, still to parse
    int64_t number  # ADD delta, BARRIER world size, PING nonce, VALIDATE magic


# --- the server loop (store/commands.pyx, store/loop.pyx) -----------------

cdef struct WaitList:  # the waiters in line for one key, first come first; zeroed when made
    Registration *first
    Registration *last
    const string *key  # the key, as the table holds it (to erase the entry once the line is empty)


cdef struct Registration:  # a waiter's place in the line of one key
    Waiter *waiter
    WaitList *line  # NULL: not (or no longer) in a line
    Registration *prev
    Registration *next


cdef struct Waiter:
    Conn *conn  # the connection to answer; NULL for an in-process watch (Server.wait_count)
    Waiter *prev  # in its connection's list
    Waiter *next
    bint counting  # released by the integer at its key reaching target (BARRIER, watch); else by keys appearing
    size_t missing  # WAIT: keys still missing, as many as its registrations still in a line
    int64_t target
    int notify_fd  # in-process watch: the eventfd to signal
    size_t registered  # registrations made, from regs
    Registration *regs


cdef extern from "store_alloc.h" nogil:
    WaitList *line_slot "map_slot"(unordered_map[string, WaitList] &, const string &, const string **)


cdef enum:
    PEER_SIZE = INET6_ADDRSTRLEN + 8  # "[address]:port"
    ERROR_SIZE = 256


# Made zeroed by new_nothrow (store/loop.pyx), freed with del.
cdef cppclass Conn:
    int fd
    char peer[PEER_SIZE]  # "127.0.0.1:55555", for log lines
    bint validated
    bint closing
    bint paused  # not read while its unsent replies exceed OUTPUT_HIGH_WATER
    bint dirty  # in Loop.dirty: flushed at the end of this loop pass
    uint32_t events  # the epoll interest registered now
    Buffer inbuf  # received bytes not yet executed; the request being received starts at the first
    size_t need  # inbuf must hold this many bytes before parsing on
    Request request  # the request being received, parsed as far as its bytes came
    int64_t partial_since  # when the incomplete request now buffered began (ms); 0: none
    Buffer outbuf
    size_t out_sent
    Waiter *waiters  # its WAIT and BARRIER requests still waiting, a list through Waiter.prev and .next
    size_t waiter_count
    Conn *next_dirty  # in Loop.dirty
    Conn *next_dead  # in Loop.dead


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
    uint64_t max_request  # and reply (see request_limit)
    int64_t request_timeout_ms
    int64_t now
    int64_t last_sweep
    size_t partial_conns
    vector[Conn *] by_fd
    Conn *dirty  # replies to send at the end of this loop pass, a list through Conn.next_dirty
    Conn *dead  # closed in this loop pass, freed at its end (a list through Conn.next_dead)
    unordered_map[string, string] kv
    unordered_map[string, deque[string]] queues
    unordered_map[string, WaitList] key_waiters
    unordered_map[string, WaitList] count_waiters
    string key  # the key a request names, copied here to look it up (its memory kept for the next)
    char error[ERROR_SIZE]  # why a request closes its connection
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
    cdef char why[ERROR_SIZE]  # RETRY: why the last connect attempt failed
    cdef object lost  # why the connection is gone for good, else None
    cdef pthread_mutex_t lock

    cdef void abandon(self) noexcept nogil
    cdef void trim(self) noexcept nogil
    cdef int send_all(self, const char *data, size_t size, int64_t deadline) noexcept nogil
    cdef int fill(self, size_t n, int64_t deadline) noexcept nogil
    cdef int read_value(self, Answer *answer, int64_t deadline) noexcept nogil
    cdef int read_reply(self, int reply, size_t count, Answer *answer, int64_t deadline) noexcept nogil
    cdef int handshake(self, int64_t deadline) noexcept nogil
    cdef int try_connect(self, int64_t deadline) noexcept nogil
    cdef int connect_retrying(self, int64_t deadline) noexcept nogil
    cdef int exchange(self, const Buffer &request, int reply, size_t count, Answer *answer,
                      int64_t deadline) noexcept nogil
    cdef int wait_keys(self, const Buffer &request, int64_t wait_deadline, int64_t deadline) noexcept nogil
    cdef int call(self, const Buffer &request, int reply, size_t count, Answer *answer, str what) except -1
    cdef int check_sendable(self, const Buffer &request, str what) except -1
    cdef fail(self, int status, str what)
