"""The single-node path end to end: python -m launcher --standalone with real workers."""
import glob
import json
import os
import subprocess

import pytest
from helpers import LAUNCHER, REPO, WORKERS, clean_env, launcher_imports, read_env, run_launcher, start_launcher

TORCHRUN_ENV = [
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME",
    "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCHELASTIC_ERROR_FILE", "OMP_NUM_THREADS",
]


def test_launcher_never_imports_torch():
    _, imported = launcher_imports("--help")
    assert "launcher" in imported
    assert not [name for name in imported if name.split(".")[0] == "torch"]


def test_a_standalone_launch_imports_no_module_its_start_does_not_use():
    # Each is milliseconds of every start: typing (annotations name its types only for type checkers),
    # ipaddress (an endpoint that is "localhost" needs no address parsing), the IDNA codec (an ASCII host
    # name is looked up as bytes), uuid and the platform module it imports (a run id is made without it).
    _, imported = launcher_imports("--standalone", "--nproc-per-node=2", "--no-python", "true")
    assert "launcher.agent" in imported  # the launch ran
    unused = ("typing", "ipaddress", "encodings.idna", "uuid", "platform")
    assert [name for name in imported if name in unused] == []


def test_native_parts_are_compiled_extensions():
    import launcher._native.store as store
    import launcher._native.supervisor as supervisor

    for module in (store, supervisor):
        assert module.__file__.endswith(".so"), module.__file__


@pytest.mark.parametrize("nproc", [2, 4])
def test_python_script_workers_get_the_torchrun_environment(tmp_path, nproc):
    result = run_launcher("--standalone", f"--nproc-per-node={nproc}", f"{WORKERS}/env_dump.py", tmp_path)
    assert result.returncode == 0, result.stderr
    dumps = [json.load(open(tmp_path / f"{rank}.json")) for rank in range(nproc)]
    for rank, dump in enumerate(dumps):
        env = dump["env"]
        missing = [name for name in TORCHRUN_ENV if name not in env]
        assert not missing, missing
        assert env["RANK"] == env["LOCAL_RANK"] == env["ROLE_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == env["ROLE_WORLD_SIZE"] == str(nproc)
        assert (env["GROUP_RANK"], env["GROUP_WORLD_SIZE"]) == ("0", "1")
        assert env["ROLE_NAME"] == "default"
        assert env["TORCHELASTIC_USE_AGENT_STORE"] == "True"
        assert env["TORCHELASTIC_RESTART_COUNT"] == "0"
        assert env["TORCHELASTIC_MAX_RESTARTS"] == "0"
        assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        assert env["OMP_NUM_THREADS"] == "1"
        assert env["TORCHELASTIC_ERROR_FILE"].endswith(f"/attempt_0/{rank}/error.json")
        assert dump["argv"] == [str(tmp_path)]
    # one job: one run id, one store every worker can reach
    assert len({d["env"]["TORCHELASTIC_RUN_ID"] for d in dumps}) == 1
    assert len({(d["env"]["MASTER_ADDR"], d["env"]["MASTER_PORT"]) for d in dumps}) == 1
    assert len({d["pid"] for d in dumps}) == nproc


@pytest.mark.parametrize("nproc", [2, 4])
def test_bash_script_with_no_python(tmp_path, nproc):
    result = run_launcher(
        "--standalone", f"--nproc-per-node={nproc}", "--no-python", f"{WORKERS}/env_dump.sh", tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == sorted(f"{rank}.env" for rank in range(nproc))
    for rank in range(nproc):
        env = read_env(tmp_path / f"{rank}.env")
        assert env["RANK"] == str(rank) and env["WORLD_SIZE"] == str(nproc)
        assert f"bash worker {rank} of {nproc}" in result.stdout


def test_a_failing_worker_fails_the_launch_with_a_summary(tmp_path):
    result = run_launcher(
        "--standalone", "--nproc-per-node=2", f"{WORKERS}/env_dump.py", tmp_path, "--fail-rank=1", "--exit-code=3"
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "FAILED" in result.stderr
    assert "rank      : 1 (local_rank: 1)" in result.stderr
    assert "exitcode  : 3" in result.stderr
    assert "rank 1 failing on purpose" in result.stderr  # the stderr tail stands in for a missing error file


def test_example_training_job(tmp_path):
    result = run_launcher("--standalone", "--nproc-per-node=2", "examples/train.py", "--steps", "50", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "trained 50 steps on 2 ranks (gloo)" in result.stdout
    assert "final loss:" in result.stdout
    assert "parameters identical on all ranks: True" in result.stdout


def test_no_worker_outlives_the_launch(tmp_path):
    result = run_launcher("--standalone", "--nproc-per-node=2", f"{WORKERS}/env_dump.py", tmp_path)
    assert result.returncode == 0, result.stderr
    for rank in range(2):
        pid = json.load(open(tmp_path / f"{rank}.json"))["pid"]
        assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} still exists"


def test_console_lines_of_different_ranks_never_interleave():
    lines = 3000
    result = run_launcher("--standalone", "--nproc-per-node=4", f"{WORKERS}/chatter.py", lines)
    assert result.returncode == 0, result.stderr
    seen = {rank: [] for rank in range(4)}
    for line in result.stdout.splitlines():
        name, body, index = line.split(" ")
        assert name.startswith("rank") and body == "x" * 100, line
        seen[int(name[4:])].append(int(index))
    assert seen == {rank: list(range(lines)) for rank in range(4)}


def test_a_line_paused_midway_is_shown_before_its_newline(tmp_path):
    go = tmp_path / "go"
    launch = start_launcher("--standalone", "--nproc-per-node=1", f"{WORKERS}/progress.py", go, text=False)
    try:
        shown = b""
        while b"progress 50%" not in shown:  # arrives while the worker waits for us, without its newline
            chunk = os.read(launch.stdout.fileno(), 4096)
            assert chunk, "the launcher closed its stdout before showing the partial line"
            shown += chunk
        assert b"done" not in shown
        go.touch()
        rest, _ = launch.communicate(timeout=60)
    finally:
        launch.kill()
    assert (shown + rest).decode() == "progress 50% done\n"
    assert launch.returncode == 0


def test_a_bad_value_found_during_the_launch_is_one_line_and_exit_2(tmp_path):
    env = clean_env(CUDA_VISIBLE_DEVICES="0")
    result = run_launcher(
        "--standalone", "--nproc-per-node=2", "--virtual-local-rank", f"{WORKERS}/env_dump.py", tmp_path, env=env
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "launcher: error: local rank 1 has no device in CUDA_VISIBLE_DEVICES=0 (see launcher --help)"
    )
    assert "Traceback" not in result.stderr


def test_what_the_system_refuses_during_the_launch_is_one_line_and_exit_1(tmp_path):
    (tmp_path / "file").write_text("")
    cannot_execute = run_launcher("--standalone", "--nproc-per-node=2", "--no-python", tmp_path / "no-such-program")
    no_log_dir = run_launcher(f"--log-dir={tmp_path / 'file' / 'logs'}", f"{WORKERS}/env_dump.py", tmp_path)
    assert cannot_execute.returncode == no_log_dir.returncode == 1
    assert cannot_execute.stderr.strip().splitlines()[-1] == (
        f"launcher: error: [Errno 2] cannot execute: No such file or directory: '{tmp_path / 'no-such-program'}'"
    )
    assert no_log_dir.stderr.strip().splitlines()[-1] == (
        f"launcher: error: [Errno 20] cannot make the log directory: Not a directory: '{tmp_path / 'file' / 'logs'}'"
    )
    assert "Traceback" not in cannot_execute.stderr + no_log_dir.stderr


@pytest.mark.parametrize("visible, expected", [(None, ["0", "1"]), ("5,7", ["5", "7"])])
def test_virtual_local_rank_gives_each_worker_device_0_of_its_own(tmp_path, visible, expected):
    env = clean_env() if visible is None else clean_env(CUDA_VISIBLE_DEVICES=visible)
    result = run_launcher(
        "--standalone", "--nproc-per-node=2", "--virtual-local-rank", f"{WORKERS}/env_dump.py", tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr
    envs = [json.load(open(tmp_path / f"{rank}.json"))["env"] for rank in range(2)]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "0"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == expected
    assert [e["RANK"] for e in envs] == ["0", "1"]


def test_redirect_tee_prefix_template_and_log_layout(tmp_path):
    """torch's test_capture_logs_using_default_logs_specs, plus where the files go."""
    env = clean_env(TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE="[rank${rank}]: ")
    result = run_launcher(
        "--standalone", "--nproc-per-node=4", "--redirects=3", "--tee=3", f"--log-dir={tmp_path}",
        "--duplicate-stdout-filters=apple", "--no-python", f"{WORKERS}/chatter.sh", env=env,
    )
    assert result.returncode == 0, result.stderr
    for rank in range(4):
        assert f"[rank{rank}]: creating rank {rank}\n" in result.stdout
        assert f"[rank{rank}]: complaint from rank {rank}\n" in result.stderr
    [attempt] = glob.glob(str(tmp_path / "*" / "attempt_0"))
    for rank in range(4):
        assert open(f"{attempt}/{rank}/stdout.log").read() == f"creating rank {rank}\napple from rank {rank}\n"
        assert open(f"{attempt}/{rank}/stderr.log").read() == f"complaint from rank {rank}\n"
    filtered = open(f"{attempt}/filtered_stdout.log").read().splitlines()
    assert sorted(filtered) == [f"[rank{rank}]: apple from rank {rank}" for rank in range(4)]


def test_local_ranks_filter_shows_only_those_ranks_and_still_writes_every_file(tmp_path):
    result = run_launcher(
        "--standalone", "--nproc-per-node=3", "--tee=1", "--local-ranks-filter=0,2", f"--log-dir={tmp_path}",
        "--no-python", f"{WORKERS}/chatter.sh",
    )
    assert result.returncode == 0, result.stderr
    assert sorted(line for line in result.stdout.splitlines() if "creating" in line) == [
        "[default0]:creating rank 0", "[default2]:creating rank 2"]
    assert "complaint from rank 1" not in result.stderr
    [attempt] = glob.glob(str(tmp_path / "*" / "attempt_0"))
    assert open(f"{attempt}/1/stdout.log").read().startswith("creating rank 1\n")


def test_torch_record_traceback_is_the_root_cause_in_the_summary():
    result = run_launcher("--standalone", "--nproc-per-node=2", f"{WORKERS}/err_torch_record.py", "raise")
    assert result.returncode == 1
    summary = result.stderr[result.stderr.index("Root Cause"):]
    assert "error_file: " in summary and "/attempt_0/" in summary
    assert "traceback : Traceback (most recent call last):" in summary
    assert "in load_batch" in summary and "ValueError: rank failed: bad batch" in summary
    assert "launcher/agent.py" not in result.stderr  # no launcher traceback


@pytest.mark.parametrize("closed", ["stdout", "stderr", "stdin stdout stderr"])
def test_a_launcher_started_with_a_standard_descriptor_closed_gives_it_dev_null(tmp_path, closed):
    """``launcher ... >&-``: else its first descriptor opened (a signalfd, a socket) would take that number."""
    redirects = " ".join({"stdin": "<&-", "stdout": ">&-", "stderr": "2>&-"}[name] for name in closed.split())
    result = subprocess.run(
        ["bash", "-c", f'exec "$@" {redirects}', "bash", *LAUNCHER, "--standalone", "--nproc-per-node=1",
         os.path.join(WORKERS, "parent_fds.py"), str(tmp_path)],
        env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    links = json.loads((tmp_path / "0.json").read_text())  # what the launcher's 0, 1 and 2 were, seen by its worker
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        if name in closed.split():
            assert links[str(fd)] == "/dev/null", links
