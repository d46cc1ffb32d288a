"""The single binary over ssh (--hosts): it copies itself into a host's cache where its own path is missing,
runs that copy, and reuses it the next time.

The binary runs from sshd.hidden_dir, which the hiding host lacks (tests/sshd.py): there it must be
copied; the other host runs it where it is.
"""
import hashlib
import os
import shutil
import subprocess

import pytest
from helpers import REPO, WORKERS, clean_env
from sshd import HIDING_HOST

BINARY = os.path.join(REPO, "dist", "launcher")
WORKER = os.path.join(WORKERS, "hosts_worker.sh")
OTHER_HOST = "127.0.0.2"

pytestmark = pytest.mark.skipif(
    not os.path.exists(BINARY), reason="dist/launcher is not built: `make binary` builds it (`make test` does)"
)


def test_the_binary_copies_itself_where_its_path_is_missing_and_reuses_the_copy(sshd, tmp_path):
    directory = os.path.join(sshd.hidden_dir, tmp_path.name)
    os.mkdir(directory)
    binary = shutil.copy(BINARY, directory)
    with open(BINARY, "rb") as built:
        cached = os.path.join(sshd.cache_dir, "launcher", hashlib.sha256(built.read()).hexdigest()[:16], "launcher")
    shutil.rmtree(os.path.dirname(cached), ignore_errors=True)  # an earlier test's copy
    try:
        for attempt in ("copies", "reuses"):
            out = tmp_path / attempt
            out.mkdir()
            result = subprocess.run([binary, f"--ssh={sshd.ssh}", f"--hosts={OTHER_HOST},{HIDING_HOST}",
                                     "--no-python", WORKER, out, "record"], env=clean_env(), cwd=REPO,
                                    capture_output=True, text=True, timeout=180)
            assert result.returncode == 0, result.stderr
            copying = [line.split("launcher] ", 1)[1] for line in result.stderr.splitlines() if "copying" in line]
            if attempt == "copies":
                assert copying == [
                    f"{HIDING_HOST}: {binary} is not there: copying it ({os.path.getsize(BINARY) / 1e6:.1f} MB) "
                    f"into the launcher cache there (launcher/{os.path.basename(os.path.dirname(cached))}/ under "
                    "$XDG_CACHE_HOME, else ~/.cache)"
                ]
                copied_at = os.stat(cached).st_mtime_ns
            else:
                assert copying == []
                assert os.stat(cached).st_mtime_ns == copied_at
            with open(cached, "rb") as copy, open(BINARY, "rb") as built:
                assert copy.read() == built.read()
            assert os.access(cached, os.X_OK)
            # Each host's workers were started by the binary there: the copy where the path is missing.
            launchers = {}
            for rank in range(2):
                host = dict(entry.split("=", 1) for entry in (out / f"{rank}.environ").read_text().split("\0")
                            if "=" in entry)["SSH_CONNECTION"].split()[2]
                launchers[host] = (out / f"{rank}.launcher").read_text().strip()
            assert launchers == {OTHER_HOST: binary, HIDING_HOST: cached}
    finally:
        shutil.rmtree(directory)
