# What the requests do to the store's data (the Loop's keys and queues): execute() applies one parsed
# request and appends its reply to the connection's output. Waiters are the requests that block (WAIT,
# BARRIER, a blocking queue_pop, Server.wait_count): registered under their keys, released by the
# write that completes them.

# --- waiters --------------------------------------------------------------

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
        # Server.wait_count owns w; a full eventfd counter cannot happen with one write per watch.
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


cdef void cancel_waits(Loop *L, Conn *c) noexcept nogil:
    for w in c.waiters:
        unregister(L, w)
        del w
    c.waiters.clear()


# --- requests -------------------------------------------------------------

cdef inline string span_string(const char *frame, Request *req, size_t i) noexcept nogil:
    return string(frame + req.strings[i].start, req.strings[i].size)


cdef bint key_present(Loop *L, const string &key) noexcept nogil:
    cdef unordered_map[string, deque[string]].iterator q
    if L.kv.count(key):
        return True
    q = L.queues.find(key)
    return q != L.queues.end() and not deref(q).second.empty()


cdef bint any_equal(const vector[string] &keys, const string &key) noexcept nogil:
    cdef size_t i
    for i in range(keys.size()):
        if keys[i] == key:
            return True
    return False


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
