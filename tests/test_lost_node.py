"""A lost node (``kill -9`` of its launcher) while every worker is blocked: the others do not hang.

Nodes are launchers on their own loopback addresses running a gloo worker each. The
workers of the first round block in a call that never returns after one all-reduce (as
ranks sit in NCCL when a peer vanishes), so nothing but the agents' heartbeats can tell
that a node is gone: c10d and etcd survivors restart without it (or wait for a
replacement below the minimum), whatever --max-restarts says; static nodes end with one
line naming it.
"""
from __future__ import annotations

import json
import os
import select
import signal
import time
import uuid

import pytest
from helpers import finish, free_port, node_addr, rdzv_endpoint, rdzv_options, start_launcher

# Its first round blocks while the file "block" exists: the test removes it once it killed a node.
WORKER = r"""
import json, os, sys, time
import torch, torch.distributed as dist

out = sys.argv[1]
started = time.time()
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
total = torch.tensor([rank + 1.0])
dist.all_reduce(total)
record = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")}
record.update(sum=total.item(), started=started)
with open(os.path.join(out, f"{os.environ['MASTER_PORT']}_{rank}.json"), "w") as f:
    json.dump(record, f)
if os.path.exists(os.path.join(out, "block")):
    time.sleep(10**6)  # only the agent can end this
dist.barrier()
dist.destroy_process_group()
"""

# Liveness 3 s: a node is lost at most 3 s + two 1 s checks after its last heartbeat.
CONF = "join_timeout=120,last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3"
STATIC_CONF = "keep_alive_interval=1,keep_alive_max_attempt=3"
# From the kill to the survivors' workers running again (or the static node ending): about 6 s
# here; generous for a loaded machine, and far below the minutes NCCL's own timeout takes.
BOUND = 40


@pytest.fixture
def job(tmp_path):
    """The worker and its output directory, with the "block" file in place."""
    (tmp_path / "worker.py").write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    (out / "block").touch()
    return tmp_path


def launch(launchers, job, node, *options):
    proc = start_launcher("--nproc-per-node=1", f"--local-addr={node_addr(node)}", *options, job / "worker.py",
                          job / "out")
    launchers.append(proc)
    return proc


def rounds(job) -> dict[str, list[dict]]:
    """What the workers recorded, by round (each round has its own workers' store port)."""
    found: dict[str, list[dict]] = {}
    for name in os.listdir(job / "out"):
        if name.endswith(".json"):
            record = json.loads((job / "out" / name).read_text())
            found.setdefault(record["MASTER_PORT"], []).append(record)
    return found


def wait_for_round(job, size, procs, timeout=120):
    """Wait until the workers of a round of ``size`` have all recorded it; return their records."""
    deadline = time.monotonic() + timeout
    while True:
        done = [records for records in rounds(job).values() if len(records) == size]
        if done:
            return done[0]
        assert all(proc.poll() is None for proc in procs), "a node ended before its workers ran"
        assert time.monotonic() < deadline, f"no round of {size} workers within {timeout} s"
        time.sleep(0.1)


def read_until(proc, text, timeout) -> str:
    """Read the process's stderr until ``text`` appears; what was read (the rest stays in the pipe)."""
    seen, deadline = b"", time.monotonic() + timeout
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([proc.stderr], [], [], left)[0], f"no {text!r} in: {seen[-2000:]!r}"
        chunk = os.read(proc.stderr.fileno(), 65536)
        assert chunk, f"the node ended without {text!r}: {seen[-2000:]!r}"
        seen += chunk
    return seen.decode()


def kill(proc, job) -> float:
    """SIGKILL a node's launcher (its workers die with it) and let later rounds run; when it happened."""
    proc.send_signal(signal.SIGKILL)
    killed_at = time.time()
    (job / "out" / "block").unlink()
    return killed_at


def later_round(job, first) -> list[dict]:
    """The records of the one round after ``first`` (a round's records)."""
    [records] = [found for port, found in rounds(job).items() if port != first[0]["MASTER_PORT"]]
    return records


def check_world(records, size, restart_counts):
    assert sorted(int(r["RANK"]) for r in records) == list(range(size))
    assert all(int(r["WORLD_SIZE"]) == size and r["sum"] == size * (size + 1) / 2 for r in records)
    assert sorted(r["TORCHELASTIC_RESTART_COUNT"] for r in records) == sorted(restart_counts)


@pytest.mark.parametrize("backend", ["c10d", "etcd"])
def test_the_survivors_restart_without_a_lost_node_even_with_no_restarts_left(request, launchers, job, backend):
    endpoint, run_id = rdzv_endpoint(backend, request), uuid.uuid4().hex
    procs = [
        launch(launchers, job, n, "--max-restarts=0", "--event-log-handler=console",
               *rdzv_options(backend, 3, n, endpoint, run_id, CONF, min_nodes=2))
        for n in range(3)
    ]
    first = wait_for_round(job, 3, procs)
    check_world(first, 3, ["0"] * 3)
    killed_at = kill(procs[2], job)  # not node 0: it hosts the c10d store
    results = finish(*procs[:2])
    for code, _, err in results:
        assert code == 0, err[-3000:]
    later = later_round(job, first)
    check_world(later, 2, ["1", "1"])  # a lost node is no failure: --max-restarts=0 let them restart
    assert max(r["started"] for r in later) - killed_at < BOUND
    for _, _, err in results:  # each survivor says which node it lost, in its log and as an event
        assert f"lost node(s) {node_addr(2)}; restarting the worker group without them" in err
        events = [json.loads(line) for line in err.splitlines()
                  if line.startswith('{"name": "torchelastic.worker.status.NODE_LOST"')]
        assert [json.loads(event["metadata"]["metadata"])["lost_nodes"] for event in events] == [[node_addr(2)]]


@pytest.mark.parametrize("backend", ["c10d", "etcd"])
def test_below_the_minimum_the_survivor_waits_for_a_replacement(request, launchers, job, backend):
    endpoint, run_id = rdzv_endpoint(backend, request), uuid.uuid4().hex
    procs = [launch(launchers, job, n, *rdzv_options(backend, 2, n, endpoint, run_id, CONF, min_nodes=2))
             for n in range(2)]
    first = wait_for_round(job, 2, procs)
    kill(procs[1], job)
    # The survivor restarts and waits, below the minimum, saying so every few seconds.
    waited = read_until(procs[0], "1 of min 2, max 2 nodes joined", timeout=BOUND)
    assert f"lost node(s) {node_addr(1)}" in waited
    replacement = launch(launchers, job, 2, *rdzv_options(backend, 2, 2, endpoint, run_id, CONF, min_nodes=2))
    for code, _, err in finish(procs[0], replacement):
        assert code == 0, err[-3000:]
    # The survivor restarted once, the replacement took the free place in its first attempt.
    check_world(later_round(job, first), 2, ["0", "1"])


def static_node_lost(launchers, job, killed: int) -> tuple[str, list[str], str]:
    """Two static nodes; once both run, node ``killed`` is killed with ``kill -9`` and the other ends (exit 1,
    within BOUND, no traceback). The store's endpoint, the other's error lines and its stderr."""
    endpoint = f"{node_addr(0)}:{free_port(node_addr(0))}"
    procs = [launch(launchers, job, n, f"--rdzv-conf={STATIC_CONF}", *rdzv_options("static", 2, n, endpoint, "", ""))
             for n in range(2)]
    wait_for_round(job, 2, procs)
    killed_at = kill(procs[killed], job)
    [(code, _, err)] = finish(procs[1 - killed])
    assert time.time() - killed_at < BOUND
    assert code == 1
    assert "Traceback" not in err
    return endpoint, [line for line in err.splitlines() if line.startswith("launcher: error:")], err


def test_a_lost_static_node_ends_the_other_with_one_line_naming_it(launchers, job):
    _, errors, err = static_node_lost(launchers, job, killed=1)
    assert len(errors) == 1 and f"lost node rank 1 ({node_addr(1)})" in errors[0], err[-3000:]


def test_losing_the_static_store_host_ends_the_other_with_one_line(launchers, job):
    endpoint, errors, err = static_node_lost(launchers, job, killed=0)
    assert len(errors) == 1 and f"store {endpoint}" in errors[0], err[-3000:]
