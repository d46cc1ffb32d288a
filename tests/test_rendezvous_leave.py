"""The end of a multi-node job: a node that serves the others outlasts them, so that a success prints no warning.

Two c10d nodes on loopback, as under ``srun -N2``: the store's host (``is_host``)
and a client. At shutdown the node that hosts the c10d store, or the workers'
store as rank 0, keeps them up until the other members have left (at most
close_timeout); before that, closing them under a node still in its exit barrier
or still leaving printed "exit barrier ended" and "could not leave cleanly".
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait

import pytest
from helpers import REPO, free_port, node_addr, together

from launcher.rendezvous import RendezvousParameters, create_handler

# Liveness 1 s x 2; close_timeout far above anything the tests wait for, so that a wait that ends
# early ended because the others left.
SETTINGS = {
    "join_timeout": "30",
    "last_call_timeout": "1",
    "close_timeout": "60",
    "keep_alive_interval": "1",
    "keep_alive_max_attempt": "2",
    "read_timeout": "10",
}
# How long a node that must keep serving is given to (wrongly) finish its shutdown: it finished at once before.
FINISHES_AT_ONCE = 2.0


@pytest.fixture
def job():
    """Makes a fresh two-node c10d run: the parameters of its node 0, the store's host, and node 1."""

    def make() -> list[RendezvousParameters]:
        endpoint = f"127.0.0.1:{free_port()}"
        return [
            RendezvousParameters(
                backend="c10d", endpoint=endpoint, run_id="leave", min_nodes=2, max_nodes=2, local_world_size=1,
                local_addr=node_addr(i), config={**SETTINGS, "is_host": "true" if i == 0 else "false"},
            )
            for i in range(2)
        ]

    return make


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_store_host_leaving_first_waits_for_the_other_node_which_leaves_without_a_warning(job, handlers, caplog):
    host, other = (create_handler(params) for params in job())
    handlers += [host, other]
    together([host.next_rendezvous, other.next_rendezvous])
    with caplog.at_level(logging.INFO, logger="launcher"), ThreadPoolExecutor(1) as pool:
        hosting = pool.submit(host.shutdown)
        wait([hosting], timeout=FINISHES_AT_ONCE)
        served = not hosting.done()
        started = time.monotonic()
        other.shutdown()
        hosting.result(timeout=30)
    assert warnings(caplog) == []  # before: "could not leave cleanly: lost the c10d store ..."
    assert served, "the host closed the c10d store while the other node had not left"
    assert time.monotonic() - started < 30  # it saw the other node leave: no close_timeout ran out
    assert any("closed: no node of round 0 is left" in r.getMessage() for r in caplog.records)


def test_rank_0_leaving_first_keeps_the_workers_store_up_for_the_exit_barrier(job, handlers, caplog):
    handlers += [create_handler(params) for params in job()]
    infos = together([h.next_rendezvous for h in handlers])
    first, last = sorted(range(2), key=lambda i: infos[i].rank)  # rank 0 serves the workers' store
    with caplog.at_level(logging.WARNING, logger="launcher"), ThreadPoolExecutor(1) as pool:
        # Rank 0 passed the exit barrier and shuts down; the last node is still in it (the agent's calls).
        assert infos[first].store.add("exit_barrier/count", 1) == 1
        leaving = pool.submit(handlers[first].shutdown)
        wait([leaving], timeout=FINISHES_AT_ONCE)
        served = not leaving.done()
        store = infos[last].store  # before: "connection to store at ... lost", which the agent logged as a warning
        assert store.add("exit_barrier/count", 1) == 2
        store.set("exit_barrier/done", "1")
        store.wait(["exit_barrier/done"], 10)
        handlers[last].shutdown()
        leaving.result(timeout=30)
    assert warnings(caplog) == []
    assert served, "rank 0 closed the workers' store while a node was in its exit barrier"


def test_two_node_jobs_ending_together_print_no_warning(job, caplog):
    # As at the end of a successful job: every node leaves at the same time. The store's host used to
    # close it under a node that had marked itself gone but still asked whether it was the last.
    with caplog.at_level(logging.WARNING, logger="launcher"):
        for _ in range(20):
            nodes = [create_handler(params) for params in job()]
            together([n.next_rendezvous for n in nodes])
            together([n.shutdown for n in nodes])
    assert warnings(caplog) == []


def test_a_signalled_node_leaves_at_once(job, handlers):
    host, other = (create_handler(params) for params in job())
    handlers += [host, other]
    together([host.next_rendezvous, other.next_rendezvous])
    started = time.monotonic()
    host.leave()  # the agent's path on a signal: it does not wait for the others
    assert time.monotonic() - started < 30


# A node in a process of its own, so that the test can kill it: it joins, says its rank, and waits.
NODE = r"""
import json, sys
from launcher.rendezvous import RendezvousParameters, create_handler
handler = create_handler(RendezvousParameters(**json.loads(sys.argv[1])))
print(handler.next_rendezvous().rank, flush=True)
sys.stdin.read()
"""


def test_the_store_host_does_not_wait_for_a_node_that_died(job, handlers):
    host_params, other_params = job()
    host = create_handler(host_params)
    handlers.append(host)
    other = subprocess.Popen([sys.executable, "-c", NODE, json.dumps(other_params.__dict__)], cwd=REPO,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        with ThreadPoolExecutor(1) as pool:
            joining = pool.submit(other.stdout.readline)
            host.next_rendezvous()
            assert joining.result(timeout=60).strip() in ("0", "1")
        other.kill()
        other.wait()
        started = time.monotonic()
        host.shutdown()
        # Its heartbeat expires after 2 s: the host waits that long, not the 60 s close_timeout.
        assert time.monotonic() - started < 30
    finally:
        other.kill()
        other.communicate()
