"""The static rendezvous: fixed nodes and ranks around node 0's store."""
from __future__ import annotations

import logging
import os
import select
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import free_port, node_addr, together

from launcher.rendezvous import (
    RendezvousConnectionError,
    RendezvousError,
    RendezvousParameters,
    RendezvousTimeoutError,
    create_handler,
    keyvalue,
    static,
)
from launcher.store import StoreInterrupted, TCPStore


@pytest.fixture
def job(request):
    port = free_port()
    run_id = f"{request.node.name}-{os.urandom(3).hex()}"

    def make(rank: int, nnodes: int, at: int | None = None, **config) -> RendezvousParameters:
        return RendezvousParameters(
            backend="static",
            endpoint=f"127.0.0.1:{port}",
            run_id=run_id,
            min_nodes=nnodes,
            max_nodes=nnodes,
            local_world_size=rank + 1,
            local_addr=node_addr(rank if at is None else at),
            config={"rank": rank, "timeout": "20", **config},
        )

    make.port = port
    return make


@pytest.mark.parametrize("n", [2, 3])
def test_nodes_get_their_node_rank_and_the_master_store(job, handlers, n):
    handlers += [create_handler(job(rank, n)) for rank in range(n)]
    infos = together([h.next_rendezvous for h in handlers])
    assert [i.rank for i in infos] == list(range(n))
    for info in infos:
        assert (info.round, info.master_addr, info.master_port) == (0, "127.0.0.1", job.port)
        assert [(node.addr, node.local_world_size) for node in info.nodes] == [(node_addr(r), r + 1) for r in range(n)]
    infos[1].store.set("agent", b"1")
    assert infos[0].store.get("agent") == b"1"


def test_every_round_starts_with_an_empty_workers_store(job, handlers):
    handlers += [create_handler(job(rank, 2)) for rank in range(2)]
    first = together([h.next_rendezvous for h in handlers])
    worker = TCPStore("127.0.0.1", job.port, timeout=10)
    worker.set("attempt0/rank1", b"stale")
    first[0].store.set("agent-key", b"kept")

    with ThreadPoolExecutor(1) as pool:
        early = pool.submit(handlers[1].next_rendezvous)
        # Node 1 is in the next round's barrier, node 0 is not: nothing is cleared yet.
        assert select.select([handlers[0].waiting_fd()], [], [], 20)[0]
        assert worker.check(["attempt0/rank1"])
        second = handlers[0].next_rendezvous()
        early.result(timeout=30)
    assert second.round == 1 and (second.master_addr, second.master_port) == ("127.0.0.1", job.port)
    assert not worker.check(["attempt0/rank1"])  # the workers' keys are gone
    assert first[0].store.get("agent-key") == b"kept"  # the agents' are not
    worker.close()


def test_a_node_restarting_is_seen_by_the_others(job, handlers):
    handlers += [create_handler(job(rank, 2)) for rank in range(2)]
    together([h.next_rendezvous for h in handlers])
    assert handlers[0].num_nodes_waiting() == 0
    with ThreadPoolExecutor(1) as pool:
        restarting = pool.submit(handlers[1].next_rendezvous)
        assert select.select([handlers[0].waiting_fd()], [], [], 20)[0]
        assert handlers[0].num_nodes_waiting() == 1
        assert handlers[0].next_rendezvous().round == restarting.result(timeout=30).round == 1


def test_two_nodes_with_the_same_rank(job, handlers):
    handlers += [create_handler(job(0, 2)), create_handler(job(1, 2)), create_handler(job(1, 2, at=7))]
    results = []

    def attempt(handler):
        try:
            results.append(handler.next_rendezvous())
        except RendezvousError as exc:
            results.append(exc)

    threads = [threading.Thread(target=attempt, args=(h,)) for h in handlers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    errors = [r for r in results if isinstance(r, RendezvousError)]
    assert len(errors) == 1 and len(results) == 3
    assert "node rank 1 is already taken by 127.0.0." in str(errors[0]) and "own --node-rank" in str(errors[0])


def test_a_node_arriving_before_the_running_node_of_its_rank_first_beats_is_told(job, handlers, monkeypatch):
    # A static node's heartbeat starts just after its first round completes: a node of the same rank
    # arriving in between took the rank of the next round and waited there alone until its timeout.
    first_beat, go_on = threading.Event(), threading.Event()
    beat = keyvalue.StoreBackend.heartbeat

    def held_beat(kv, node_id):
        if threading.current_thread().name.startswith("rank 1"):
            first_beat.set()
            go_on.wait(60)
        beat(kv, node_id)

    monkeypatch.setattr(keyvalue.StoreBackend, "heartbeat", held_beat)
    handlers += [create_handler(job(0, 2)), create_handler(job(1, 2))]
    rank1 = ThreadPoolExecutor(1, thread_name_prefix="rank 1")
    try:
        running = rank1.submit(handlers[1].next_rendezvous)
        handlers[0].next_rendezvous()  # round 0 is complete
        assert first_beat.wait(30)  # and node rank 1 has not beaten yet
        late = create_handler(job(1, 2, at=7, timeout="5"))
        handlers.append(late)
        with pytest.raises(RendezvousError, match="node rank 1 is already taken by 127.0.0.3"):
            late.next_rendezvous()
    finally:
        go_on.set()
        rank1.shutdown()
    assert running.result(timeout=30).round == 0


def test_a_node_arriving_with_the_rank_of_a_running_node_is_told_at_once(job, handlers):
    handlers += [create_handler(job(0, 2)), create_handler(job(1, 2))]
    together([handlers[0].next_rendezvous, handlers[1].next_rendezvous])  # round 0 runs
    late = create_handler(job(1, 2, at=7, timeout=60))
    handlers.append(late)
    started = time.monotonic()
    with pytest.raises(RendezvousError, match="node rank 1 is already taken by 127.0.0.3"):
        late.next_rendezvous()
    assert time.monotonic() - started < 30  # told, not timed out


def test_a_missing_node_times_out_naming_it(job, handlers, caplog, monkeypatch):
    monkeypatch.setattr(static, "STATUS_INTERVAL", 0.5)
    handlers.append(create_handler(job(0, 2, timeout=2)))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="launcher"), pytest.raises(RendezvousTimeoutError) as error:
        handlers[0].next_rendezvous()
    assert time.monotonic() - started < 5
    message = str(error.value)
    assert "\n" not in message
    assert f"store 127.0.0.1:{job.port}) timed out after 2 s in round 0" in message
    assert "1 of 2 nodes arrived (rank 0 127.0.0.2); missing node rank(s) 1" in message
    lines = [r.getMessage() for r in caplog.records if "timeout in" in r.getMessage()]
    assert 2 <= len(lines) <= 6 and all("missing node rank(s) 1" in line for line in lines)


def test_status_lines_come_once_an_interval_when_the_store_answers_at_once(job, handlers, caplog, monkeypatch):
    # As the store does for a wait of under a millisecond (it counts in whole ones): "no news" at once.
    monkeypatch.setattr(keyvalue.StoreBackend, "wait_news", lambda self, round, count, timeout: count)
    monkeypatch.setattr(static, "STATUS_INTERVAL", 0.5)
    handlers.append(create_handler(job(0, 2, timeout=2)))
    with caplog.at_level(logging.WARNING, logger="launcher"), pytest.raises(RendezvousTimeoutError):
        handlers[0].next_rendezvous()
    lines = [r.getMessage() for r in caplog.records if "timeout in" in r.getMessage()]
    assert 2 <= len(lines) <= 4, lines[:6]


def test_without_node_0_the_others_wait_then_fail(job, handlers, caplog, monkeypatch):
    monkeypatch.setattr(static, "STATUS_INTERVAL", 0.5)
    handlers.append(create_handler(job(1, 2, timeout=2)))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="launcher"), pytest.raises(RendezvousConnectionError) as error:
        handlers[0].next_rendezvous()
    assert time.monotonic() - started < 6
    assert f"cannot reach node rank 0's store at 127.0.0.1:{job.port}" in str(error.value)
    assert "waited 2 s" in str(error.value)
    assert any("waiting for node rank 0 to host the store" in r.getMessage() for r in caplog.records)


def test_the_interrupt_fd_ends_the_barrier(job, handlers):
    read_fd, write_fd = os.pipe()
    params = job(0, 2, timeout=60)
    params.interrupt_fd = read_fd
    handlers.append(create_handler(params))
    threading.Timer(0.5, os.write, (write_fd, b"x")).start()
    started = time.monotonic()
    with pytest.raises(StoreInterrupted):
        handlers[0].next_rendezvous()
    assert time.monotonic() - started < 3
    os.close(write_fd)
    os.close(read_fd)


def test_one_node_on_port_0_reports_the_real_port(handlers):
    handlers.append(
        create_handler(
            RendezvousParameters(
                backend="static", endpoint="127.0.0.1:0", run_id="one", min_nodes=1, max_nodes=1,
                local_world_size=1, config={"rank": 0},
            )
        )
    )
    info = handlers[0].next_rendezvous()
    assert info.master_port != 0
    worker = TCPStore("127.0.0.1", info.master_port, timeout=5)
    worker.set("k", b"v")
    worker.close()
