// Memory for the store extension without C++ exceptions: a byte buffer that frees itself (Buffer),
// allocation without throwing (new_nothrow), and the allocating operations of the standard
// containers the store uses, each reporting a failure (false or NULL) with the container left as it
// was.
//
// Cython calls the containers' allocating members through `except +`: a std::bad_alloc becomes a
// Python exception, which needs the GIL that the store's loop thread never takes, and inside a
// noexcept function it ends as "Exception ignored" with the operation half done. Code that runs
// without the GIL calls these instead and decides what a failure means (store/commands.pyx).
#pragma once

#include <cstdlib>
#include <new>
#include <string>
#include <utility>
#include <vector>

// Bytes in malloc'ed memory, grown by reserve() (store/protocol.pyx); freed with the Buffer.
struct Buffer {
    char *data = nullptr;
    size_t size = 0;       // bytes held, from data
    size_t capacity = 0;   // bytes allocated
    bool failed = false;   // a growth failed: bytes written since are missing, and so is all that follows
    Buffer() noexcept = default;
    Buffer(const Buffer &) = delete;
    Buffer &operator=(const Buffer &) = delete;
    ~Buffer() { std::free(data); }
};

// A value-initialised T (zeroed, for the store's plain classes), or NULL when memory runs out.
template <class T>
static inline T *new_nothrow() noexcept {
    return new (std::nothrow) T();
}

// The value stored under key, inserted value-initialised when missing; stored (unless NULL) is set
// to the map's own copy of the key, which lives as long as the entry. NULL: out of memory.
template <class Map>
static inline typename Map::mapped_type *map_slot(Map &map, const std::string &key,
                                                   const std::string **stored) noexcept {
    try {
        auto entry = map.try_emplace(key).first;
        if (stored != nullptr) *stored = &entry->first;
        return &entry->second;
    } catch (const std::bad_alloc &) {
        return nullptr;
    }
}

static inline bool string_assign(std::string &text, const char *data, size_t size) noexcept {
    try {
        text.assign(data, size);
        return true;
    } catch (const std::bad_alloc &) {
        return false;
    }
}

static inline bool string_append(std::string &text, const char *data, size_t size) noexcept {
    try {
        text.append(data, size);
        return true;
    } catch (const std::bad_alloc &) {
        return false;
    }
}

// Appends item to a container of strings (a deque or vector), moving it: item is left empty.
template <class Container>
static inline bool push_back_moved(Container &container, std::string &item) noexcept {
    try {
        container.push_back(std::move(item));
        return true;
    } catch (const std::bad_alloc &) {
        return false;
    }
}

template <class T>
static inline bool vector_push_back(std::vector<T> &items, const T &item) noexcept {
    try {
        items.push_back(item);
        return true;
    } catch (const std::bad_alloc &) {
        return false;
    }
}

// Grows items to size, the new ones value-initialised (zero, NULL).
template <class T>
static inline bool vector_grow(std::vector<T> &items, size_t size) noexcept {
    try {
        items.resize(size);
        return true;
    } catch (const std::bad_alloc &) {
        return false;
    }
}
