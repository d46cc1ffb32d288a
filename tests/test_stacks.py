"""Where a hung rank was: the stack the launcher captures before it kills a worker that did not end by itself.

Here the worker ignores SIGTERM and is SIGKILLed after --shutdown-timeout
(the timer and the D-state limit, which end workers through the same
capture, have their own test files). Python workers are armed through the
launcher's sitecustomize; a non-Python worker, or a Python that ignores the
environment, is reported from /proc.
"""
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time

import pytest
from helpers import REPO, WORKERS, clean_env, dead, finish, run_launcher, start_launcher, wait_for

from launcher.stacks import StackDumps, capture_stacks

IGNORE_TERM = os.path.join(WORKERS, "hang_ignore_term.py")
SLEEPER = os.path.join(WORKERS, "hang_sleeper.py")
IGNORE_TERM_SH = os.path.join(WORKERS, "hang_ignore_term.sh")
ENV_DUMP = os.path.join(WORKERS, "env_dump.py")
BINARY = os.path.join(REPO, "dist", "launcher")


def summary_of(stderr):
    return stderr[stderr.index("FAILED"):]


def other_failure(summary):
    return summary[summary.index("Other Failures:"):]


def test_a_worker_that_ignores_sigterm_is_killed_with_its_stack_in_every_report(tmp_path):
    logs = tmp_path / "logs"
    result = run_launcher("--nproc-per-node=2", "--shutdown-timeout=1", f"--log-dir={logs}", "--tee=2",
                          IGNORE_TERM, tmp_path)
    assert result.returncode == 1, result.stderr
    summary = summary_of(result.stderr)
    assert "exitcode  : 3" in summary[: summary.index("Other Failures:")]  # the root cause comes first
    other = other_failure(summary)
    assert "rank      : 1 (local_rank: 1)" in other
    assert "signal    : SIGKILL" in other
    assert "hang      : still running 1 s after SIGTERM (the shutdown timeout): SIGKILL" in other
    assert f'File "{IGNORE_TERM}", line 13 in ignore_sigterm_and_wait' in other
    attempt = next(logs.glob("*/attempt_0"))
    entry = json.loads((attempt / "failure.json").read_text())["other_failures"][0]
    assert entry["rank"] == 1 and entry["hang"].startswith("still running 1 s after SIGTERM")
    assert "in ignore_sigterm_and_wait" in entry["stack"]
    stderr_log = (attempt / "1" / "stderr.log").read_text()
    assert stderr_log.startswith("[launcher] rank 1: still running 1 s after SIGTERM")
    assert "in ignore_sigterm_and_wait" in stderr_log
    assert "[default1]:[launcher] rank 1: still running" in result.stderr  # teed: the console got it, prefixed


@pytest.mark.parametrize("program", ["bash", "python -I"])
def test_a_worker_without_a_python_stack_is_reported_from_proc(tmp_path, program):
    argv = [IGNORE_TERM_SH] if program == "bash" else [sys.executable, "-I", IGNORE_TERM]
    result = run_launcher("--nproc-per-node=2", "--shutdown-timeout=1", "--no-python", *argv, tmp_path)
    assert result.returncode == 1, result.stderr
    other = other_failure(summary_of(result.stderr))
    assert "no Python stack: the worker did not arm the launcher's stack dump" in other
    assert "state: S (sleeping), wchan: " in other
    wchan = other.split("wchan: ", 1)[1].split("\n", 1)[0]
    assert wchan not in ("", "-")
    if os.geteuid() == 0:
        assert "kernel stack:\n" in other and "[<0>]" in other
    else:
        assert "kernel stack: <needs root>" in other


def test_the_workers_own_sitecustomize_runs_and_their_environment_is_theirs(tmp_path):
    user_site = tmp_path / "site"
    user_site.mkdir()
    (user_site / "sitecustomize.py").write_text(
        "import os\nopen(os.path.join(os.environ['MARK_DIR'], os.environ['RANK'] + '.site'), 'w').close()\n"
    )
    (tmp_path / "theirs").mkdir()
    (tmp_path / "none").mkdir()
    with_theirs = run_launcher("--nproc-per-node=2", ENV_DUMP, tmp_path / "theirs",
                               env=clean_env(PYTHONPATH=user_site, MARK_DIR=tmp_path))
    without = run_launcher("--nproc-per-node=1", ENV_DUMP, tmp_path / "none", env=clean_env())
    assert with_theirs.returncode == without.returncode == 0, with_theirs.stderr + without.stderr
    for rank in range(2):
        assert (tmp_path / f"{rank}.site").exists()
        seen = json.loads((tmp_path / "theirs" / f"{rank}.json").read_text())["env"]
        assert seen["PYTHONPATH"] == str(user_site)
        assert not [name for name in seen if name.startswith("LAUNCHER_")]
    assert "PYTHONPATH" not in json.loads((tmp_path / "none" / "0.json").read_text())["env"]


@pytest.mark.skipif(not os.path.exists(BINARY), reason="dist/launcher is not built: `make binary` builds it")
def test_the_single_binary_captures_the_stack_too(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)  # the workers' interpreter, the only Python on PATH
    (tmp_path / "tmp").mkdir()
    result = subprocess.run([BINARY, "--nproc-per-node=2", "--shutdown-timeout=1", IGNORE_TERM, str(tmp_path)],
                            env={"PATH": str(bin_dir), "TMPDIR": str(tmp_path / "tmp")},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert f'File "{IGNORE_TERM}", line 13 in ignore_sigterm_and_wait' in other_failure(summary_of(result.stderr))


@pytest.fixture
def armed_python(tmp_path):
    """Start a Python armed as a worker is; returns (process, dumps) once it waits in ``wait_here`` (its
    sitecustomize, which arms it, ran before)."""
    dumps = StackDumps()
    env = clean_env()
    dumps.arm(env)
    started = []

    def start():
        waiting = tmp_path / f"waiting.{len(started)}"
        code = ("import sys, time\n"
                "def wait_here():\n    open(sys.argv[1], 'w').close()\n    time.sleep(60)\n"
                "wait_here()\n")
        process = subprocess.Popen([sys.executable, "-c", code, waiting], env=env)
        started.append(process)
        wait_for(lambda: waiting.exists() or process.poll() is not None, what="the armed Python to wait")
        assert os.path.exists(os.path.join(dumps.directory, f"{process.pid}.stack"))
        return process, dumps

    yield start
    for process in started:
        process.kill()
        process.wait()
    dumps.close()


def test_capture_of_an_armed_python_gives_its_threads(armed_python):
    process, dumps = armed_python()
    stack = capture_stacks([process.pid], dumps.directory)[process.pid]
    assert 'File "<string>", line 4 in wait_here' in stack
    assert "\nstate: " in stack and ", wchan: " in stack  # S, or R if it was still returning from the handler
    assert process.poll() is None  # asking for a stack does not end it


def test_the_dump_file_appears_only_once_the_handler_is_in_place(tmp_path):
    # Its existence is what "armed" means to capture_stacks and to the fixture above: a file that appeared
    # before faulthandler.register would have a worker reported as "did not arm" (or killed by the signal).
    dumps = StackDumps()
    env = clean_env()
    dumps.arm(env)
    code = (
        "import faulthandler, os, sys\n"
        "path = os.path.join(sys.argv[1], '%d.stack' % os.getpid())\n"
        "real = faulthandler.register\n"
        "def register(*args, **kwargs):\n"
        "    print('before:', os.path.exists(path))\n"
        "    real(*args, **kwargs)\n"
        "faulthandler.register = register\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import sitecustomize\n"
        "print('after:', os.path.exists(path))\n"
    )
    try:  # -S: the site module would import the sitecustomize before the spy is in place
        result = subprocess.run([sys.executable, "-S", "-c", code, dumps.directory], env=env,
                                capture_output=True, text=True, timeout=60)
    finally:
        dumps.close()
    assert result.stdout.split("\n")[:2] == ["before: False", "after: True"], result.stdout + result.stderr


def test_a_worker_on_the_launchers_python_loads_the_sitecustomize_compiled(tmp_path):
    # Written with its bytecode, so that a worker where bytecode is not written (PYTHONDONTWRITEBYTECODE,
    # as in many container images) does not compile it at every start; a stale or foreign .pyc would be
    # ignored by the worker's import system, so "loaded from the .pyc" is what shows it valid.
    dumps = StackDumps()
    env = clean_env(PYTHONDONTWRITEBYTECODE=1)
    dumps.arm(env)
    try:
        result = subprocess.run([sys.executable, "-v", "-c", "pass"], env=env, capture_output=True, text=True,
                                timeout=60)
        cached = os.path.join(dumps.directory, "__pycache__", f"sitecustomize.{sys.implementation.cache_tag}.pyc")
        assert f"# code object from '{cached}'" in result.stderr, result.stderr[-2000:]
        assert os.listdir(os.path.dirname(cached)) == [os.path.basename(cached)]  # none written by the worker
    finally:
        dumps.close()


def test_capture_is_bounded_and_says_why_a_stack_is_missing(armed_python):
    process, dumps = armed_python()
    os.kill(process.pid, signal.SIGSTOP)  # its handler cannot run
    gone = 2 ** 22 + 1  # above pid_max's default: no such process
    started = time.monotonic()
    stacks = capture_stacks([process.pid, gone], dumps.directory, budget=0.3)
    assert time.monotonic() - started < 0.3 + 2.0  # generous: the machine may be loaded
    assert stacks[process.pid].startswith("no complete Python stack within 0.3 s")
    assert "state: T (stopped)" in stacks[process.pid]
    assert stacks[gone] == "no Python stack: the worker had ended\nstate: ended"


def test_stack_dumps_removes_its_directory():
    dumps = StackDumps()
    assert sorted(os.listdir(dumps.directory)) == [".owner", "__pycache__", "sitecustomize.py"]
    dumps.close()
    assert not os.path.exists(dumps.directory)


def test_the_directory_of_a_killed_launcher_goes_with_the_next_launcher(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = clean_env(TMPDIR=tmp, TORCHELASTIC_ENABLE_FILE_TIMER=1)  # the timer's FIFO goes with the directory
    users = tmp / f"launcher_stacks-{os.getuid()}"  # what a launcher looks through: this user's directories only

    def sleeping_launcher(name):
        (tmp_path / name).mkdir()
        launcher = start_launcher("--nproc-per-node=1", SLEEPER, tmp_path / name, env=env)
        wait_for(lambda: (tmp_path / name / "0.pid").exists() or launcher.poll() is not None, what="the worker")
        assert launcher.poll() is None, launcher.communicate()
        return launcher, int((tmp_path / name / "0.pid").read_text())

    killed, its_worker = sleeping_launcher("killed")
    assert oct(users.stat().st_mode & 0o777) == "0o700"
    (abandoned,) = users.glob("launcher_stacks_*")
    (fifo,) = abandoned.glob("watchdog_timer_*")
    killed.kill()
    finish(killed)
    wait_for(lambda: dead(its_worker), what="the guardian to end the killed launcher's worker")
    assert abandoned.exists() and stat.S_ISFIFO(fifo.stat().st_mode)
    running, _ = sleeping_launcher("running")
    (in_use,) = set(users.glob("launcher_stacks_*")) - {abandoned}
    being_made = users / "launcher_stacks_made_now"  # no owner file yet: not taken
    being_made.mkdir()
    (tmp_path / "next").mkdir()
    assert run_launcher("--nproc-per-node=1", ENV_DUMP, tmp_path / "next", env=env).returncode == 0
    assert sorted(users.glob("launcher_stacks_*")) == sorted([in_use, being_made])
    running.terminate()
    finish(running)
    assert sorted(users.glob("launcher_stacks_*")) == [being_made]
    assert not list(tmp.glob("launcher_stacks_*")) and not list(tmp.glob("watchdog_timer_*"))  # none outside it


def test_a_users_directory_that_is_not_theirs_alone_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    users = tmp_path / f"launcher_stacks-{os.getuid()}"
    users.mkdir(mode=0o777)
    users.chmod(0o777)  # as another user could have left it for us: anyone may write there
    dumps = StackDumps()
    try:
        assert os.path.dirname(dumps.directory) == str(tmp_path)
    finally:
        dumps.close()
