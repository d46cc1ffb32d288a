"""Nodes as launcher processes (python -m launcher) running real torch gloo workers.

Every node is a launcher on its own loopback address (127.0.0.2, 127.0.0.3...)
with two workers; the workers all-reduce their ranks and record what they saw.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid

import pytest
from helpers import WORKERS, finish, free_port, node_addr, rdzv_endpoint, rdzv_options, start_launcher

# Records its view of the world, all-reduces once; until the world has the size
# the test waits for, it keeps all-reducing (so a lost or joining node ends it).
WORKER = r"""
import json, os, sys, time
import torch, torch.distributed as dist

out, final_world = sys.argv[1], int(sys.argv[2])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
total = torch.tensor([rank + 1.0])
dist.all_reduce(total)
record = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                        "TORCHELASTIC_RESTART_COUNT")}
record["sum"] = total.item()
with open(os.path.join(out, f"world{world}_rank{rank}.json"), "w") as f:
    json.dump(record, f)
while world != final_world:
    time.sleep(0.2)
    dist.all_reduce(total)  # raises once a peer is gone
dist.barrier()
dist.destroy_process_group()
"""

NPROC = 2
CONF = "join_timeout=60,last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3"


@pytest.fixture
def worker(tmp_path):
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    (tmp_path / "out").mkdir()
    return path


def launch(launchers, worker, node: int, final_world: int, *options) -> subprocess.Popen:
    proc = start_launcher(f"--nproc-per-node={NPROC}", f"--local-addr={node_addr(node)}", "--monitor-interval=0.2",
                          *options, worker, worker.parent / "out", final_world)
    launchers.append(proc)
    return proc


def all_succeed(procs):
    for code, _, err in finish(*procs):
        assert code == 0, err[-3000:]


def records(worker, nodes) -> list[dict]:
    """What the workers of a world of ``nodes`` nodes recorded."""
    out = worker.parent / "out"
    names = sorted(n for n in os.listdir(out) if n.startswith(f"world{nodes * NPROC}_"))
    return [json.loads((out / n).read_text()) for n in names]


def check_world(found, nodes, restart_counts=("0",)):
    world = nodes * NPROC
    assert sorted(int(r["RANK"]) for r in found) == list(range(world))
    assert all(int(r["WORLD_SIZE"]) == world and r["sum"] == world * (world + 1) / 2 for r in found)
    assert len({(r["MASTER_ADDR"], r["MASTER_PORT"]) for r in found}) == 1
    assert {r["TORCHELASTIC_RESTART_COUNT"] for r in found} == set(restart_counts)
    # Group ranks are dense and each node's workers are consecutive ranks.
    for r in found:
        assert int(r["RANK"]) == int(r["GROUP_RANK"]) * NPROC + int(r["LOCAL_RANK"])


@pytest.mark.parametrize("backend", ["static", "c10d", "etcd"])
@pytest.mark.parametrize("nodes", [2, 3])
def test_nodes_run_a_gloo_job_together(request, launchers, worker, backend, nodes):
    endpoint, run_id = rdzv_endpoint(backend, request), uuid.uuid4().hex
    world = nodes * NPROC
    procs = [launch(launchers, worker, n, world, *rdzv_options(backend, nodes, n, endpoint, run_id, CONF))
             for n in range(nodes)]
    all_succeed(procs)
    check_world(records(worker, nodes), nodes)


@pytest.mark.parametrize("backend", ["c10d", "etcd"])
def test_a_killed_node_leaves_the_survivors_to_restart_and_finish(request, launchers, worker, backend):
    endpoint, run_id = rdzv_endpoint(backend, request), uuid.uuid4().hex
    procs = [
        launch(launchers, worker, n, 2 * NPROC, "--max-restarts=1",
               *rdzv_options(backend, 3, n, endpoint, run_id, CONF, min_nodes=2))
        for n in range(3)
    ]
    deadline = time.monotonic() + 120
    while len(records(worker, 3)) < 3 * NPROC:  # attempt 0 runs on 3 nodes
        assert time.monotonic() < deadline, "the 3 nodes never started"
        time.sleep(0.2)
    check_world(records(worker, 3), 3)
    procs[2].send_signal(signal.SIGKILL)  # the launcher; its workers die with it
    all_succeed(procs[:2])
    check_world(records(worker, 2), 2, restart_counts=("1",))


@pytest.mark.parametrize("backend", ["c10d", "etcd"])
def test_a_joining_node_restarts_the_job_at_the_larger_size(request, launchers, worker, backend):
    endpoint, run_id = rdzv_endpoint(backend, request), uuid.uuid4().hex
    first = launch(launchers, worker, 0, 2 * NPROC, *rdzv_options(backend, 2, 0, endpoint, run_id, CONF, min_nodes=1))
    deadline = time.monotonic() + 120
    while len(records(worker, 1)) < NPROC:  # running alone
        assert time.monotonic() < deadline, "the first node never started"
        time.sleep(0.2)
    check_world(records(worker, 1), 1)
    second = launch(launchers, worker, 1, 2 * NPROC, *rdzv_options(backend, 2, 1, endpoint, run_id, CONF, min_nodes=1))
    all_succeed([first, second])
    # The first node restarted (its restart count is 1), the second started fresh.
    check_world(records(worker, 2), 2, restart_counts=("0", "1"))


def test_static_restart_starts_from_a_clean_store(launchers, tmp_path):
    """Rank 1 fails in attempt 0 after leaving keys in the static store; attempt 1 must not see them."""
    options = ["--nnodes=2", "--rdzv-backend=static", f"--master-addr={node_addr(0)}", f"--master-port={free_port()}",
               "--max-restarts=1"]
    procs = [
        start_launcher(f"--nproc-per-node={NPROC}", f"--local-addr={node_addr(node)}", f"--node-rank={node}",
                       *options, os.path.join(WORKERS, "restart_gloo.py"), tmp_path)
        for node in range(2)
    ]
    launchers += procs
    all_succeed(procs)
    for rank in range(2 * NPROC):
        assert (tmp_path / f"attempt1_{rank}").read_text() == "sum=10 stale=[]\n"


@pytest.mark.parametrize("backend", ["c10d", "etcd"])
def test_a_node_whose_job_failed_closes_the_rendezvous_at_once_and_the_other_ends(request, launchers, tmp_path,
                                                                                   backend):
    # Node rank 0 serves the other (the workers' store; with c10d the rendezvous' store too): at a successful end
    # it waits up to close_timeout for the other to leave. After its workers failed it waits for nobody.
    worker = tmp_path / "worker.sh"
    worker.write_text('if [ "$GROUP_RANK" = 0 ]; then exit 3; fi\nexec sleep 1000\n')
    endpoint, run_id = rdzv_endpoint(backend, request), uuid.uuid4().hex
    procs = [
        start_launcher("--nproc-per-node=1", f"--local-addr={node_addr(n)}", "--monitor-interval=0.2",
                       *rdzv_options(backend, 2, n, endpoint, run_id, CONF + ",close_timeout=600"),
                       "--no-python", "bash", worker)
        for n in range(2)
    ]
    launchers.extend(procs)
    (failed_code, _, failed_err), (other_code, _, other_err) = finish(*procs, timeout=120)
    assert failed_code == 1 and "bash FAILED" in failed_err, failed_err
    assert other_code == 1 and "could not leave cleanly" not in failed_err + other_err, other_err
    assert other_err.splitlines()[-1].startswith(f"launcher: error: rendezvous '{run_id}' ("), other_err
    assert other_err.splitlines()[-1].endswith("is closed: the job finished or its nodes shut down; start a new job "
                                               "with another --rdzv-id"), other_err
