"""Shared test helpers: run the launcher as users do, in a subprocess."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = [sys.executable, "-m", "launcher"]


def clean_env(**extra):
    """The test process's environment without torchrun/launcher settings leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC_", "SLURM_"))}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_launcher(*args, env=None, timeout=180, cwd=None, **kwargs):
    """Run ``python -m launcher ARGS`` and return the CompletedProcess (text mode)."""
    return subprocess.run(
        LAUNCHER + [str(a) for a in args],
        env=clean_env() if env is None else env,
        cwd=cwd or REPO,
        timeout=timeout,
        capture_output=True,
        text=True,
        **kwargs,
    )


def recv_exactly(conn, size):
    """Read exactly ``size`` bytes from a socket, failing if the peer closes first."""
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data
