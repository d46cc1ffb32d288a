"""The single binary, dist/launcher (`make binary`): what it carries, where it runs, how it ends.

The binary is our bootloader (packaging/bootloader.c) with the launcher's
bundle appended: it unpacks the bundle once per user and machine
(``$TMPDIR/launcher-<uid>``, else ``${XDG_CACHE_HOME:-$HOME/.cache}/launcher``)
and execs the launcher in that copy, which keeps the pid users see. Every test
runs it as an admin would on a machine without pip: with an environment
holding nothing but PATH and TMPDIR (as under ``env -i``), a PATH with bash and
sleep only (no Python, unless a test puts one there), and torch only in the
interpreter named by --python for the workers.
"""
import ctypes
import fcntl
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

import bundle
import pytest
from helpers import (
    REPO,
    WORKERS,
    children,
    descendants,
    finish,
    free_port,
    node_addr,
    read_env,
    state,
    survivors,
    wait_for,
    wait_until_ready,
)
from slurm_cluster import unshare_refused

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


@pytest.fixture(scope="module")
def built():
    """The binary's bundle: its id and its files by path."""
    return bundle.read(BINARY)


@pytest.fixture
def bare(tmp_path, built):
    """The environment of a machine without Python: ``bare.env()``; the copy is unpacked under ``bare.tmpdir``."""
    return BareMachine(tmp_path, built[0])


class BareMachine:
    def __init__(self, tmp_path, bundle_id):
        self.path = tmp_path / "bin"
        self.path.mkdir()
        for program in ("bash", "sleep"):
            (self.path / program).symlink_to(shutil.which(program))
        self.tmpdir = tmp_path / "tmp"
        self.tmpdir.mkdir()
        self.cache = self.tmpdir / f"launcher-{os.geteuid()}"
        self.copy_name = f"unpacked-{bundle_id}"
        self.out = tmp_path / "out"
        self.out.mkdir()

    def env(self, **extra):
        return {"PATH": str(self.path), "TMPDIR": str(self.tmpdir), **{k: str(v) for k, v in extra.items()}}

    def copies(self, cache=None):
        """What the cache holds: one whole copy, nothing half unpacked nor set aside, after any start."""
        return sorted(os.listdir(cache or self.cache))

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


def carried_names(built, tmp_path):
    """Every file in the bundle (the one-directory build), the module each .pyc file is, and every module in the
    PYZ archive its launcher program carries (PyInstaller's bootstrap: each module else is a file)."""
    from PyInstaller.archive.readers import CArchiveReader

    _, files = built
    names = {name.removeprefix("_internal/") for name in files}
    names |= {name.removesuffix("/__init__.pyc").removesuffix(".pyc").replace("/", ".")
              for name in names if name.endswith(".pyc")}
    program = tmp_path / "launcher"
    program.write_bytes(files["launcher"])
    names |= set(CArchiveReader(str(program)).open_embedded_archive("PYZ.pyz").toc)
    return names


def top_level(name):
    """``torch`` for ``torch.nn``, ``torch/__init__.pyc`` or ``python3.11/lib-dynload/torch.cpython-311...so``."""
    if name.endswith(".so") or ".so." in name:
        return os.path.basename(name).split(".")[0]
    return name.replace("/", ".").split(".")[0]


def test_the_bundle_holds_the_launcher_and_its_extensions_and_no_torch_nor_build_tools(built, tmp_path):
    names = carried_names(built, tmp_path)
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
    assert bare.copies() == [bare.copy_name]


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
        assert not [name for name in env if name.startswith(("_PYI_", "_LAUNCHER_"))]
    assert bare.copies() == [bare.copy_name]


def test_bash_workers_on_two_nodes_c10d(bare):
    for code, _, err in two_nodes(bare, "--no-python", BASH_WORKER, bare.out, "record"):
        assert code == 0, err
    ranks = [read_env(bare.out / f"{rank}.env") for rank in range(4)]
    assert [env["WORLD_SIZE"] for env in ranks] == ["4"] * 4
    assert len({env["MASTER_ADDR"] for env in ranks}) == 1  # the node that took rank 0
    assert {env["MASTER_ADDR"] for env in ranks} <= {"127.0.0.2", "127.0.0.3"}
    assert bare.copies() == [bare.copy_name]


def test_gloo_all_reduce_with_the_python_given(bare):
    result = bare.run("--standalone", "--nproc-per-node=2", "--python", TORCH_PYTHON, ALLREDUCE, bare.out)
    assert result.returncode == 0, result.stderr
    for rank in range(2):
        assert json.loads((bare.out / f"{rank}.json").read_text()) == {"sum": 3.0, "world_size": 2,
                                                                         "python": TORCH_PYTHON}
    assert bare.copies() == [bare.copy_name]


def test_gloo_all_reduce_on_two_nodes_c10d(bare):
    for code, _, err in two_nodes(bare, "--python", TORCH_PYTHON, ALLREDUCE, bare.out):
        assert code == 0, err
    for rank in range(4):
        assert json.loads((bare.out / f"{rank}.json").read_text())["sum"] == 10.0
    assert bare.copies() == [bare.copy_name]


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
    assert bare.copies() == [bare.copy_name]


def test_an_etcd_rendezvous_over_http(bare, etcd_server):
    result = bare.run("--rdzv-backend=etcd", f"--rdzv-endpoint={etcd_server.endpoint}", f"--rdzv-id={uuid.uuid4().hex}",
                      "--nproc-per-node=2", "--no-python", BASH_WORKER, bare.out, "record")
    assert result.returncode == 0, result.stderr
    assert [read_env(bare.out / f"{rank}.env")["RANK"] for rank in range(2)] == ["0", "1"]
    assert bare.copies() == [bare.copy_name]


def test_https_etcd_endpoints_are_refused_in_one_line(bare):
    """The binary carries no TLS (see packaging/launcher.spec)."""
    result = bare.run("--rdzv-backend=etcd", "--rdzv-endpoint=https://127.0.0.1:2379", "--rdzv-id=tls",
                      "--no-python", BASH_WORKER, bare.out, "exit", 0)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "launcher: error: https etcd endpoints need TLS, which this launcher does not carry: run `python -m launcher` "
        "from a Python installation for them"
    ]
    assert bare.copies() == [bare.copy_name]


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
    """This test process adopts the orphans of its children, so the workers of a killed launcher can be reaped
    and checked."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def test_the_binary_is_the_launcher_running_from_the_copy(bare):
    """No process stands between the command and the launcher: its pid, its program in the copy."""
    proc = bare.start("--standalone", "--nproc-per-node=2", "--no-python", BASH_WORKER, bare.out, "children", 1, "TERM")
    try:
        bare.ready(proc)
        assert os.readlink(f"/proc/{proc.pid}/exe") == str(bare.cache / bare.copy_name / "launcher")
        workers = [pid for pid in children(proc.pid) if os.readlink(f"/proc/{pid}/exe") == shutil.which("bash")]
        assert len(workers) == 2
    finally:
        proc.terminate()
        [(code, _, err)] = finish(proc)
    assert code == 128 + signal.SIGTERM, err


@pytest.mark.parametrize("whom", ["the launcher", "its process group"])
def test_kill_9_of_the_launcher_leaves_no_worker(bare, subreaper, whom):
    """Its guardian kills the workers' groups; the workers, each in a session of its own, are not in the
    launcher's group (a terminal's SIGKILL to its job)."""
    proc = bare.start("--standalone", "--nproc-per-node=2", "--no-python", BASH_WORKER, bare.out, "children", 2, "TERM",
                      start_new_session=True)  # the launcher leads its group, as a shell's job does
    bare.ready(proc)
    processes = descendants(proc.pid)  # its guardian, the workers and their sleeps
    assert len(processes) == 1 + 2 + 2 * 2
    if whom == "the launcher":
        proc.kill()
    else:
        os.killpg(proc.pid, signal.SIGKILL)
    [(code, _, _)] = finish(proc)
    assert code == -signal.SIGKILL
    wait_until_gone(processes, reap=True)  # orphaned, they and the guardian are this process's to reap
    assert bare.copies() == [bare.copy_name]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_binary_reaches_the_workers_and_sets_its_exit_code(bare, sig):
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
    assert bare.copies() == [bare.copy_name]


def test_ctrl_c_to_the_whole_group_reaches_the_workers_once(bare):
    """A terminal sends SIGINT to its foreground group: the workers, in groups of their own, get only the
    launcher's copy, so they keep their shutdown grace (a second SIGINT would cut it short with SIGKILL)."""
    proc = bare.start("--standalone", "--nproc-per-node=2", "--no-python", BASH_WORKER, bare.out, "slow-stop", "INT",
                      start_new_session=True)  # the launcher leads its group, as a shell's job does
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
    assert bare.copies() == [bare.copy_name]


def test_with_tostop_on_its_terminal_the_launcher_writes_to_it(bare):
    """The launcher is the terminal's foreground job (no process of the bootloader's sits in between)."""
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


@pytest.mark.parametrize("ending, expected", [("success", 0), ("failure", 1), ("usage error", 2)])
def test_the_copy_is_kept_whatever_the_exit(bare, ending, expected):
    args = {
        "success": ["--standalone", "--no-python", BASH_WORKER, bare.out, "exit", 0],
        "failure": ["--standalone", "--no-python", BASH_WORKER, bare.out, "exit", 1],
        "usage error": ["--nnodes=0", "--no-python", BASH_WORKER],
    }[ending]
    result = bare.run(*args)
    assert result.returncode == expected, result.stderr
    assert bare.copies() == [bare.copy_name]


# How it unpacks ---------------------------------------------------------------------------------


def test_the_first_start_unpacks_one_copy_that_later_starts_reuse(bare, built):
    first = bare.run("--version")
    assert first.returncode == 0, first.stderr
    program = bare.cache / bare.copy_name / "launcher"
    unpacked_at = os.stat(program)
    assert bare.run("--version").stdout == first.stdout
    assert (os.stat(program).st_ino, os.stat(program).st_mtime_ns) == (unpacked_at.st_ino, unpacked_at.st_mtime_ns)
    assert bare.copies() == [bare.copy_name]
    assert os.stat(bare.cache).st_mode & 0o777 == 0o700
    _, files = built
    for path, content in files.items():
        assert (bare.cache / bare.copy_name / path).read_bytes() == content, path


@pytest.mark.parametrize("variable", ["HOME", "XDG_CACHE_HOME"])
def test_where_tmpdir_cannot_serve_the_copy_goes_to_the_users_cache(bare, tmp_path, variable):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    home = tmp_path / "home"
    home.mkdir()
    result = bare.run("--version", env=bare.env(**{variable: home, "TMPDIR": not_a_directory}))
    assert result.returncode == 0, result.stderr
    cache = home / ".cache" / "launcher" if variable == "HOME" else home / "launcher"
    assert bare.copies(cache) == [bare.copy_name]


def test_a_tmpdir_mounted_noexec_is_passed_over(bare, tmp_path):
    refused = unshare_refused()
    if refused:
        pytest.skip(refused)
    home = tmp_path / "home"
    home.mkdir()
    # A mount namespace of its own, where TMPDIR is a tmpfs mounted noexec; what the binary left there is listed.
    script = (f'mount -t tmpfs -o noexec tmpfs "$TMPDIR" && {BINARY} --version && '
              f'ls -A "$TMPDIR/launcher-{os.geteuid()}"')
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                            env=bare.env(HOME=home, PATH=f"{bare.path}:/usr/bin:/bin"), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    [version] = result.stdout.splitlines()  # and nothing unpacked where it could not run
    assert version.startswith("launcher ")
    assert bare.copies(home / ".cache" / "launcher") == [bare.copy_name]


def test_concurrent_first_starts_leave_one_whole_copy(bare):
    starts = [bare.start("--version") for _ in range(6)]
    for code, out, err in finish(*starts):
        assert (code, err) == (0, ""), err
        assert out.startswith("launcher ")
    assert bare.copies() == [bare.copy_name]


def test_a_copy_that_lost_files_is_replaced(bare, built):
    assert bare.run("--version").returncode == 0
    copy = bare.cache / bare.copy_name
    _, files = built
    lost = [path for path in files if path.startswith("_internal/libpython")]
    for path in lost:
        (copy / path).unlink()  # as a cleaner of old files in /tmp would
    (copy / "_internal" / "launcher" / "cli.pyc").write_bytes(b"")  # and a damaged file
    result = bare.run("--version")
    assert result.returncode == 0, result.stderr
    for path in [*lost, "_internal/launcher/cli.pyc"]:
        assert (copy / path).read_bytes() == files[path]
    assert bare.copies() == [bare.copy_name]


def test_unpacking_removes_what_a_start_killed_while_unpacking_left(bare):
    bare.cache.mkdir(mode=0o700)
    hour_ago = time.time() - 3600
    for name in (".unpack-old", ".damaged-old", ".unpack-now"):
        (bare.cache / name / "_internal").mkdir(parents=True)
        (bare.cache / name / "_internal" / "libpython3.11.so.1.0").write_bytes(b"part")
    for name in (".unpack-old", ".damaged-old"):
        os.utime(bare.cache / name, (hour_ago, hour_ago))
    result = bare.run("--version")
    assert result.returncode == 0, result.stderr
    assert bare.copies() == [".unpack-now", bare.copy_name]  # a concurrent start may be unpacking there


def test_a_directory_others_can_write_to_is_passed_over(bare, tmp_path):
    home = tmp_path / "home"
    bare.cache.mkdir()
    os.chmod(bare.cache, 0o777)  # anyone could plant a copy there
    result = bare.run("--version", env=bare.env(HOME=home))
    assert result.returncode == 0, result.stderr
    assert bare.copies(home / ".cache" / "launcher") == [bare.copy_name]
    assert bare.copies() == []


def test_with_nowhere_to_unpack_it_fails_in_one_line(bare):
    bare.cache.mkdir()
    os.chmod(bare.cache, 0o777)
    result = bare.run("--version")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"launcher: cannot unpack and run the launcher in {bare.cache}: Operation not permitted"
    ]
    assert bare.copies() == []


def test_a_binary_whose_file_is_gone_once_started_still_runs(bare, tmp_path):
    """Its path may be replaced while it starts (a new build copied over it): the bundle is read from the
    program the kernel runs, not from the path."""
    doomed = tmp_path / "launcher"
    shutil.copy(BINARY, doomed)
    fd = os.open(doomed, os.O_RDONLY)
    try:
        doomed.unlink()
        result = subprocess.run([f"/proc/self/fd/{fd}", "--version"], env=bare.env(), pass_fds=[fd],
                                capture_output=True, text=True, timeout=60)
    finally:
        os.close(fd)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("launcher ")


@pytest.mark.parametrize("damage", ["index", "data"])
def test_a_damaged_binary_fails_in_one_line_and_leaves_nothing(bare, tmp_path, damage):
    """As a copy that went wrong would: the index has a checksum, each file's deflated data one of its own."""
    with open(BINARY, "rb") as built:
        whole = bytearray(built.read())
    [(path, offset, stored)] = [(path, offset, stored) for path, kind, offset, stored in bundle.entries(whole)
                                if path == "_internal/launcher/cli.pyc"]
    at = offset + stored // 2 if damage == "data" else whole.rindex(path.encode())
    whole[at] ^= 0x10
    damaged = tmp_path / "launcher"
    damaged.write_bytes(whole)
    damaged.chmod(0o755)
    result = subprocess.run([damaged, "--version"], env=bare.env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [{
        "index": f"launcher: {damaged}: the bundle's index is damaged",
        "data": f"launcher: {damaged}: the bundle's data is damaged ({path}): it is not the single binary as built",
    }[damage]]
    assert not bare.cache.exists() or bare.copies() == []


def test_a_truncated_binary_fails_in_one_line(bare, tmp_path):
    truncated = tmp_path / "launcher"
    with open(BINARY, "rb") as whole:
        truncated.write_bytes(whole.read()[:-100])
    truncated.chmod(0o755)
    result = subprocess.run([truncated, "--version"], env=bare.env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"launcher: {truncated} has no bundle: it is not the whole single binary (a truncated copy?)"
    ]
    assert not bare.cache.exists()
