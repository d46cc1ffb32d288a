# What the requests do to the store's data (the Loop's keys and queues): execute() applies one parsed
# request and appends its reply to the connection's output. Waiters are the requests that block (WAIT,
# BARRIER, a blocking queue_pop, Server.wait_count): in line under their keys, released by the write
# that completes them.
#
# Memory: room for a reply is taken before it is built, within the reply limit, and every change to the
# data either happens whole or not at all; a request that cannot have the memory it needs closes its
# connection (see execute). Each step costs time in proportion to what it handles: a request's keys, a
# key's line of waiters, a connection's waiters.

cdef enum:
    MAX_WAITERS = 1 << 18  # WAIT and BARRIER requests waiting on one connection; torch's clients have one


# --- waiters --------------------------------------------------------------

cdef bint may_wait(Loop *L, Conn *c) noexcept nogil:
    """False (L.error says why) when c has as many requests waiting as it may."""
    if c.waiter_count < MAX_WAITERS:
        return True
    snprintf(L.error, ERROR_SIZE, "more than %d WAIT and BARRIER requests waiting on one connection",
             <int>MAX_WAITERS)
    return False


cdef Waiter *new_waiter(Loop *L, Conn *c, size_t keys) noexcept nogil:
    """A waiter of c with room for registrations under keys keys, in c's list from now on, so that
    closing c frees it whatever happens next. NULL: L.error says why."""
    cdef Waiter *w
    if not may_wait(L, c):
        return NULL
    w = <Waiter *>calloc(1, sizeof(Waiter) + keys * sizeof(Registration))
    if w == NULL:
        snprintf(L.error, ERROR_SIZE, "out of memory for a waiter on %zu keys", keys)
        return NULL
    w.conn = c
    w.regs = <Registration *>(w + 1)
    w.next = c.waiters
    if c.waiters != NULL:
        c.waiters.prev = w
    c.waiters = w
    c.waiter_count += 1
    return w


cdef void free_waiter(Waiter *w) noexcept nogil:
    """Take w out of its connection's list and free it; it is in no line."""
    cdef Conn *c = w.conn
    if w.prev != NULL:
        w.prev.next = w.next
    else:
        c.waiters = w.next
    if w.next != NULL:
        w.next.prev = w.prev
    c.waiter_count -= 1
    free(w)


cdef bint register(Waiter *w, unordered_map[string, WaitList] *table, const string &key) noexcept nogil:
    """Put w in the line for key, unless it is there already: the same key twice in one WAIT counts
    once (its earlier registration is then the line's last). False: out of memory, nothing changed."""
    cdef const string *stored = NULL
    cdef WaitList *line = line_slot(table[0], key, &stored)
    cdef Registration *r
    if line == NULL:
        return False
    if line.key == NULL:
        line.key = stored
    elif line.last != NULL and line.last.waiter == w:
        return True
    r = &w.regs[w.registered]
    w.registered += 1
    r.waiter = w
    r.line = line
    r.prev = line.last
    r.next = NULL
    if line.last != NULL:
        line.last.next = r
    else:
        line.first = r
    line.last = r
    w.missing += 1
    return True


cdef void unlink(Registration *r) noexcept nogil:
    """Take r out of its line (which may be left empty)."""
    cdef WaitList *line = r.line
    if r.prev != NULL:
        r.prev.next = r.next
    else:
        line.first = r.next
    if r.next != NULL:
        r.next.prev = r.prev
    else:
        line.last = r.prev
    r.line = NULL


cdef void unregister(Loop *L, Waiter *w) noexcept nogil:
    """Take w out of every line it is still in; a line left empty goes from its table."""
    cdef unordered_map[string, WaitList] *table = &L.count_waiters if w.counting else &L.key_waiters
    cdef WaitList *line
    cdef size_t i
    for i in range(w.registered):
        line = w.regs[i].line
        if line != NULL:
            unlink(&w.regs[i])
            if line.first == NULL:
                table.erase(table.find(deref(line.key)))


cdef void release(Loop *L, Waiter *w) noexcept nogil:
    """w's condition holds: answer its connection (or signal its watcher). w is in no line any more."""
    cdef uint64_t one = 1
    if w.conn == NULL:
        # Server.wait_count owns w; a full eventfd counter cannot happen with one write per watch.
        write(w.notify_fd, &one, 8)
        return
    # Out of memory, the connection's output is marked failed: its next flush closes it.
    put_u8(&w.conn.outbuf, STOP_WAITING)
    mark_dirty(L, w.conn)
    free_waiter(w)


cdef void release_counts(Loop *L, const string &key) noexcept nogil:
    """Release the counting waiters of key whose target its integer value has reached."""
    cdef unordered_map[string, WaitList].iterator it = L.count_waiters.find(key)
    cdef unordered_map[string, string].iterator value
    cdef int64_t count
    cdef Registration *r
    cdef Registration *next
    if it == L.count_waiters.end():
        return
    value = L.kv.find(key)
    if value == L.kv.end() or not parse_int(deref(value).second, &count):
        return
    r = deref(it).second.first
    while r != NULL:
        next = r.next
        if r.waiter.target <= count:
            unlink(r)
            release(L, r.waiter)
        r = next
    if deref(it).second.first == NULL:
        L.count_waiters.erase(it)


cdef void key_written(Loop *L, const string &key) noexcept nogil:
    """key was set, added to, appended to or created: release who waited for it."""
    cdef unordered_map[string, WaitList].iterator it = L.key_waiters.find(key)
    cdef Registration *r
    cdef Registration *next
    cdef Waiter *w
    if it != L.key_waiters.end():
        # The whole line leaves at once; each of its waiters has one registration in it.
        r = deref(it).second.first
        L.key_waiters.erase(it)
        while r != NULL:
            next = r.next
            r.line = NULL
            w = r.waiter
            w.missing -= 1
            if w.missing == 0:
                release(L, w)
            r = next
    release_counts(L, key)


cdef void queue_pushed(Loop *L, const string &key) noexcept nogil:
    """One item arrived: it releases at most one waiter (a blocking queue_pop), the first in line
    for which it is the last missing key; waiters on several keys ahead of it count it as present."""
    cdef unordered_map[string, WaitList].iterator it = L.key_waiters.find(key)
    cdef Registration *r
    cdef Waiter *w
    if it == L.key_waiters.end():
        return
    while deref(it).second.first != NULL:
        r = deref(it).second.first
        unlink(r)
        w = r.waiter
        w.missing -= 1
        if w.missing == 0:
            release(L, w)
            break
    if deref(it).second.first == NULL:
        L.key_waiters.erase(it)


cdef void cancel_waits(Loop *L, Conn *c) noexcept nogil:
    while c.waiters != NULL:
        unregister(L, c.waiters)
        free_waiter(c.waiters)


# --- the data -------------------------------------------------------------

cdef bint no_memory(Loop *L, const char *what) noexcept nogil:
    """False, with L.error saying that memory for what could not be had."""
    snprintf(L.error, ERROR_SIZE, "out of memory for %s", what)
    return False


cdef bint load_key(Loop *L, const char *data, size_t size) noexcept nogil:
    """Make L.key the key data[:size] names, to look it up. False: out of memory (L.error)."""
    return string_assign(L.key, data, size) or no_memory(L, "a key")


cdef bint key_present(Loop *L, const string &key) noexcept nogil:
    cdef unordered_map[string, deque[string]].iterator q
    if L.kv.count(key):
        return True
    q = L.queues.find(key)
    return q != L.queues.end() and not deref(q).second.empty()


cdef bint store_value(Loop *L, const char *data, size_t size, bint append) noexcept nogil:
    """The value of L.key becomes data[:size], or (append) gets it at its end. False: out of
    memory (L.error), the value as it was."""
    cdef unordered_map[string, string].iterator it = L.kv.find(L.key)
    cdef string value
    cdef string *slot
    if it != L.kv.end():
        if append:
            return string_append(deref(it).second, data, size) or no_memory(L, "a value")
        return string_assign(deref(it).second, data, size) or no_memory(L, "a value")
    # A new key: its value is made first, so that the key never appears without it.
    if not string_assign(value, data, size):
        return no_memory(L, "a value")
    slot = value_slot(L.kv, L.key, NULL)
    if slot == NULL:
        return no_memory(L, "a key")
    slot.swap(value)
    return True


cdef bint add_to(Loop *L, int64_t delta, int64_t *result, const char *command) noexcept nogil:
    """ADD's arithmetic on L.key: the stored decimal plus delta, wrapping like torch's server."""
    cdef unordered_map[string, string].iterator it = L.kv.find(L.key)
    cdef int64_t current = 0
    cdef char text[INT_TEXT_SIZE]
    cdef char key[PRINTABLE_BYTES * 4 + 4]
    if it != L.kv.end() and not parse_int(deref(it).second, &current):
        format_printable(key, sizeof(key), L.key.data(), L.key.size())
        snprintf(L.error, ERROR_SIZE, "%s on a value that is not a 64-bit integer (key %s)", command, key)
        return False
    result[0] = <int64_t>(<uint64_t>current + <uint64_t>delta)
    if not store_value(L, text, format_int(result[0], text), False):
        return False
    key_written(L, L.key)
    return True


cdef bint push_item(Loop *L, const char *data, size_t size) noexcept nogil:
    """Append data[:size] to the queue at L.key. False: out of memory (L.error), the queue as it was."""
    cdef string item
    cdef deque[string] *queue
    if not string_assign(item, data, size):
        return no_memory(L, "a queue item")
    queue = queue_slot(L.queues, L.key, NULL)
    if queue == NULL:
        return no_memory(L, "a queue")
    if not push_back_moved(queue[0], item):
        if queue.empty():
            L.queues.erase(L.key)
        return no_memory(L, "a queue item")
    return True


# --- requests -------------------------------------------------------------

cdef bint reply_room(Loop *L, Conn *c, uint64_t size) noexcept nogil:
    """Room in c's output for a reply of size bytes, before it is built. False (L.error says why):
    past the limit, which a request can reach by naming one large value many times, or out of memory."""
    if size > L.max_request:
        snprintf(L.error, ERROR_SIZE, "reply of at least %llu bytes exceeds the limit of %llu bytes",
                 <unsigned long long>size, <unsigned long long>L.max_request)
        return False
    if not reserve(&c.outbuf, size):
        snprintf(L.error, ERROR_SIZE, "out of memory for a reply of %llu bytes", <unsigned long long>size)
        return False
    return True


cdef bint execute(Loop *L, Conn *c, const char *frame, Request *req) noexcept nogil:
    """Apply one complete request and append its reply. False: close the connection (L.error says why).

    Room for the reply is taken first, and each change happens whole or not at all, so a request
    refused for want of memory leaves the store as it was (a MULTI_SET stops between two keys; a
    BARRIER that cannot wait has counted itself, as if its client died then).
    """
    cdef const char *at = frame + req.first
    cdef const char *data
    cdef const char *desired
    cdef size_t size, desired_size, i, start
    cdef uint64_t total
    cdef unordered_map[string, string].iterator it
    cdef unordered_map[string, deque[string]].iterator q
    cdef int64_t number
    cdef Waiter *w
    cdef Buffer *out = &c.outbuf
    cmd = req.command
    if cmd == VALIDATE:
        c.validated = True
    elif cmd == PING:
        if not reply_room(L, c, 4):
            return False
        put_u32(out, <uint32_t>req.number)
    elif cmd == SET or cmd == APPEND:
        data = take_string(&at, &size)
        if not load_key(L, data, size):
            return False
        data = take_string(&at, &size)
        if not store_value(L, data, size, cmd == APPEND):
            return False
        key_written(L, L.key)
    elif cmd == MULTI_SET:
        for _ in range(0, req.count, 2):
            data = take_string(&at, &size)
            if not load_key(L, data, size):
                return False
            data = take_string(&at, &size)
            if not store_value(L, data, size, False):
                return False
            key_written(L, L.key)
    elif cmd == GET:
        data = take_string(&at, &size)
        if not load_key(L, data, size):
            return False
        it = L.kv.find(L.key)
        if not reply_room(L, c, 8 + (0 if it == L.kv.end() else deref(it).second.size())):
            return False
        if it == L.kv.end():
            put_u64(out, 0)
        else:
            put_string(out, deref(it).second)
    elif cmd == MULTI_GET:
        # Sized first, within the limit, then written: the keys are read twice.
        total = 0
        for _ in range(req.count):
            data = take_string(&at, &size)
            if not load_key(L, data, size):
                return False
            it = L.kv.find(L.key)
            total += 8 + (0 if it == L.kv.end() else deref(it).second.size())
            if total > L.max_request:
                break
        if not reply_room(L, c, total):
            return False
        at = frame + req.first
        start = out.size
        for _ in range(req.count):
            data = take_string(&at, &size)
            if not load_key(L, data, size):
                out.size = start  # no half reply (L.key had room for every key already: not seen)
                return False
            it = L.kv.find(L.key)
            if it == L.kv.end():
                put_u64(out, 0)
            else:
                put_string(out, deref(it).second)
    elif cmd == ADD:
        data = take_string(&at, &size)
        if not (load_key(L, data, size) and reply_room(L, c, 8) and add_to(L, req.number, &number, "ADD")):
            return False
        put_u64(out, <uint64_t>number)
    elif cmd == CHECK:
        if not reply_room(L, c, 1):
            return False
        for _ in range(req.count):
            data = take_string(&at, &size)
            if not load_key(L, data, size):
                return False
            if not key_present(L, L.key):
                put_u8(out, CHECK_NOT_READY)
                break
        else:
            put_u8(out, CHECK_READY)
    elif cmd == WAIT:
        if not reply_room(L, c, 1):
            return False
        w = NULL
        for i in range(req.count):
            data = take_string(&at, &size)
            if not load_key(L, data, size):
                return False  # w, if made, goes with the connection
            if key_present(L, L.key):
                continue
            if w == NULL:
                w = new_waiter(L, c, req.count - i)
                if w == NULL:
                    return False
            if not register(w, &L.key_waiters, L.key):
                return no_memory(L, "a waiter's key")
        if w == NULL:
            put_u8(out, STOP_WAITING)
    elif cmd == CANCEL_WAIT:
        if not reply_room(L, c, 1):
            return False
        cancel_waits(L, c)
        put_u8(out, WAIT_CANCELED)
    elif cmd == COMPARE_SET:
        data = take_string(&at, &size)
        if not load_key(L, data, size):
            return False
        data = take_string(&at, &size)  # the expected value
        desired = take_string(&at, &desired_size)
        it = L.kv.find(L.key)
        if it == L.kv.end():
            # torch's answer for a missing key: the expected value, nothing stored; but an empty
            # expected value creates the key with the desired one.
            if size == 0:
                if not (reply_room(L, c, 8 + desired_size) and store_value(L, desired, desired_size, False)):
                    return False
                put_bytes(out, desired, desired_size)
                key_written(L, L.key)
            else:
                if not reply_room(L, c, 8 + size):
                    return False
                put_bytes(out, data, size)
        elif deref(it).second.size() == size and memcmp(deref(it).second.data(), data, size) == 0:
            if not (reply_room(L, c, 8 + desired_size) and store_value(L, desired, desired_size, False)):
                return False
            put_bytes(out, desired, desired_size)
            release_counts(L, L.key)
        else:
            if not reply_room(L, c, 8 + deref(it).second.size()):
                return False
            put_string(out, deref(it).second)
    elif cmd == GETNUMKEYS:
        if not reply_room(L, c, 8):
            return False
        put_u64(out, L.kv.size())
    elif cmd == DELETE_KEY:
        data = take_string(&at, &size)
        if not (load_key(L, data, size) and reply_room(L, c, 8)):
            return False
        put_u64(out, L.kv.erase(L.key))
    elif cmd == QUEUE_PUSH:
        data = take_string(&at, &size)
        if not load_key(L, data, size):
            return False
        data = take_string(&at, &size)
        if not push_item(L, data, size):
            return False
        queue_pushed(L, L.key)
    elif cmd == QUEUE_POP:
        data = take_string(&at, &size)
        if not load_key(L, data, size):
            return False
        q = L.queues.find(L.key)
        if q == L.queues.end():
            if not reply_room(L, c, 8):
                return False
            put_u64(out, 0)
        else:
            # torch's server answers the length before the pop, then one value.
            if not reply_room(L, c, 16 + deref(q).second.front().size()):
                return False
            put_u64(out, deref(q).second.size())
            put_string(out, deref(q).second.front())
            deref(q).second.pop_front()
            if deref(q).second.empty():
                L.queues.erase(q)
    elif cmd == QUEUE_LEN:
        data = take_string(&at, &size)
        if not (load_key(L, data, size) and reply_room(L, c, 8)):
            return False
        q = L.queues.find(L.key)
        put_u64(out, 0 if q == L.queues.end() else deref(q).second.size())
    elif cmd == LIST_KEYS:
        total = 8
        it = L.kv.begin()
        while it != L.kv.end() and total <= L.max_request:
            total += 8 + deref(it).first.size()
            inc(it)
        if not reply_room(L, c, total):
            return False
        put_u64(out, L.kv.size())
        it = L.kv.begin()
        while it != L.kv.end():
            put_string(out, deref(it).first)
            inc(it)
    elif cmd == BARRIER:
        data = take_string(&at, &size)
        # Refused for the waiter limit before it counts itself.
        if not (load_key(L, data, size) and reply_room(L, c, 1) and may_wait(L, c)
                and add_to(L, 1, &number, "BARRIER")):
            return False
        if number >= req.number:
            put_u8(out, STOP_WAITING)
        else:
            w = new_waiter(L, c, 1)
            if w == NULL:
                return False
            w.counting = True
            w.target = req.number
            if not register(w, &L.count_waiters, L.key):
                return no_memory(L, "a waiter's key")
    return True
