"""End-to-end launches through the command line with tiny workers (tests/workers/cli_*)."""
import os
import signal
import sys
import uuid

import pytest
from helpers import BUS_IDS, UUIDS, WORKERS, clean_env, cli_records, free_port, run_launcher, start_launcher, wait_for

from launcher import cli

pytestmark = pytest.mark.usefixtures("isolated_environment")

RECORD_PY = os.path.join(WORKERS, "cli_record.py")
RECORD_SH = os.path.join(WORKERS, "cli_record.sh")


def test_script_arguments_reach_the_script_unchanged(tmp_path):
    script_args = ["--nproc-per-node", "4", "-m", "--standalone", "--help", "--", "--local-rank=9", "a b"]
    result = run_launcher("--nproc-per-node=2", RECORD_PY, *script_args, env=clean_env(CLI_RECORD_DIR=tmp_path))
    assert result.returncode == 0, result.stderr
    for rank, record in cli_records(tmp_path, 2).items():
        assert record["argv"] == [RECORD_PY, *script_args]
        env = record["env"]
        assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == (str(rank), str(rank), "2")
        assert env["OMP_NUM_THREADS"] == "1"
    assert "Setting OMP_NUM_THREADS environment variable for each process to be 1" in result.stderr


def test_module(tmp_path):
    result = run_launcher("--nproc-per-node=2", "-m", "cli_record", "--lr", "1",
                          env=clean_env(CLI_RECORD_DIR=tmp_path, PYTHONPATH=WORKERS, OMP_NUM_THREADS=3))
    assert result.returncode == 0, result.stderr
    for record in cli_records(tmp_path, 2).values():
        assert (record["argv"], record["name"]) == ([RECORD_PY, "--lr", "1"], "__main__")
        assert record["env"]["OMP_NUM_THREADS"] == "3"  # the user's value is kept


def test_run_path(tmp_path):
    # torch's test_launch_run_path.
    result = run_launcher("--run-path", "--nnodes=1", "--nproc-per-node=4", "--monitor-interval=1",
                          "--start-method=spawn", RECORD_PY, "--touch", env=clean_env(CLI_RECORD_DIR=tmp_path))
    assert result.returncode == 0, result.stderr
    for record in cli_records(tmp_path, 4).values():
        assert (record["argv"], record["name"]) == ([RECORD_PY, "--touch"], "__main__")


def test_launch_with_env_vars(tmp_path):
    # torch's test_launch_with_env_vars: PET_* alone configure a --no-python launch.
    environment = clean_env(PET_NNODES=1, PET_NPROC_PER_NODE=4, PET_RDZV_ID=uuid.uuid4().int, PET_MONITOR_INTERVAL=1,
                            PET_START_METHOD="spawn", PET_NO_PYTHON=1, PET_MODULE=1, CLI_RECORD_DIR=tmp_path)
    result = run_launcher(RECORD_SH, "x", env=environment)
    assert result.returncode == 2
    assert "'--no-python' flag and the '--module' flag" in result.stderr
    environment["PET_MODULE"] = "0"
    result = run_launcher(RECORD_SH, "x", env=environment)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == [f"{rank}.args" for rank in range(4)]
    assert (tmp_path / "0.args").read_text() == "x\n"


def test_launch_user_script_default_nproc(tmp_path):
    result = run_launcher("--nnodes=1", f"--rdzv-id={uuid.uuid4().int}", "--no-python", RECORD_SH,
                          env=clean_env(CLI_RECORD_DIR=tmp_path))
    assert result.returncode == 0, result.stderr
    assert os.listdir(tmp_path) == ["0.args"]


@pytest.mark.parametrize("nproc", ["gpu", "auto"])
def test_nproc_counts_three_fake_gpus(tmp_path, fake_nvml_library, nproc):
    # torch's test_nproc_gpu_launch_configurations, with a fake NVML instead of mocks.
    environment = clean_env(LAUNCHER_NVML_LIBRARY=fake_nvml_library, FAKE_NVML_UUIDS=",".join(UUIDS),
                            FAKE_NVML_BUS_IDS=",".join(BUS_IDS), CLI_RECORD_DIR=tmp_path)
    environment.pop("CUDA_VISIBLE_DEVICES", None)
    result = run_launcher(f"--nproc-per-node={nproc}", "--no-python", RECORD_SH, env=environment)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == [f"{rank}.args" for rank in range(3)]


def test_launch_standalone(tmp_path):
    result = run_launcher("--nnodes=1", "--nproc-per-node=4", "--standalone", "--monitor-interval=1",
                          "--start-method=spawn", RECORD_PY, env=clean_env(CLI_RECORD_DIR=tmp_path))
    assert result.returncode == 0, result.stderr
    run_ids = {record["env"]["TORCHELASTIC_RUN_ID"] for record in cli_records(tmp_path, 4).values()}
    (run_id,) = run_ids
    assert str(uuid.UUID(run_id)) == run_id


def test_python_flag_chooses_the_worker_interpreter(tmp_path):
    result = run_launcher("--python", os.path.join(WORKERS, "cli_python.sh"), RECORD_PY,
                          env=clean_env(CLI_RECORD_DIR=tmp_path, CLI_REAL_PYTHON=sys.executable))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "interpreter.0").exists() and (tmp_path / "0.json").exists()


def test_failed_workers_exit_1_with_the_summary():
    result = run_launcher("--nproc-per-node=2", "--no-python", "bash", "-c", "echo dying >&2; exit 3")
    assert result.returncode == 1
    assert "bash FAILED" in result.stderr and "Root Cause (first observed failure):" in result.stderr
    assert "Traceback" not in result.stderr


def test_signal_ends_the_launch_with_128_plus_the_signal(tmp_path):
    launcher = start_launcher("--nproc-per-node=2", os.path.join(WORKERS, "cli_wait.py"),
                              env=clean_env(CLI_RECORD_DIR=tmp_path))
    wait_for(lambda: len(list(tmp_path.glob("ready.*"))) == 2 or launcher.poll() is not None, timeout=120,
             what="both workers to be ready")
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr


def test_is_torchelastic_launched(tmp_path):
    # torch's seed, in-process like torch's: workers see torch.distributed.is_torchelastic_launched().
    out_file = tmp_path / "out"
    cli.main(["--run-path", "--nnodes=1", "--nproc-per-node=1", "--monitor-interval=1",
              os.path.join(WORKERS, "cli_torchelastic.py"), f"--out-file={out_file}"])
    assert out_file.read_text() == "True"


def test_rendezvous_failure_is_one_line_and_exit_1():
    result = run_launcher("--nnodes=2", "--node-rank=0", f"--master-port={free_port()}", "--rdzv-conf=timeout=1",
                          "--no-python", "true")
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("launcher: error: static rendezvous") and "timed out" in line
