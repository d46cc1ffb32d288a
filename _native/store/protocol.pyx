# The c10d wire format, both directions: command bytes and reply constants, the request parser
# (parse_request; parse_frame is its Python face), the encoders requests and replies are written
# with, and integers as the store keeps them (ASCII decimal).

# --- commands and constants -----------------------------------------------

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


cdef enum Parse:
    PARSE_INVALID = -1
    PARSE_INCOMPLETE = 0
    PARSE_COMPLETE = 1


# --- reading a request ----------------------------------------------------

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
    cdef uint64_t count
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
    for _ in range(count * per_item):
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
        for _ in range(2):
            result = parse_string(&c, req, error)
            if result != PARSE_COMPLETE:
                return result
    elif req.command == COMPARE_SET:
        for _ in range(3):
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


# --- writing requests and replies -----------------------------------------

cdef inline void put_u8(string *out, uint8_t value) noexcept nogil:
    out.push_back(<char>value)


cdef inline void put_u32(string *out, uint32_t value) noexcept nogil:
    cdef uint32_t wire = htole32(value)
    out.append(<const char *>&wire, 4)


cdef inline void put_u64(string *out, uint64_t value) noexcept nogil:
    cdef uint64_t wire = htole64(value)
    out.append(<const char *>&wire, 8)


cdef inline void put_bytes(string *out, const char *data, size_t size) noexcept nogil:
    put_u64(out, size)
    out.append(data, size)


cdef inline void put_string(string *out, const string &value) noexcept nogil:
    put_bytes(out, value.data(), value.size())


# --- integers as the store keeps them: ASCII decimal ----------------------

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
