"""A real etcd server for the tests: loopback, random ports, a temporary data dir.

    from etcd import etcd_server   # pytest fixture; import it into the test module

Tests that use it are skipped, naming etcd, only when the etcd binary is missing.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

import pytest

ETCD = shutil.which("etcd")
needs_etcd = pytest.mark.skipif(ETCD is None, reason="etcd not installed (the etcd binary is not on PATH)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EtcdServer:
    """One etcd member on 127.0.0.1, started and stopped by the tests."""

    def __init__(self):
        self.data_dir = tempfile.mkdtemp(prefix="launcher-etcd-")
        self.process: subprocess.Popen | None = None
        self.client_port = 0
        self.peer_port = 0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def start(self, timeout: float = 30) -> "EtcdServer":
        # Ports picked free can be taken before etcd binds them: try again then.
        for _ in range(5):
            self.client_port, self.peer_port = _free_port(), _free_port()
            peer = f"http://127.0.0.1:{self.peer_port}"
            self.log = open(os.path.join(self.data_dir, "etcd.log"), "wb")
            self.process = subprocess.Popen(
                [
                    ETCD,
                    "--name", "test",
                    "--data-dir", os.path.join(self.data_dir, "data"),
                    "--listen-client-urls", self.url,
                    "--advertise-client-urls", self.url,
                    "--listen-peer-urls", peer,
                    "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", f"test={peer}",
                    "--log-level", "error",
                ],
                stdout=self.log,
                stderr=subprocess.STDOUT,
            )
            deadline = time.monotonic() + timeout
            while self.process.poll() is None and time.monotonic() < deadline:
                if self.ready():
                    return self
                time.sleep(0.05)
            self.stop()
        raise RuntimeError(f"etcd did not start; see {self.data_dir}/etcd.log")

    def ready(self) -> bool:
        try:
            request = urllib.request.Request(self.url + "/v3/kv/range", data=json.dumps({"key": "AA=="}).encode())
            with urllib.request.urlopen(request, timeout=1) as answer:
                return answer.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None
        self.log.close()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def etcd_server():
    if ETCD is None:
        pytest.skip("etcd not installed (the etcd binary is not on PATH)")
    server = EtcdServer().start()
    try:
        yield server
    finally:
        server.cleanup()
