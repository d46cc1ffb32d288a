# The state of output routing: a stream's route as the agent asks for it, the
# log files, the launcher's two consoles, and one worker stream's lines.

cdef extern from "<string.h>" nogil:
    void *memmem(const void *haystack, size_t haystacklen, const void *needle, size_t needlelen)

cdef extern from "<limits.h>" nogil:
    enum:
        PIPE_BUF


cdef class OutputRoute:
    cdef readonly bint piped  # through the loop; else the worker writes ``file`` (or /dev/null) itself
    cdef readonly str file  # every byte, as written; None: no file
    cdef readonly bint console  # every line to the launcher's stream of the same name
    cdef readonly bytes prefix  # before each console line: b"" unless teed
    cdef readonly str filtered  # the attempt's filtered_std*.log; None: no duplicate filter
    cdef readonly tuple filters  # bytes: a line holding one of them goes to ``filtered`` too
    cdef readonly bint keep_tail  # keep the last TAIL_LINES lines for the failure report


cdef class _File:
    cdef int fd
    cdef string buffer
    cdef readonly str path

    cdef int append(self, const char *data, size_t size) except -1
    cdef int flush(self) except -1
    cdef int close(self) except -1


cdef class _Console:
    cdef int fd
    cdef string pending
    cdef size_t sent  # bytes of pending already written
    cdef bint pollable
    cdef bint watching  # waiting for EPOLLOUT
    cdef bint broken  # EPIPE: nobody reads it any more
    cdef bint paused
    cdef int index
    cdef list streams

    cdef size_t backlog(self) noexcept
    cdef int _break(self, int epfd) except -1
    cdef int add(self, const char *data, size_t size) except -1
    cdef int flush(self, int epfd, bint block) except -1


cdef class _Stream:
    cdef int fd  # the read end; -1 once closed
    cdef int index
    cdef int worker
    cdef bint reading  # registered for EPOLLIN
    cdef _File file
    cdef _Console console
    cdef string prefix  # "" unless teed
    cdef _File filtered  # the attempt's filtered_std*.log, when this stream is filtered
    cdef vector[string] filters
    cdef bint keep_tail
    cdef deque[string] tail
    cdef string partial  # the line being received
    cdef size_t partial_shown  # bytes of partial already on an unprefixed console
    cdef double partial_since  # monotonic time the unshown part of partial began waiting; 0: none

    cdef bint routes_lines(self) noexcept
    cdef int feed(self, const char *data, size_t size) except -1
    cdef int line(self, const char *data, size_t size, bint terminated) except -1
    cdef int end_partial(self) except -1
    cdef void await_newline(self, double at) noexcept
    cdef int show_partial(self) except -1
    cdef list tail_lines(self)
