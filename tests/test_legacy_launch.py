"""``python -m launcher.launch``: torch.distributed.launch, with and without --use-env."""
import os
import subprocess
import sys

import pytest
from helpers import REPO, WORKERS, clean_env, cli_records, free_port

from launcher import launch

pytestmark = pytest.mark.usefixtures("isolated_environment")


@pytest.mark.parametrize("spelling", ["--use-env", "--use_env"])
def test_use_env_spellings(spelling):
    assert launch.parse_args(["train.py"]).use_env is False
    assert launch.parse_args([spelling, "train.py"]).use_env is True


def test_use_env_from_pet(monkeypatch):
    monkeypatch.setenv("PET_USE_ENV", "1")
    assert launch.parse_args(["train.py"]).use_env is True


def test_torchrun_options_are_all_there():
    args = launch.parse_args(["--nproc_per_node=2", "--master_addr=head", "--master_port=29555", "--node_rank=0",
                              "--nnodes=1", "train.py", "--lr", "1"])
    assert (args.nproc_per_node, args.master_addr, args.master_port) == ("2", "head", 29555)


def test_without_use_env_workers_get_local_rank_before_their_arguments():
    _, entrypoint, args = launch.prepare_launch(launch.parse_args(["train.py", "--lr", "1"]))
    assert (entrypoint, args) == (sys.executable, ["-u", "train.py", "--local-rank=${local_rank}", "--lr", "1"])


def test_with_use_env_workers_get_only_their_arguments():
    _, _, args = launch.prepare_launch(launch.parse_args(["--use-env", "train.py", "--lr", "1"]))
    assert args == ["-u", "train.py", "--lr", "1"]


def test_no_python_needs_use_env():
    with pytest.raises(ValueError, match="'--no-python' flag, you must also set the '--use-env' flag"):
        launch.main(["--no-python", "train.sh"])
    _, entrypoint, args = launch.prepare_launch(launch.parse_args(["--no-python", "--use-env", "train.sh", "a"]))
    assert (entrypoint, args) == ("train.sh", ["a"])


def test_bad_input_is_one_line_and_exit_2():
    result = subprocess.run([sys.executable, "-m", "launcher.launch", "--nnodes=0", "train.py"], cwd=REPO,
                            env=clean_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "python -m launcher.launch: error: argument --nnodes: expected N or MIN:MAX with 1 <= MIN <= MAX, got '0' "
        "(see python -m launcher.launch --help)"
    ]


def _run_legacy(tmp_path, *flags):
    command = [sys.executable, "-m", "launcher.launch", "--nnodes=1", "--nproc-per-node=4", "--monitor-interval=1",
               "--start-method=spawn", "--master-addr=localhost", f"--master-port={free_port()}", "--node-rank=0",
               *flags, os.path.join(WORKERS, "cli_record.py"), "--lr", "1"]
    result = subprocess.run(command, cwd=REPO, env=clean_env(CLI_RECORD_DIR=tmp_path), capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return cli_records(tmp_path, 4)


def test_launch_user_script_with_use_env(tmp_path):
    # torch's test_launcher.py::test_launch_user_script.
    for rank, record in _run_legacy(tmp_path, "--use-env").items():
        assert record["argv"][1:] == ["--lr", "1"]
        assert record["env"]["LOCAL_RANK"] == str(rank)


def test_launch_user_script_without_use_env(tmp_path):
    for rank, record in _run_legacy(tmp_path).items():
        assert record["argv"][1:] == [f"--local-rank={rank}", "--lr", "1"]
