# The server's log: one glog-shaped line on stderr per event worth reporting (a connection closed
# for cause, one refused, accepting stopped or resumed), each written with a single write(2). Nothing
# here allocates, so that running out of memory can be reported too.

cdef enum:
    LOG_LINE_SIZE = 512  # a longer message is cut
    PRINTABLE_BYTES = 80  # of a key quoted in a message


cdef void log_line(char level, const char *message) noexcept nogil:
    """One glog-shaped line on stderr, in a single write(2) so lines never interleave."""
    cdef timespec now
    cdef time_t seconds
    cdef tm local
    cdef char line[LOG_LINE_SIZE]
    cdef int n
    clock_gettime(CLOCK_REALTIME, &now)
    seconds = now.tv_sec
    localtime_r(&seconds, &local)
    n = snprintf(line, sizeof(line), "%c%02d%02d %02d:%02d:%02d.%03d %d launcher] store: %s\n", level,
                 local.tm_mon + 1, local.tm_mday, local.tm_hour, local.tm_min, local.tm_sec,
                 <int>(now.tv_nsec // 1000000), <int>getpid(), message)
    if n >= <int>sizeof(line):
        n = sizeof(line) - 1
        line[n - 1] = b'\n'
    # A failed write to stderr has nowhere to be reported.
    write(2, line, n)


cdef void format_printable(char *out, size_t room, const char *raw, size_t size) noexcept nogil:
    """raw for a log line, into out (room bytes, NUL included): non-printable bytes as \\xNN, at
    most PRINTABLE_BYTES of them, then "..." if there are more."""
    cdef size_t i, n = 0
    for i in range(min(size, <size_t>PRINTABLE_BYTES)):
        if n + 5 > room:
            break
        if 0x20 <= <uint8_t>raw[i] < 0x7f and raw[i] != b'\\':
            out[n] = raw[i]
            n += 1
        else:
            n += snprintf(out + n, room - n, "\\x%02x", <uint8_t>raw[i])
    if size > PRINTABLE_BYTES and n + 4 <= room:
        memcpy(out + n, b"...", 3)
        n += 3
    out[n] = 0
