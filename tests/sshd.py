"""A real OpenSSH server for the --hosts tests: loopback only, a random free port, keys of its own.

The sshd fixture (tests/conftest.py) starts one per test session; tests that use it are skipped, naming
openssh-server, where sshd is missing, or where the tests do not run as root (sshd's sessions and the
mount namespace below need it).

sshd listens on 127.0.0.1, 127.0.0.2 and 127.0.0.3, one port, and lets the current user in with the
tests' key only. ``ssh`` is the --ssh value: ssh with a client configuration of its own (port, key,
known hosts, no prompts). Every session gets ``XDG_CACHE_HOME`` in the server's directory, so the
launchers the binary copies land there, not in the user's home.

127.0.0.1 is a host without ``hidden_dir``: sshd runs its sessions (``ForceCommand``) in a mount
namespace of their own where an empty tmpfs covers that directory. All three hosts are this machine,
so this is how a path that exists here is missing on a host: a binary started from ``hidden_dir``
must copy itself to 127.0.0.1, while 127.0.0.2 and 127.0.0.3 run it where it is.
"""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from helpers import free_port

SSHD = "/usr/sbin/sshd"
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
HIDING_HOST = "127.0.0.1"  # its sessions do not see hidden_dir
PRIVILEGE_SEPARATION_DIR = "/run/sshd"  # Debian's sshd refuses to start without it


def unavailable() -> str | None:
    """Why the tests cannot run a server here, or None."""
    if not os.access(SSHD, os.X_OK) or shutil.which("ssh") is None:
        return f"openssh-server not installed ({SSHD} or ssh is missing)"
    if os.geteuid() != 0:
        return "the sshd tests run as root (sshd's sessions and a mount namespace need it)"
    return None


class SshServer:
    """sshd on 127.0.0.1-3 and the client side to reach it, in a temporary directory."""

    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="launcher-sshd-")
        self.hidden_dir = os.path.join(self.directory, "hidden")
        self.cache_dir = os.path.join(self.directory, "cache")
        os.mkdir(self.hidden_dir)
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.log_path = os.path.join(self.directory, "sshd.log")

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    @property
    def ssh(self) -> str:
        """The --ssh value that reaches this server."""
        return f"ssh -F {self.path('ssh_config')}"

    def start(self, timeout: float = 30) -> "SshServer":
        for key in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "launcher tests", "-f",
                            self.path(key)], check=True)
        shutil.copy(self.path("client_key.pub"), self.path("authorized_keys"))
        os.makedirs(PRIVILEGE_SEPARATION_DIR, mode=0o755, exist_ok=True)
        # A port picked free can be taken before sshd binds it: try again then.
        for _ in range(5):
            self.port = free_port()
            self._write_configuration()
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", self.path("sshd_config")],
                                                stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + timeout
            while self.process.poll() is None and time.monotonic() < deadline:
                if all(self._answers(host) for host in HOSTS):
                    return self
                time.sleep(0.05)
            self.stop()
        raise RuntimeError(f"sshd did not start; see {self.log_path}")

    def _write_configuration(self) -> None:
        hide = (f"unshare --mount sh -c 'mount -t tmpfs -o size=4k hidden {self.hidden_dir} && "
                'exec "$SHELL" -c "$SSH_ORIGINAL_COMMAND"\'')
        with open(self.path("sshd_config"), "w") as config:
            config.write("".join(f"ListenAddress {host}:{self.port}\n" for host in HOSTS) + f"""\
HostKey {self.path("host_key")}
AuthorizedKeysFile {self.path("authorized_keys")}
PidFile none
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
SetEnv XDG_CACHE_HOME={self.cache_dir}
LogLevel ERROR
Match LocalAddress {HIDING_HOST}
  ForceCommand {hide}
""")
        public_key = open(self.path("host_key.pub")).read().strip()
        with open(self.path("known_hosts"), "w") as known:
            known.write(",".join(f"[{host}]:{self.port}" for host in HOSTS) + f" {public_key}\n")
        with open(self.path("ssh_config"), "w") as config:
            config.write(f"""\
Host *
  Port {self.port}
  User {getpass.getuser()}
  IdentityFile {self.path("client_key")}
  IdentitiesOnly yes
  UserKnownHostsFile {self.path("known_hosts")}
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  BatchMode yes
  ConnectTimeout 10
  LogLevel ERROR
""")

    def _answers(self, host: str) -> bool:
        """sshd sends its version line on that address."""
        try:
            with socket.create_connection((host, self.port), timeout=1) as connection:
                return connection.recv(8).startswith(b"SSH-2.0")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
