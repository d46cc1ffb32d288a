# The server's log: one glog-shaped line on stderr per event worth reporting (a connection closed
# for cause, one refused, accepting stopped or resumed), each written with a single write(2).

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
