# Where worker output goes: a stream's route (what the agent asks for), the log
# files written in large blocks, the launcher's two consoles (never dropped, never
# blocking the loop), and one worker stream cut into lines for them.

cdef enum:
    TAIL_LINES = 20
    TAIL_LINE_MAX = 4096  # bytes of one remembered stderr line
    FILE_FLUSH_AT = 65536
    CONSOLE_PAUSE_AT = 4 << 20  # stop reading the workers: their full pipes block them
    CONSOLE_RESUME_AT = 1 << 20
    LINE_MAX = 1 << 20  # a longer line is cut here rather than held in memory

# An unprefixed line still without its newline after this long is shown as it
# is (a progress bar); the pieces of one print() arrive far sooner, so lines
# from different ranks stay whole.
cdef double PARTIAL_SHOW_DELAY = 0.05


cdef class OutputRoute:
    """Where one stream (stdout or stderr) of one worker goes.

    Not ``piped``: the worker writes ``file`` itself, or /dev/null without one.
    ``piped``: the loop reads it and writes ``file`` (the bytes as written),
    the console (whole lines, after ``prefix``), ``filtered`` (the lines that
    hold one of ``filters``, prefixed) and, with ``keep_tail``, remembers its
    last lines.
    """

    def __init__(self, str file=None, *, bint piped=False, bint console=False, bytes prefix=b"", str filtered=None,
                 filters=(), bint keep_tail=False):
        self.filters = tuple(filters)
        if not piped and (console or prefix or filtered is not None or keep_tail):
            raise ValueError("only a piped stream has a console, a prefix, a filtered file or a tail")
        if self.filters and filtered is None:
            raise ValueError("duplicate filters need a filtered file")
        for needle in self.filters:
            if not isinstance(needle, bytes) or not needle:
                raise ValueError(f"a duplicate filter is non-empty bytes, got {needle!r}")
        self.piped = piped
        self.file = file
        self.console = console
        self.prefix = prefix
        self.filtered = filtered
        self.keep_tail = keep_tail


cdef class _File:
    """A log file written in large blocks."""

    def __cinit__(self, str path):
        self.path = path
        self.fd = c_open(os.fsencode(path), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        if self.fd < 0:
            raise os_error(errno, None, path)

    cdef int append(self, const char *data, size_t size) except -1:
        self.buffer.append(data, size)
        if self.buffer.size() >= FILE_FLUSH_AT:
            self.flush()
        return 0

    cdef int flush(self) except -1:
        cdef int result
        if self.buffer.size() == 0:
            return 0
        with nogil:
            result = write_all(self.fd, self.buffer.data(), self.buffer.size())
        if result < 0:
            raise os_error(errno, "cannot write the log", self.path)
        self.buffer.clear()
        return 0

    cdef int close(self) except -1:
        if self.fd >= 0:
            try:
                self.flush()
            finally:
                c_close(self.fd)
                self.fd = -1
        return 0

    def __dealloc__(self):
        if self.fd >= 0:
            c_close(self.fd)


cdef class _Console:
    """The launcher's stdout or stderr: written when it can take more, never dropped.

    A console that epoll cannot watch (a regular file, /dev/null) is always
    writable and written directly. One that stays full makes the loop stop
    reading the workers that write to it: their pipes fill and they block.
    One that breaks (its reader is gone) drops what it held back, so the
    workers are read again; their log files keep every line.
    """

    def __cinit__(self, int fd, int index):
        self.fd = fd
        self.index = index
        self.streams = []

    cdef size_t backlog(self) noexcept:
        return self.pending.size() - self.sent

    cdef int _break(self, int epfd) except -1:
        """The reader is gone (EPIPE) or the console is unusable: there is nowhere left to write.

        What it held back goes, which resumes the workers it paused; epoll stops
        watching it, as a broken pipe would report an error at every turn.
        """
        self.broken = True
        self.pending = string()
        self.sent = 0
        if self.pollable:
            epoll_set(epfd, EPOLL_CTL_DEL, self.fd, 0, 0)
            self.pollable = False
            self.watching = False
        return 0

    cdef int add(self, const char *data, size_t size) except -1:
        if not self.broken:
            self.pending.append(data, size)
        return 0

    cdef int flush(self, int epfd, bint block) except -1:
        """Write what the console takes without blocking (everything when ``block``)."""
        cdef pollfd ready
        cdef ssize_t n
        cdef size_t size
        cdef int result
        while self.backlog() and not self.broken:
            if self.pollable:
                ready.fd = self.fd
                ready.events = POLLOUT
                ready.revents = 0
                with nogil:
                    result = poll(&ready, 1, -1 if block else 0)
                if result < 0:
                    if errno == EINTR:
                        continue
                    raise os_error(errno, "poll console")
                if result == 0:
                    if not self.watching:
                        epoll_set(epfd, EPOLL_CTL_MOD, self.fd, EPOLLOUT, tagged(SOURCE_CONSOLE, self.index))
                        self.watching = True
                    return 0
                # writable: a pipe takes PIPE_BUF bytes without blocking
                size = min(self.backlog(), <size_t>PIPE_BUF)
            else:
                size = self.backlog()
            with nogil:
                n = write(self.fd, self.pending.data() + self.sent, size)
            if n < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN:  # someone made it non-blocking: wait for room
                    if block:
                        continue
                    if self.pollable and not self.watching:
                        epoll_set(epfd, EPOLL_CTL_MOD, self.fd, EPOLLOUT, tagged(SOURCE_CONSOLE, self.index))
                        self.watching = True
                    return 0
                self._break(epfd)
                return 0
            self.sent += n
        if self.sent == self.pending.size() or self.sent > (1 << 20):
            self.pending.erase(0, self.sent)
            self.sent = 0
        if self.watching and not self.backlog():
            epoll_set(epfd, EPOLL_CTL_MOD, self.fd, 0, tagged(SOURCE_CONSOLE, self.index))
            self.watching = False
        return 0


cdef class _Stream:
    """One worker's stdout or stderr pipe and where its lines go."""

    def __cinit__(self):
        self.fd = -1

    cdef bint routes_lines(self) noexcept:
        return self.console is not None or self.filtered is not None or self.keep_tail

    cdef int feed(self, const char *data, size_t size) except -1:
        cdef const char *newline
        cdef size_t start = 0, end
        if self.file is not None:
            self.file.append(data, size)
        if not self.routes_lines():
            return 0
        while start < size:
            newline = <const char *>memchr(data + start, b'\n', size - start)
            if newline == NULL:
                self.partial.append(data + start, size - start)
                if self.partial.size() >= LINE_MAX:
                    self.end_partial()
                return 0
            end = newline - data + 1
            if self.partial.size():
                self.partial.append(data + start, end - start)
                self.line(self.partial.data(), self.partial.size(), True)
                self.partial.clear()
                self.partial_shown = 0
                self.partial_since = 0
            else:
                self.line(data + start, end - start, True)
            start = end
        return 0

    cdef int line(self, const char *data, size_t size, bint terminated) except -1:
        cdef size_t i, body = size - 1 if terminated else size
        cdef const char *shown
        if self.console is not None:
            if self.prefix.size():
                self.console.add(self.prefix.data(), self.prefix.size())
                self.console.add(data, size)
            else:
                self.console.add(data + self.partial_shown, size - self.partial_shown)
            if not terminated:
                self.console.add(b"\n", 1)
        if self.filtered is not None:
            for i in range(self.filters.size()):
                if memmem(data, body, self.filters[i].data(), self.filters[i].size()) != NULL:
                    self.filtered.append(self.prefix.data(), self.prefix.size())
                    self.filtered.append(data, size)
                    if not terminated:
                        self.filtered.append(b"\n", 1)
                    break
        if self.keep_tail:
            # a line redrawn with carriage returns (a progress bar) as the terminal last showed it
            if body and data[body - 1] == b'\r':
                body -= 1
            shown = <const char *>memrchr(data, b'\r', body)
            if shown != NULL:
                body -= shown + 1 - data
                data = shown + 1
            self.tail.push_back(string(data, min(body, <size_t>TAIL_LINE_MAX)))
            if self.tail.size() > TAIL_LINES:
                self.tail.pop_front()
        return 0

    cdef int end_partial(self) except -1:
        """The pending partial line as a line of its own (end of output, or too long)."""
        if self.partial.size():
            self.line(self.partial.data(), self.partial.size(), False)
            self.partial.clear()
            self.partial_shown = 0
            self.partial_since = 0
        return 0

    cdef void await_newline(self, double at) noexcept:
        """The worker stopped mid-line: start the clock for showing the unshown part."""
        if self.console is not None and not self.prefix.size() and self.partial.size() > self.partial_shown:
            if self.partial_since == 0:
                self.partial_since = at

    cdef int show_partial(self) except -1:
        """Put the unshown part of an unprefixed partial line on the console."""
        self.console.add(self.partial.data() + self.partial_shown, self.partial.size() - self.partial_shown)
        self.partial_shown = self.partial.size()
        self.partial_since = 0
        return 0

    cdef list tail_lines(self):
        return [line.decode("utf-8", "replace") for line in self.tail]
