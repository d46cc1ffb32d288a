# The c10d wire format, both directions: command bytes and reply constants, the request parser
# (parse_request, which picks up where it stopped as more of a request arrives; parse_frame is its
# Python face), the buffers requests and replies are written into with their encoders, and integers
# as the store keeps them (ASCII decimal).

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
    REQUEST_OVERHEAD = 64 * 1024  # what a request or a reply may hold beyond the largest value: keys, lengths


cdef enum Parse:
    PARSE_INVALID = -1
    PARSE_INCOMPLETE = 0
    PARSE_COMPLETE = 1


cdef enum Stage:  # what parse_request reads next
    READ_COMMAND = 0  # a zeroed Request starts here
    READ_U32  # VALIDATE's magic, PING's nonce
    READ_COUNT  # the key count of CHECK, WAIT, MULTI_GET, MULTI_SET
    READ_STRINGS  # Request.left keys or values
    READ_I64  # after the key: ADD's delta, BARRIER's world size
    READ_NOTHING  # complete


# --- reading a request ----------------------------------------------------

cdef inline uint64_t load_u64(const uint8_t *p) noexcept nogil:
    cdef uint64_t value
    memcpy(&value, p, 8)
    return le64toh(value)


cdef inline uint32_t load_u32(const uint8_t *p) noexcept nogil:
    cdef uint32_t value
    memcpy(&value, p, 4)
    return le32toh(value)


cdef inline uint64_t request_limit(uint64_t max_value) noexcept nogil:
    """The most bytes a request (or a reply) may hold, values of at most max_value bytes in it."""
    return max_value + REQUEST_OVERHEAD


cdef bint begin_request(Request *req, uint8_t command, bint validated, char *error) noexcept nogil:
    """Set req up for the parts of command's frame; False: no such command here (error says why)."""
    req.command = command
    req.stage = READ_STRINGS
    if not validated:
        if command != VALIDATE:
            snprintf(error, ERROR_SIZE, "expected VALIDATE (0x00) first, got command byte 0x%02x", command)
            return False
        req.stage = READ_U32
    elif command == SET or command == APPEND or command == QUEUE_PUSH:
        req.count = 2
    elif command == COMPARE_SET:
        req.count = 3
    elif (command == GET or command == DELETE_KEY or command == QUEUE_POP or command == QUEUE_LEN
          or command == ADD or command == BARRIER):
        req.count = 1
    elif command == CHECK or command == WAIT or command == MULTI_GET or command == MULTI_SET:
        req.stage = READ_COUNT
    elif command == PING:
        req.stage = READ_U32
    elif command == GETNUMKEYS or command == CANCEL_WAIT or command == LIST_KEYS:
        req.stage = READ_NOTHING
    else:
        snprintf(error, ERROR_SIZE, "unknown command byte 0x%02x", command)
        return False
    req.left = req.count
    req.first = 1
    return True


cdef int parse_request(const uint8_t *data, size_t size, bint validated, uint64_t max_value,
                       Request *req, char *error) noexcept nogil:
    """Parse on, from req.parsed, the request that starts at data; data[:size] is what arrived of it.

    Complete: req.size is its length. Incomplete: req.size is how many bytes must have arrived
    before parsing on, and req keeps the progress (up to the part that is still incomplete), so
    that parsing a request costs time in proportion to its size however it arrives. Invalid:
    error says why. A zeroed Request starts a new request.
    """
    cdef uint64_t max_request = request_limit(max_value)
    cdef size_t pos = req.parsed
    cdef size_t wanted = 0  # incomplete: bytes needed at pos
    cdef uint64_t n, per_item
    if req.stage == READ_COMMAND:
        if size == 0:
            req.size = 1
            return PARSE_INCOMPLETE
        if not begin_request(req, data[0], validated, error):
            return PARSE_INVALID
        pos = 1
    while req.stage != READ_NOTHING:
        if req.stage == READ_U32:
            if size - pos < 4:
                wanted = 4
                break
            req.number = load_u32(data + pos)
            if req.command == VALIDATE and req.number != MAGIC:
                snprintf(error, ERROR_SIZE, "wrong VALIDATE magic 0x%08x", <unsigned>req.number)
                return PARSE_INVALID
            pos += 4
            req.stage = READ_NOTHING
        elif req.stage == READ_COUNT:
            if size - pos < 8:
                wanted = 8
                break
            n = load_u64(data + pos)
            pos += 8
            per_item = 2 if req.command == MULTI_SET else 1  # MULTI_SET: a value after each key
            # Each string takes at least its 8-byte length prefix.
            if n > (max_request - pos) // (8 * per_item):
                snprintf(error, ERROR_SIZE, "key count %llu cannot fit in a request of at most %llu bytes",
                         <unsigned long long>n, <unsigned long long>max_request)
                return PARSE_INVALID
            req.count = req.left = n * per_item
            req.first = pos
            req.stage = READ_STRINGS
        elif req.stage == READ_STRINGS:
            if req.left == 0:
                req.stage = READ_I64 if req.command == ADD or req.command == BARRIER else READ_NOTHING
                continue
            if size - pos < 8:
                wanted = 8
                break
            n = load_u64(data + pos)
            if n > max_value:
                snprintf(error, ERROR_SIZE, "length prefix %llu exceeds the limit of %llu bytes",
                         <unsigned long long>n, <unsigned long long>max_value)
                return PARSE_INVALID
            if pos + 8 + n > max_request:
                snprintf(error, ERROR_SIZE, "request of at least %llu bytes exceeds the limit of %llu bytes",
                         <unsigned long long>(pos + 8 + n), <unsigned long long>max_request)
                return PARSE_INVALID
            if size - pos < 8 + n:
                wanted = 8 + n  # the prefix is read again then: it is in the buffer still
                break
            pos += 8 + n
            req.left -= 1
        else:  # READ_I64
            if size - pos < 8:
                wanted = 8
                break
            req.number = <int64_t>load_u64(data + pos)
            pos += 8
            req.stage = READ_NOTHING
    req.parsed = pos
    req.size = pos + wanted
    return PARSE_COMPLETE if wanted == 0 else PARSE_INCOMPLETE


cdef inline const char *take_string(const char **at, size_t *size) noexcept nogil:
    """The key or value at *at in a complete frame (its length in size); *at moves past it."""
    size[0] = <size_t>load_u64(<const uint8_t *>at[0])
    at[0] += 8 + size[0]
    return at[0] - size[0]


def parse_frame(data, bint validated=True, max_value_size=1 << 30, *, size_t chunk=0):
    """Run the server's request parser over ``data`` (bytes), without a socket; with ``chunk``,
    over the bytes as they would come in chunk bytes at a time, parsing on as the server does.

    Returns None when data holds no complete request yet, else
    ``(length, command, [keys and values], number)``; raises ValueError with the
    reason the server would give when closing the connection.
    """
    cdef bytes buffer = bytes(data)
    cdef const char *frame = PyBytes_AS_STRING(buffer)
    cdef size_t total = PyBytes_GET_SIZE(buffer)
    cdef size_t arrived = total if chunk == 0 else min(chunk, total)
    cdef size_t size
    cdef const char *at
    cdef const char *value
    cdef Request req
    cdef char error[ERROR_SIZE]
    cdef int result
    memset(&req, 0, sizeof(req))
    while True:
        result = parse_request(<const uint8_t *>frame, arrived, validated, max_value_size, &req, error)
        if result != PARSE_INCOMPLETE or arrived == total:
            break
        while arrived < total and arrived < req.size:
            arrived = min(total, arrived + chunk)
    if result == PARSE_INVALID:
        raise ValueError(error.decode())
    if result == PARSE_INCOMPLETE:
        return None
    strings = []
    at = frame + req.first
    for _ in range(req.count):
        value = take_string(&at, &size)
        strings.append(value[:size])
    return (req.size, req.command, strings, req.number)


# --- buffers, and writing requests and replies into them ------------------

cdef bint reserve(Buffer *b, size_t extra) noexcept nogil:
    """Room for extra more bytes in b (its capacity at least doubles). False when the memory cannot
    be had; b is marked failed then (and stays so: see put), its bytes as they were."""
    cdef size_t required = b.size + extra
    cdef size_t capacity
    cdef char *grown
    if b.failed:
        return False
    if required <= b.capacity:
        return True
    capacity = max(required, 2 * b.capacity, <size_t>64)
    grown = <char *>realloc(b.data, capacity) if required > b.size else NULL  # else extra overflowed
    if grown == NULL:
        b.failed = True
        return False
    b.data = grown
    b.capacity = capacity
    return True


cdef void consume(Buffer *b, size_t n) noexcept nogil:
    """Drop b's first n bytes."""
    if n != 0:
        memmove(b.data, b.data + n, b.size - n)
        b.size -= n


cdef void release_if_large(Buffer *b, size_t keep) noexcept nogil:
    """Give back the memory of an empty buffer that grew past keep bytes."""
    if b.size == 0 and b.capacity > keep:
        free(b.data)
        b.data = NULL
        b.capacity = 0


cdef inline void put(Buffer *out, const void *data, size_t size) noexcept nogil:
    """Append data, unless out failed to grow (now or before: nothing is appended after a gap)."""
    if size != 0 and reserve(out, size):
        memcpy(out.data + out.size, data, size)
        out.size += size


cdef inline void put_u8(Buffer *out, uint8_t value) noexcept nogil:
    put(out, &value, 1)


cdef inline void put_u32(Buffer *out, uint32_t value) noexcept nogil:
    cdef uint32_t wire = htole32(value)
    put(out, &wire, 4)


cdef inline void put_u64(Buffer *out, uint64_t value) noexcept nogil:
    cdef uint64_t wire = htole64(value)
    put(out, &wire, 8)


cdef inline void put_bytes(Buffer *out, const char *data, size_t size) noexcept nogil:
    put_u64(out, size)
    put(out, data, size)


cdef inline void put_string(Buffer *out, const string &value) noexcept nogil:
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


cdef enum:
    INT_TEXT_SIZE = 24  # "-9223372036854775808" and its NUL


cdef int format_int(int64_t value, char *text) noexcept nogil:
    """value in decimal into text (room for INT_TEXT_SIZE bytes); returns its length."""
    return snprintf(text, INT_TEXT_SIZE, "%lld", <long long>value)
