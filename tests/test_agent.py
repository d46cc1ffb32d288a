"""The agent loop: restarts, restart counting, the Python launch API (its events: test_events.py)."""
import os
import signal
import sys
import uuid
from unittest import mock

import pytest
from helpers import WORKERS, read_env, run_launcher

from launcher.agent import RunResult
from launcher.api import LaunchConfig, _get_entrypoint_name, elastic_launch, launch_agent
from launcher.errors import ChildFailedError, SignalException


def test_restarted_attempt_starts_from_a_clean_store(tmp_path):
    result = run_launcher(
        "--standalone", "--nproc-per-node=2", "--max-restarts=1", f"{WORKERS}/restart_gloo.py", tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr
    for rank in range(2):
        assert (tmp_path / f"attempt1_{rank}").read_text() == "sum=3 stale=[]\n"


def test_max_restarts_are_counted_and_exhausted(tmp_path):
    result = run_launcher(
        "--standalone", "--nproc-per-node=2", "--max-restarts=2", "--no-python", f"{WORKERS}/always_fail.sh", tmp_path
    )
    assert result.returncode == 1
    # the first rank to fail tears the other down, so count attempts, not ranks
    attempts = {name.split("_attempt")[1] for name in os.listdir(tmp_path)}
    assert attempts == {"0", "1", "2"}
    assert "exitcode  : 7" in result.stderr


def config(**overrides) -> LaunchConfig:
    settings = dict(min_nodes=1, max_nodes=1, nproc_per_node=2, rdzv_backend="c10d", rdzv_endpoint="localhost:0",
                    max_restarts=0, monitor_interval=0.1)
    settings.update(overrides)
    return LaunchConfig(**settings)


def rank_plus_ten(offset=0):
    return 10 + int(os.environ["RANK"]) + offset


def raise_on_rank_one():
    if os.environ["RANK"] == "1":
        raise RuntimeError("test error from rank 1")
    return "fine"


def test_elastic_launch_of_a_function_returns_values_by_rank():
    assert elastic_launch(config(nproc_per_node=4), rank_plus_ten)(5) == {0: 15, 1: 16, 2: 17, 3: 18}


def test_elastic_launch_of_a_failing_function_raises_with_its_traceback():
    with pytest.raises(ChildFailedError) as failure:
        elastic_launch(config(), raise_on_rank_one)()
    assert failure.value.failures[0].rank == 1
    assert "RuntimeError: test error from rank 1" in str(failure.value)


def test_elastic_launch_of_a_script_and_of_a_bash_program(tmp_path):
    (tmp_path / "py").mkdir()
    (tmp_path / "sh").mkdir()
    elastic_launch(config(), sys.executable)("-u", f"{WORKERS}/env_dump.py", str(tmp_path / "py"))
    elastic_launch(config(), f"{WORKERS}/env_dump.sh")(str(tmp_path / "sh"))
    assert sorted(os.listdir(tmp_path / "py")) == ["0.json", "1.json"]
    assert sorted(os.listdir(tmp_path / "sh")) == ["0.env", "1.env"]


def test_a_config_without_a_run_id_runs_under_a_random_one_in_torchs_form(tmp_path):
    elastic_launch(config(), f"{WORKERS}/env_dump.sh")(str(tmp_path))
    run_ids = {read_env(tmp_path / f"{rank}.env")["TORCHELASTIC_RUN_ID"] for rank in range(2)}
    (run_id,) = run_ids
    assert uuid.UUID(int=int(run_id)).version == 4  # str(uuid.uuid4().int), as torch's elastic_launch makes it


def test_entrypoint_names():
    assert _get_entrypoint_name(rank_plus_ten, []) == "rank_plus_ten"
    assert _get_entrypoint_name(sys.executable, []) == ""
    assert _get_entrypoint_name(sys.executable, ["-u"]) == ""
    assert _get_entrypoint_name(sys.executable, ["-u", "test_script.py"]) == "test_script.py"
    assert _get_entrypoint_name(None, []) == ""
    assert _get_entrypoint_name("/opt/py/bin/python3", ["-u", "-c", "import runpy", "train.py", "--x"]) == "train.py"
    assert _get_entrypoint_name("python3", ["-u", "-m", "pkg.train"]) == "pkg.train"
    assert _get_entrypoint_name("./run.sh", ["a"]) == "./run.sh"


@pytest.mark.parametrize(
    "raised, shutdown_calls, leave_calls",
    [
        (RuntimeError("any other exception"), 1, 0),  # an agent error closes the rendezvous
        (SignalException("test", signal.SIGTERM), 0, 1),  # a signal only leaves it: other nodes may carry on
        (SignalException("test", signal.SIGINT), 0, 1),
    ],
)
def test_rendezvous_shutdown_on_agent_error_but_not_on_signal(raised, shutdown_calls, leave_calls):
    handler = mock.MagicMock()
    with mock.patch("launcher.rendezvous.create_handler", return_value=handler), \
            mock.patch("launcher.agent.Agent.run", side_effect=raised):
        with pytest.raises(type(raised)):
            launch_agent(config(nproc_per_node=1), rank_plus_ten, [])
    assert handler.shutdown.call_count == shutdown_calls
    assert handler.leave.call_count == leave_calls


def test_rendezvous_shutdown_after_success():
    handler = mock.MagicMock()
    with mock.patch("launcher.rendezvous.create_handler", return_value=handler), \
            mock.patch("launcher.agent.Agent.run", return_value=RunResult()):
        launch_agent(config(nproc_per_node=1), rank_plus_ten, [])
    handler.shutdown.assert_called_once()
