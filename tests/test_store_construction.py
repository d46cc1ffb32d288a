"""A store Server or Client whose construction fails, and a wait_count that cannot start, leave no
descriptor or thread behind, and say which step failed."""
import json
import re
import socket
import subprocess
import sys

import pytest
from helpers import REPO, fd_count

from launcher._native.store import Client, DistNetworkError

# Runs in a process of its own: it lowers the descriptor limit so that only SPARE descriptors can be
# opened, then WHAT (a Server, or a wait_count on a running one) meets the limit at one step or another.
WITH_SPARE_DESCRIPTORS = """
import json, os, resource, sys
from launcher._native.store import Server

what, spare = sys.argv[1], int(sys.argv[2])


def open_fds():
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:  # the listing's own descriptor, closed by now
            continue
        fds.add(int(name))
    return fds


def store_threads():
    names = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/comm") as comm:
            names.append(comm.read().strip())
    return names.count("launcher-store")


server = Server("127.0.0.1") if what == "wait_count" else None
reserve = os.open("/dev/null", os.O_RDONLY)  # given back before counting again: counting opens descriptors
before, threads = open_fds() - {reserve}, store_threads()
used = open_fds()
free = [fd for fd in range(max(used) + spare + 2) if fd not in used]
# Soft and hard limit alike: the server raises its soft limit to the hard one.
resource.setrlimit(resource.RLIMIT_NOFILE, (free[spare], free[spare]))
error = None
try:
    if what == "server":
        # Kept alive through the checks: what is released then is what __init__ undid, not __dealloc__.
        server = Server.__new__(Server)
        server.__init__("127.0.0.1")
        server.close()
    else:
        server.wait_count(b"never", 1, 0.0)
except Exception as exc:
    error = f"{type(exc).__name__}: {exc}"
os.close(reserve)
print(json.dumps({"error": error, "leaked": sorted(open_fds() - before), "threads": store_threads() - threads}))
"""


def with_spare_descriptors(what, spare):
    result = subprocess.run([sys.executable, "-c", WITH_SPARE_DESCRIPTORS, what, str(spare)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("spare, error", [
    (0, "DistNetworkError: cannot listen on 127.0.0.1:0: [Errno 24] Too many open files"),
    (1, "OSError: [Errno 24] epoll_create1: Too many open files"),
    (2, "OSError: [Errno 24] eventfd: Too many open files"),
    (3, "OSError: [Errno 24] open /dev/null: Too many open files"),
    # The thread runs by then: naming it opens /proc/self/task/<tid>/comm.
    (4, "OSError: [Errno 24] pthread_setname_np: Too many open files"),
    (5, None),
])
def test_a_server_short_of_descriptors_fails_at_that_step_and_leaves_nothing(spare, error):
    assert with_spare_descriptors("server", spare) == {"error": error, "leaked": [], "threads": 0}


@pytest.mark.parametrize("spare, error", [
    (0, "OSError: [Errno 24] eventfd: Too many open files"),
    (1, None),
])
def test_wait_count_short_of_a_descriptor_fails_and_leaves_nothing(spare, error):
    assert with_spare_descriptors("wait_count", spare) == {"error": error, "leaked": [], "threads": 0}


@pytest.mark.parametrize("listening, reason", [
    (False, "Connection refused"),
    (True, "no answer to the handshake"),  # a socket that listens but is no store server
])
def test_a_client_that_cannot_connect_leaves_no_descriptor(listening, reason):
    with socket.socket() as peer:
        peer.bind(("127.0.0.1", 0))
        if listening:
            peer.listen()
        port = peer.getsockname()[1]
        fds = fd_count()
        message = f"cannot connect to store at 127.0.0.1:{port} within 0.5 s: {reason}"
        with pytest.raises(DistNetworkError, match=re.escape(message)):
            Client("127.0.0.1", port, timeout=0.5)
        assert fd_count() == fds
