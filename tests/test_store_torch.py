"""Our store among real torch processes: the capture tool's bytes, a gloo job, a GIL-bound host."""
import mmap
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from helpers import clean_env, every_command, free_port, torch_client

from launcher.store import StoreServer, TCPStore, create_store

torch_dist = pytest.importorskip("torch.distributed", reason="torch (requirements-dev) is the reference peer")

CAPTURE_TOOL = "/work/shared/tools/tcpstore_capture.py"


def operations(capture: str):
    """The capture tool's output as (bytes to the server, bytes back, result line) per operation.

    Bytes are joined per operation, so how TCP cut them into chunks does not matter; the
    handshake's PING nonce is random per run and is replaced by a marker.
    """
    ops, sent, received = [], "", ""
    for line in capture.splitlines():
        tag, _, rest = line.partition(" ")
        if tag == "--":
            ops.append((sent, received, rest))
            sent, received = "", ""
        elif tag.startswith("C"):
            sent += rest
        elif tag.startswith("S"):
            received += rest
    connect_sent, connect_received, result = ops[0]
    nonce = connect_sent[12:20]
    assert connect_sent.startswith("00cef7853c0d") and connect_received.startswith(nonce)
    ops[0] = (connect_sent.replace(nonce, "<nonce>", 1), connect_received.replace(nonce, "<nonce>", 1), result)
    return ops


@pytest.mark.skipif(not os.path.exists(CAPTURE_TOOL), reason=f"the capture tool {CAPTURE_TOOL} is missing")
def test_capture_tool_sees_the_same_bytes_from_our_server_as_from_torch_server():
    server = StoreServer("127.0.0.1")
    try:
        runs = [
            subprocess.Popen([sys.executable, CAPTURE_TOOL] + target, stdout=subprocess.PIPE, text=True)
            for target in ([], ["--target", f"127.0.0.1:{server.port}"])
        ]
        torch_run, our_run = [run.communicate(timeout=120)[0] for run in runs]
        assert [run.returncode for run in runs] == [0, 0]
    finally:
        server.close()
    theirs, ours = operations(torch_run), operations(our_run)
    assert len(theirs) == 20
    assert ours == theirs


def test_our_client_against_torch_server():
    server = torch_dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    ours = every_command(TCPStore("127.0.0.1", server.port, timeout=30))
    server = torch_dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    assert ours == every_command(torch_client(server.port))


def test_our_client_joins_a_torch_master_waiting_for_its_workers():
    port = free_port()
    masters = []
    master = threading.Thread(
        target=lambda: masters.append(
            torch_dist.TCPStore("127.0.0.1", port, world_size=2, is_master=True, timeout=timedelta(seconds=60))
        )
    )
    master.start()
    ours = TCPStore("127.0.0.1", port, world_size=2, timeout=60)  # retries until the master listens
    master.join(60)
    assert len(masters) == 1  # the master counted both members in init/
    assert ours.num_keys() == 1 and masters[0].num_keys() == 1


WORKER = """
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
total = torch.tensor([float(os.environ["RANK"]) + 1.0])
dist.all_reduce(total)
assert total.item() == 3.0, total
dist.destroy_process_group()
"""


def test_gloo_job_uses_our_server_as_its_store():
    with TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=60) as store:
        env = dict(
            TORCHELASTIC_USE_AGENT_STORE="True",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=store.port,
            WORLD_SIZE=2,
            GLOO_SOCKET_IFNAME="lo",
        )
        workers = [
            subprocess.Popen([sys.executable, "-c", WORKER], env=clean_env(RANK=rank, LOCAL_RANK=rank, **env))
            for rank in range(2)
        ]
        assert [worker.wait(120) for worker in workers] == [0, 0]
        # Both ranks joined through our server and met there.
        assert store.server.wait_count(b"init/", 2, 0) == 2
        assert store.num_keys() > 1


SPINNING_CLIENT = """
import mmap, sys
from datetime import timedelta
import torch.distributed as dist
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False, timeout=timedelta(seconds=60))
with open(sys.argv[2], "r+b") as flag_file:
    flag = mmap.mmap(flag_file.fileno(), 1)
while flag[0] == 0:  # the host starts holding the GIL, then says go
    pass
for i in range(200):
    store.set(f"k{i}", str(i))
    assert store.get(f"k{i}") == str(i).encode()
    store.add("count", 1)
store.wait([f"k{i}" for i in range(200)])
flag[0] = 2
"""


def test_server_keeps_serving_while_python_holds_the_gil(tmp_path):
    flag_path = tmp_path / "flag"
    flag_path.write_bytes(b"\0")
    with open(flag_path, "r+b") as flag_file:
        flag = mmap.mmap(flag_file.fileno(), 1)
    with TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=60) as store:
        client = subprocess.Popen([sys.executable, "-c", SPINNING_CLIENT, str(store.port), str(flag_path)],
                                  env=clean_env())
        interval = sys.getswitchinterval()
        # Hold the GIL (no other thread of this process gets it back) until the client, in
        # another process, says through shared memory that all its 800 requests were answered.
        # Reading the flag and the clock never releases the GIL.
        sys.setswitchinterval(120)
        try:
            flag[0] = 1
            deadline = time.monotonic() + 90
            while flag[0] != 2 and time.monotonic() < deadline:
                pass
        finally:
            sys.setswitchinterval(interval)
        assert flag[0] == 2
        assert client.wait(60) == 0
        assert store.get("count") == b"200"


def test_torch_create_c10d_store_worker_joins_our_create_store_server():
    port = free_port()
    code = (
        "from torch.distributed.elastic.utils.distributed import create_c10d_store;"
        f"create_c10d_store(False, '127.0.0.1', {port}, 2, timeout=60).set('from_torch', 'yes')"
    )
    worker = subprocess.Popen([sys.executable, "-c", code], env=clean_env())
    # Our server waits for both members (init/ and torch's full-rank barrier keys), torch's worker too.
    store = create_store(True, "127.0.0.1", port, world_size=2, timeout=60)
    assert worker.wait(60) == 0
    assert store.get("from_torch") == b"yes"
    assert store.get("_tcp_store/num_members/num_members") == b"2"
    store.close()
