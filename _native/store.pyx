# cython: boundscheck=False, wraparound=False, cdivision=True, auto_pickle=False
"""The c10d TCPStore wire protocol (PyTorch 2.13): a server and a blocking client.

The server is one epoll loop on a native thread. Keys, values, queues and
waiters live in C++ containers and the loop never takes the GIL, so Python
code in the hosting process cannot stall it. Waiters are answered by the
write that completes their keys; nothing polls.

Limits, so that no client can take the server down or grow it without bound:

* a key or value may hold at most ``max_value_size`` bytes and one request at
  most ``max_value_size + 64 KiB``; a longer length prefix closes the
  connection before anything is buffered;
* a reply may hold at most ``max_value_size + 64 KiB`` bytes too: a request
  whose reply would be longer (a MULTI_GET naming one large value many times,
  say) closes the connection before any of it is built;
* at most 262,144 WAIT and BARRIER requests may wait on one connection (torch's
  clients have one at a time); one more closes the connection;
* a request must arrive completely within ``request_timeout`` seconds
  (default 60) of its first byte; a client trickling bytes slower than that is
  closed at the next sweep, which runs once a second while any request is
  incomplete. A slow client never delays anyone else: the loop never blocks
  on one. Idle connections (nothing buffered) are never closed;
* a connection stops being read while more than 4 MiB of its replies are
  unsent, so a client that does not read cannot grow the server either;
* a request, or a reply, for which memory cannot be had closes its connection
  and leaves the store as it was; the others are served on.

Each request costs time in proportion to its size, however it arrives (it is
parsed once, as its bytes come), and releasing or cancelling waiters costs time
in proportion to their number.

Every closed-for-cause connection gets one log line on stderr, written by the
loop thread with a single write(2).
"""
# One extension, one file per concept: the files included at the end. Their state is declared in
# store.pxd; the C functions and constants they use are cimported here, once for all of them.
from cython.operator cimport dereference as deref, preincrement as inc
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.errno cimport (EADDRINUSE, EADDRNOTAVAIL, ENOMEM, EAFNOSUPPORT, EAGAIN, ECONNABORTED, EINPROGRESS, EINTR,
                         EMFILE, ENFILE, errno)
from libc.stdio cimport snprintf
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, memset, strerror
from libc.time cimport localtime_r, time_t, tm
from posix.fcntl cimport O_CLOEXEC as FCNTL_O_CLOEXEC, O_RDONLY, open as c_open
from posix.resource cimport RLIMIT_NOFILE, getrlimit, rlimit, setrlimit
from posix.signal cimport SIG_SETMASK, sigfillset
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, nanosleep, timespec
from posix.unistd cimport close, getpid, read, write

from errors cimport check, errno_text, os_error
from linux cimport (AF_INET, AF_INET6, AF_UNSPEC, AI_PASSIVE, EFD_CLOEXEC, EFD_NONBLOCK, EPOLL_CLOEXEC,
                    EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD, EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT,
                    INET6_ADDRSTRLEN, IPPROTO_IPV6, IPPROTO_TCP, IPV6_V6ONLY, MSG_DONTWAIT, MSG_NOSIGNAL,
                    POLLIN, POLLNVAL, POLLOUT, SO_ERROR, SO_REUSEADDR,
                    SOCK_CLOEXEC, SOCK_NONBLOCK, SOCK_STREAM, SOL_SOCKET, SOMAXCONN, TCP_NODELAY, accept4,
                    addrinfo, bind, connect, epoll_create1, epoll_ctl, epoll_event, epoll_wait, eventfd,
                    freeaddrinfo, gai_strerror, getaddrinfo, getrandom, getsockname, getsockopt, htole32, htole64,
                    htons, inet_ntop, le32toh, le64toh, listen, ntohs, poll, pollfd, pthread_create,
                    pthread_join, pthread_setname_np, pthread_mutex_destroy, pthread_mutex_init, pthread_mutex_lock,
                    pthread_mutex_unlock, pthread_sigmask, recv, send,
                    setsockopt, sigset_t, sockaddr, sockaddr_in, sockaddr_in6, sockaddr_storage, socket,
                    socklen_t)


class DistError(RuntimeError):
    """A store failure; torch.distributed's name for it."""


class DistStoreError(DistError):
    """A store operation timed out (a wait, the master waiting for its workers)."""


class DistNetworkError(DistError):
    """The store cannot be reached, the server cannot bind, or the connection was lost."""


class QueueEmptyError(DistStoreError):
    """queue_pop(block=False) on an empty queue."""


class StoreInterrupted(DistError):
    """A blocking store call ended because its interrupt_fd became readable."""


# In this order: the wire format (commands, frames, integers as ASCII decimal); glog-shaped lines on
# stderr; the clock and the blocking waits of the Python-facing calls; what each request does to the
# keys, queues and waiters; the epoll loop (connections, reading, replying, accepting, sweeping);
# Server (listening sockets, the loop thread, in-process calls); Client (one blocking connection).
include "store/protocol.pyx"
include "store/log.pyx"
include "store/waiting.pyx"
include "store/commands.pyx"
include "store/loop.pyx"
include "store/server.pyx"
include "store/client.pyx"
