"""The single binary, dist/launcher (`make binary`): what it carries, where it runs, how it ends.

The binary is PyInstaller's onefile bootloader, the pid users see: it unpacks
the bundle into a ``_MEI*`` directory under $TMPDIR and runs the launcher
there in a child process. Every test runs it as an admin would on a machine
without pip: with an environment holding nothing but PATH and TMPDIR (as under
``env -i``), a PATH with bash and sleep only (no Python, unless a test puts
one there), and torch only in the interpreter named by --python for the
workers.
"""
import ctypes
import fcntl
import io
import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import termios
import time
import uuid
import zipfile

import pytest
from helpers import (
    REPO,
    WORKERS,
    children,
    descendants,
    finish,
    free_port,
    my_zombies,
    node_addr,
    read_env,
    state,
    survivors,
    wait_for,
    wait_until_ready,
)

BINARY = os.path.join(REPO, "dist", "launcher")
BASH_WORKER = os.path.join(WORKERS, "bin_worker.sh")
ALLREDUCE = os.path.join(WORKERS, "bin_allreduce.py")
RECORD = os.path.join(WORKERS, "cli_record.py")
INTERPRETER = os.path.join(WORKERS, "bin_interpreter.py")
TORCH_PYTHON = sys.executable  # the virtualenv's interpreter: it has torch
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>

pytestmark = pytest.mark.skipif(
    not os.path.exists(BINARY), reason="dist/launcher is not built: `make binary` builds it (`make test` does)"
)


@pytest.fixture
def bare(tmp_path):
    """The environment of a machine without Python: ``bare.env()``; unpacking goes to ``bare.unpack_root``."""
    return BareMachine(tmp_path)


class BareMachine:
    def __init__(self, tmp_path):
        self.path = tmp_path / "bin"
        self.path.mkdir()
        for program in ("bash", "sleep"):
            (self.path / program).symlink_to(shutil.which(program))
        self.unpack_root = tmp_path / "tmp"
        self.unpack_root.mkdir()
        self.out = tmp_path / "out"
        self.out.mkdir()

    def env(self, **extra):
        return {"PATH": str(self.path), "TMPDIR": str(self.unpack_root), **{k: str(v) for k, v in extra.items()}}

    def unpacked(self):
        """The unpack directories still there."""
        return [name for name in os.listdir(self.unpack_root) if name.startswith("_MEI")]

    def run(self, *args, env=None, timeout=180):
        return subprocess.run([BINARY, *map(str, args)], env=env or self.env(), cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)

    def start(self, *args, env=None, **popen):
        return subprocess.Popen([BINARY, *map(str, args)], env=env or self.env(), cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)

    def ready(self, proc, nproc=2):
        wait_until_ready(self.out, proc, nproc)


def two_nodes(bare, *args):
    """A two-node c10d job: two binaries on 127.0.0.2 and 127.0.0.3, two workers each, the store on the first."""
    endpoint = f"{node_addr(0)}:{free_port()}"
    run_id = uuid.uuid4().hex
    return finish(*[
        bare.start("--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                   f"--rdzv-id={run_id}", f"--local-addr={node_addr(node)}", *args)
        for node in range(2)
    ])


# What it carries --------------------------------------------------------------------------------


def carried_names():
    """Every file in the binary's archive, every module in its PYZ and every file in its base_library.zip."""
    from PyInstaller.archive.readers import CArchiveReader

    archive = CArchiveReader(BINARY)
    names = set(archive.toc)
    names |= set(archive.open_embedded_archive("PYZ.pyz").toc)
    names |= set(zipfile.ZipFile(io.BytesIO(archive.extract("base_library.zip"))).namelist())
    return names


def top_level(name):
    """``torch`` for ``torch.nn``, ``torch/__init__.pyc`` or ``python3.11/lib-dynload/torch.cpython-311...so``."""
    if name.endswith(".so") or ".so." in name:
        return os.path.basename(name).split(".")[0]
    return name.replace("/", ".").split(".")[0]


def test_the_bundle_holds_the_launcher_and_its_extensions_and_no_torch_nor_build_tools():
    names = carried_names()
    for extension in ("store", "supervisor"):
        assert any(name.startswith(f"launcher/_native/{extension}.") and name.endswith(".so") for name in names)
    assert {"launcher.cli", "launcher.agent", "launcher.launch", "launcher.rendezvous.c10d",
            "launcher.rendezvous.static", "launcher.rendezvous.etcd", "launcher.devices"} <= names
    tops = {top_level(name) for name in names}
    assert not tops & {"torch", "numpy", "pytest", "_pytest", "hypothesis", "Cython", "setuptools", "pkg_resources",
                       "_distutils_hack", "distutils", "pip", "PyInstaller"}
    assert not tops & {"ssl", "_ssl", "_hashlib", "libssl", "libcrypto"}  # no TLS (see packaging/launcher.spec)


def test_version_and_help_work_in_a_bare_environment(bare):
    version = bare.run("--version")
    assert version.returncode == 0, version.stderr
    expected = subprocess.run([TORCH_PYTHON, "-m", "launcher", "--version"], capture_output=True, text=True, cwd=REPO)
    assert version.stdout == expected.stdout
    help_text = bare.run("--help")
    assert help_text.returncode == 0
    assert "--legacy-launch" in help_text.stdout and "--python PATH" in help_text.stdout
    assert bare.unpacked() == []


# Where it runs ----------------------------------------------------------------------------------


def test_bash_workers_run_with_no_python_on_path(bare):
    result = bare.run("--standalone", "--nproc-per-node=2", "--no-python", BASH_WORKER, bare.out, "record",
                      env=bare.env(LD_LIBRARY_PATH="/opt/site/lib"))
    assert result.returncode == 0, result.stderr
    for rank in range(2):
        env = read_env(bare.out / f"{rank}.env")
        assert (env["RANK"], env["WORLD_SIZE"], env["PATH"]) == (str(rank), "2", str(bare.path))
        assert (bare.out / f"{rank}.python").read_text() == "none\n"
        # The workers get the environment the binary was given, not the bootloader's additions.
        assert env["LD_LIBRARY_PATH"] == "/opt/site/lib"
        assert not [name for name in env if name.startswith("_PYI_")]
    assert bare.unpacked() == []


def test_bash_workers_on_two_nodes_c10d(bare):
    for code, _, err in two_nodes(bare, "--no-python", BASH_WORKER, bare.out, "record"):
        assert code == 0, err
    ranks = [read_env(bare.out / f"{rank}.env") for rank in range(4)]
    assert [env["WORLD_SIZE"] for env in ranks] == ["4"] * 4
    assert len({env["MASTER_ADDR"] for env in ranks}) == 1  # the node that took rank 0
    assert {env["MASTER_ADDR"] for env in ranks} <= {"127.0.0.2", "127.0.0.3"}
    assert bare.unpacked() == []


def test_gloo_all_reduce_with_the_python_given(bare):
    result = bare.run("--standalone", "--nproc-per-node=2", "--python", TORCH_PYTHON, ALLREDUCE, bare.out)
    assert result.returncode == 0, result.stderr
    for rank in range(2):
        assert json.loads((bare.out / f"{rank}.json").read_text()) == {"sum": 3.0, "world_size": 2,
                                                                         "python": TORCH_PYTHON}
    assert bare.unpacked() == []


def test_gloo_all_reduce_on_two_nodes_c10d(bare):
    for code, _, err in two_nodes(bare, "--python", TORCH_PYTHON, ALLREDUCE, bare.out):
        assert code == 0, err
    for rank in range(4):
        assert json.loads((bare.out / f"{rank}.json").read_text())["sum"] == 10.0
    assert bare.unpacked() == []


@pytest.mark.parametrize("given", ["nothing", "PYTHON_EXEC"])
def test_the_worker_interpreter_is_python_exec_else_python3_on_path(bare, given):
    (bare.path / "python3").symlink_to(TORCH_PYTHON)
    extra = {"PYTHON_EXEC": TORCH_PYTHON} if given == "PYTHON_EXEC" else {}
    result = bare.run("--standalone", INTERPRETER, bare.out, env=bare.env(**extra))
    assert result.returncode == 0, result.stderr
    expected = TORCH_PYTHON if given == "PYTHON_EXEC" else str(bare.path / "python3")
    assert (bare.out / "0.python").read_text() == expected


def test_a_python_script_without_python_on_path_is_refused_in_one_line(bare):
    result = bare.run("--standalone", ALLREDUCE, bare.out)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "launcher: error: no Python for the workers: python3 and python are not on PATH; give --python PATH "
        "(or --no-python to run a program directly) (see launcher --help)"
    ]
    assert bare.unpacked() == []


def test_an_etcd_rendezvous_over_http(bare, etcd_server):
    result = bare.run("--rdzv-backend=etcd", f"--rdzv-endpoint={etcd_server.endpoint}", f"--rdzv-id={uuid.uuid4().hex}",
                      "--nproc-per-node=2", "--no-python", BASH_WORKER, bare.out, "record")
    assert result.returncode == 0, result.stderr
    assert [read_env(bare.out / f"{rank}.env")["RANK"] for rank in range(2)] == ["0", "1"]
    assert bare.unpacked() == []


def test_https_etcd_endpoints_are_refused_in_one_line(bare):
    """The binary carries no TLS (see packaging/launcher.spec)."""
    result = bare.run("--rdzv-backend=etcd", "--rdzv-endpoint=https://127.0.0.1:2379", "--rdzv-id=tls",
                      "--no-python", BASH_WORKER, bare.out, "exit", 0)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "launcher: error: https etcd endpoints need TLS, which this launcher does not carry: run `python -m launcher` "
        "from a Python installation for them"
    ]
    assert bare.unpacked() == []


def test_legacy_launch_passes_local_rank_unless_use_env(bare):
    for options, extra in (([], ["--local-rank=0"]), (["--use-env"], [])):
        result = bare.run("--legacy-launch", "--standalone", "--nproc-per-node=1", *options, "--python", TORCH_PYTHON,
                          RECORD, "a", env=bare.env(CLI_RECORD_DIR=bare.out))
        assert result.returncode == 0, result.stderr
        assert json.loads((bare.out / "0.json").read_text())["argv"] == [RECORD, *extra, "a"]
    refused = bare.run("--legacy-launch", "--no-python", BASH_WORKER)
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        "launcher --legacy-launch: error: When using the '--no-python' flag, you must also set the '--use-env' "
        "flag. (see launcher --legacy-launch --help)"
    ]


# How it ends ------------------------------------------------------------------------------------


def wait_until_gone(processes, reap=False, timeout=30):
    """Wait for every process to be gone, reaping those that are this process's children when ``reap``."""

    def gone():
        for pid in processes:
            if reap and state(pid) == "Z":
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:  # another's zombie: its parent reaps it
                    pass
        return all(state(pid) is None for pid in processes)

    try:
        wait_for(gone, timeout=timeout, what="every process to be gone")
    except AssertionError:
        raise AssertionError(f"left after {timeout} s: {survivors(processes)}") from None


@pytest.fixture
def subreaper():
    """This test process adopts the orphans of its children, so a launcher that outlives its bootloader can be
    reaped and checked."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def test_kill_9_of_the_bootloader_stops_the_workers_as_sigterm_and_leaves_nothing(bare, subreaper):
    proc = bare.start("--standalone", "--nproc-per-node=2", "--no-python", BASH_WORKER, bare.out, "children", 2, "TERM")
    processes = []
    try:
        bare.ready(proc)
        [launcher] = children(proc.pid)
        processes = descendants(proc.pid)  # the launcher, its guardian, the workers and their sleeps
        assert len(processes) == 1 + 1 + 2 + 2 * 2
        proc.kill()
        killed_at = time.monotonic()
        proc.wait()
        # The launcher, now this process's child, exits once its workers are gone.
        wait_for(lambda: state(launcher) == "Z", timeout=30, what="the launcher to exit")
        _, status = os.waitpid(launcher, 0)
        assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGTERM
        wait_until_gone(processes)  # reaped by the launcher
        assert time.monotonic() - killed_at < 15  # SIGTERM did it, not a 30 s shutdown timeout
        for rank in range(2):
            assert (bare.out / f"{rank}.signals").read_text() == "SIGTERM\n"
        assert my_zombies() == []
        assert bare.unpacked() == []  # removed by the launcher, its bootloader gone
    finally:
        for pid in processes:
            if state(pid) not in (None, "Z"):
                os.kill(pid, signal.SIGKILL)
        [(_, _, err)] = finish(proc)
    assert "Traceback" not in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_bootloader_reaches_the_launcher_and_sets_its_exit_code(bare, sig):
    proc = bare.start("--standalone", "--nproc-per-node=2", "--no-python", BASH_WORKER, bare.out, "children", 1,
                      sig.name.removeprefix("SIG"))
    bare.ready(proc)
    processes = descendants(proc.pid)
    proc.send_signal(sig)
    [(code, _, err)] = finish(proc)
    assert code == 128 + sig, err
    for rank in range(2):
        assert (bare.out / f"{rank}.signals").read_text() == f"{sig.name}\n"
    assert survivors(processes) == {}
    assert bare.unpacked() == []


def test_ctrl_c_to_the_whole_group_reaches_the_launcher_once(bare):
    """A terminal sends SIGINT to its foreground group: the launcher gets only the bootloader's copy, so
    the workers keep their shutdown grace (a second SIGINT would cut it short with SIGKILL)."""
    proc = bare.start("--standalone", "--nproc-per-node=2", "--no-python", BASH_WORKER, bare.out, "slow-stop", "INT",
                      start_new_session=True)  # the bootloader leads its group, as a shell's job does
    bare.ready(proc)
    os.killpg(proc.pid, signal.SIGINT)
    wait_for(lambda: all((bare.out / f"{r}.signals").exists() for r in range(2)) or proc.poll() is not None,
             what="the workers to get SIGINT")
    (bare.out / "release").touch()
    [(code, _, err)] = finish(proc)
    assert code == 128 + signal.SIGINT, err
    for rank in range(2):
        assert (bare.out / f"{rank}.signals").read_text() == "SIGINT\n"
        assert (bare.out / f"{rank}.done").exists()  # not killed while stopping
    assert bare.unpacked() == []


def test_with_tostop_on_its_terminal_the_launcher_is_not_stopped_by_writing_to_it(bare):
    """Out of the terminal's foreground group (the bootloader's), the launcher still writes to the terminal."""
    controller, terminal = pty.openpty()
    modes = termios.tcgetattr(terminal)
    modes[3] |= termios.TOSTOP
    termios.tcsetattr(terminal, termios.TCSANOW, modes)
    proc = subprocess.Popen(
        [BINARY, "--standalone", "--nproc-per-node=2", "--no-python", BASH_WORKER, str(bare.out), "exit", "0"],
        env=bare.env(), cwd=REPO, stdin=terminal, stdout=terminal, stderr=terminal,
        start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),  # its controlling terminal
    )
    os.close(terminal)
    try:
        code = proc.wait(timeout=60)
        shown = os.read(controller, 65536).decode()
    finally:
        if proc.poll() is None:
            for pid in descendants(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
        os.close(controller)
    assert code == 0
    assert "Setting OMP_NUM_THREADS" in shown  # the launcher's warning reached the terminal


def test_kill_9_of_the_whole_group_leaves_the_launcher_to_stop_and_clean_up(bare, subreaper):
    proc = bare.start("--standalone", "--nproc-per-node=2", "--no-python", BASH_WORKER, bare.out, "children", 1, "TERM",
                      start_new_session=True)
    processes = []
    try:
        bare.ready(proc)
        [launcher] = children(proc.pid)
        processes = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        wait_for(lambda: state(launcher) == "Z", timeout=30, what="the launcher to exit")
        _, status = os.waitpid(launcher, 0)
        assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGTERM
        wait_until_gone(processes)  # reaped by the launcher
        assert bare.unpacked() == []
    finally:
        for pid in processes:
            if state(pid) not in (None, "Z"):
                os.kill(pid, signal.SIGKILL)
        finish(proc)


def test_kill_9_of_the_launcher_leaves_no_worker_and_the_bootloader_cleans_up(bare, subreaper):
    proc = bare.start("--standalone", "--nproc-per-node=2", "--no-python", BASH_WORKER, bare.out, "children", 2, "TERM")
    bare.ready(proc)
    processes = descendants(proc.pid)
    [launcher] = children(proc.pid)
    os.kill(launcher, signal.SIGKILL)
    [(code, _, _)] = finish(proc)
    assert code == -signal.SIGKILL  # the bootloader ends as its child did
    # The guardian kills the workers' groups; orphaned, they and it are this process's to reap.
    wait_until_gone(processes, reap=True)
    assert bare.unpacked() == []


@pytest.mark.parametrize("ending, expected", [("success", 0), ("failure", 1), ("usage error", 2)])
def test_the_unpack_directory_is_removed_at_every_ordinary_exit(bare, ending, expected):
    args = {
        "success": ["--standalone", "--no-python", BASH_WORKER, bare.out, "exit", 0],
        "failure": ["--standalone", "--no-python", BASH_WORKER, bare.out, "exit", 1],
        "usage error": ["--nnodes=0", "--no-python", BASH_WORKER],
    }[ending]
    result = bare.run(*args)
    assert result.returncode == expected, result.stderr
    assert bare.unpacked() == []
