"""A real etcd server for the tests: loopback, random ports, a temporary data dir.

The etcd_server fixture (tests/conftest.py) starts one per test module; tests that
use it are skipped, naming etcd, only when the etcd binary is missing.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.request

import pytest
from helpers import free_port

ETCD = shutil.which("etcd")
NO_ETCD = "etcd not installed (the etcd binary is not on PATH)"
needs_etcd = pytest.mark.skipif(ETCD is None, reason=NO_ETCD)


class EtcdServer:
    """One etcd member on 127.0.0.1, started and stopped by the tests."""

    def __init__(self, tls: bool = False):
        self.data_dir = tempfile.mkdtemp(prefix="launcher-etcd-")
        self.process: subprocess.Popen | None = None
        self.client_port = 0
        self.peer_port = 0
        # With tls: https only, and clients must show a certificate the test CA signed.
        self.tls = make_certificates(self.data_dir) if tls else None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    def start(self, timeout: float = 30) -> "EtcdServer":
        # Ports picked free can be taken before etcd binds them: try again then.
        for _ in range(5):
            self.client_port, self.peer_port = free_port(), free_port()
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
                    *(
                        ["--cert-file", self.tls["server.crt"], "--key-file", self.tls["server.key"],
                         "--client-cert-auth", "--trusted-ca-file", self.tls["ca.crt"]]
                        if self.tls else []
                    ),
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
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=self.tls["ca.crt"])
            context.load_cert_chain(self.tls["client.crt"], self.tls["client.key"])
        try:
            request = urllib.request.Request(self.url + "/v3/kv/range", data=json.dumps({"key": "AA=="}).encode())
            with urllib.request.urlopen(request, timeout=1, context=context) as answer:
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


def make_certificates(directory: str) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    paths = {name: os.path.join(directory, name) for name in
             ("ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key")}

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=launcher test CA",
            "-keyout", paths["ca.key"], "-out", paths["ca.crt"])
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        request = os.path.join(directory, f"{name}.csr")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=launcher test {name}",
                "-keyout", paths[f"{name}.key"], "-out", request)
        extensions = os.path.join(directory, f"{name}.ext")
        with open(extensions, "w") as out:
            out.write(extension + "\n")
        openssl("x509", "-req", "-in", request, "-CA", paths["ca.crt"], "-CAkey", paths["ca.key"], "-CAcreateserial",
                "-days", "1", "-extfile", extensions, "-out", paths[f"{name}.crt"])
    return paths


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")

