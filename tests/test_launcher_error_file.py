"""The launcher's own TORCHELASTIC_ERROR_FILE: what a scheduler or an outer launcher reads after a failed launch.

Each case runs the launcher and torchrun (.venv's, the reference) side by side
on the same workers, each told to write its error file; where torchrun writes
one, ours is compared with it field by field, and torch's own reader reads ours.
"""
import json
import os
import signal
import time

import pytest
from helpers import TORCHRUN, WORKERS, clean_env, finish, free_port, start_launcher, wait_for

from launcher.errors import read_error_file

TORCH_WORKER = os.path.join(WORKERS, "err_torch_record.py")  # torch's @record, raising ValueError
PLAIN_WORKER = os.path.join(WORKERS, "err_plain_stderr.py")  # no @record: 30 stderr lines, exit 1


def launch_both(tmp_path, *args, nproc=1):
    """Start ours and torchrun with ``args``, each with its own TORCHELASTIC_ERROR_FILE; {name: (Popen, path)}."""
    started = {}
    for name, program in (("ours", None), ("torchrun", TORCHRUN)):
        error_file = tmp_path / f"{name}.json"
        env = clean_env(TORCHELASTIC_ERROR_FILE=error_file, CLI_RECORD_DIR=tmp_path / name)
        (tmp_path / name).mkdir()
        extra = {"program": program} if program else {}
        started[name] = (start_launcher(f"--nproc-per-node={nproc}", *args, env=env, **extra), error_file)
    return started


def wait_all(started):
    """Every launch's (exit status, stderr, error file JSON or None)."""
    results = finish(*(proc for proc, _ in started.values()))
    return {
        name: (returncode, stderr, json.loads(path.read_text()) if path.exists() else None)
        for (name, (_, path)), (returncode, _, stderr) in zip(started.items(), results)
    }


def without_timestamp(data):
    data = json.loads(json.dumps(data))
    del data["message"]["extraInfo"]["timestamp"]
    return data


def test_the_root_causes_own_error_file_is_copied_with_its_exit_code_as_torchrun(tmp_path):
    done = wait_all(launch_both(tmp_path, "--standalone", TORCH_WORKER, "raise"))
    (ours_rc, ours_stderr, ours), (torch_rc, _, theirs) = done["ours"], done["torchrun"]
    assert ours_rc == torch_rc == 1, ours_stderr
    # the worker's record, errorCode added: identical but for the second each worker failed at
    assert without_timestamp(ours) == without_timestamp(theirs)
    assert ours["message"]["errorCode"] == 1
    assert ours["message"]["message"] == "ValueError: rank failed: bad batch"
    assert "in load_batch" in ours["message"]["extraInfo"]["py_callstack"]


@pytest.mark.parametrize(
    "worker, exitcode, signal_name",
    [
        ([PLAIN_WORKER], 1, None),
        (["--no-python", "bash", "-c", "echo about to die >&2; kill -KILL $$"], -9, "SIGKILL"),
    ],
    ids=["exit 1", "SIGKILL"],
)
def test_a_worker_without_an_error_file_gets_a_record_built_from_its_end(tmp_path, worker, exitcode, signal_name):
    before = int(time.time())
    done = wait_all(launch_both(tmp_path, "--standalone", *worker))
    (ours_rc, ours_stderr, ours), (torch_rc, _, theirs) = done["ours"], done["torchrun"]
    assert ours_rc == torch_rc == 1, ours_stderr
    assert theirs is None  # torchrun writes nothing here
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    extra = ours["message"]["extraInfo"]
    # torch's error-file format: torch's agent reads it as a failed child's file
    failure = ProcessFailure(local_rank=0, pid=extra["pid"], exitcode=exitcode, error_file=str(tmp_path / "ours.json"))
    assert failure.message == ours["message"] and before <= failure.timestamp <= time.time()
    assert set(ours) == {"message"} and set(ours["message"]) == {"message", "extraInfo", "errorCode"}
    assert ours["message"]["errorCode"] == exitcode
    how = f"signal 9 ({signal_name})" if signal_name else "exitcode 1"
    assert ours["message"]["message"] == (
        f"rank 0 (local_rank 0, pid {extra['pid']}) on {extra['host']} ended with {how} and wrote no error file"
    )
    tail = [f"stderr line {n:02d}" for n in range(11, 31)] if not signal_name else ["about to die"]
    assert extra == {
        "py_callstack": "\n".join([ours["message"]["message"], f"stderr (last {len(tail)} lines):", *tail]) + "\n",
        "timestamp": extra["timestamp"],
        "rank": 0,
        "local_rank": 0,
        "host": extra["host"],
        "pid": extra["pid"],
        "exitcode": None if signal_name else 1,
        "signal": signal_name,
        "stderr_tail": tail,
    }
    # and an outer launcher of ours shows it as the traceback
    assert read_error_file(str(tmp_path / "ours.json")).traceback == extra["py_callstack"]


def test_the_launchers_own_failure_is_recorded_as_torchrun_records_it(tmp_path):
    # two nodes wanted, one comes: the rendezvous times out, no worker to blame
    started = {}
    for name, program in (("ours", None), ("torchrun", TORCHRUN)):
        error_file = tmp_path / f"{name}.json"
        extra = {"program": program} if program else {}
        started[name] = (
            start_launcher("--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
                           "--rdzv-id=lonely", "--rdzv-conf=join_timeout=2", "--no-python", "true",
                           env=clean_env(TORCHELASTIC_ERROR_FILE=error_file), **extra),
            error_file,
        )
    done = wait_all(started)
    (ours_rc, ours_stderr, ours), (torch_rc, _, theirs) = done["ours"], done["torchrun"]
    assert ours_rc == torch_rc == 1, ours_stderr
    assert shape(ours) == shape(theirs) == {"message": {"message": "str", "extraInfo": {"py_callstack": "str",
                                                                                         "timestamp": "str"}}}
    for data in (ours, theirs):
        assert data["message"]["message"].startswith("RendezvousTimeoutError: ")
        assert data["message"]["extraInfo"]["py_callstack"].startswith("Traceback (most recent call last):")
        assert abs(int(data["message"]["extraInfo"]["timestamp"]) - time.time()) < 120
    assert ours["message"]["extraInfo"]["py_callstack"].rstrip().endswith(ours["message"]["message"])


def test_a_signalled_launcher_records_the_signal_as_torchrun(tmp_path):
    started = launch_both(tmp_path, "--standalone", f"{WORKERS}/cli_wait.py")
    for name, (proc, _) in started.items():
        wait_for(lambda name=name, proc=proc: (tmp_path / name / "ready.0").exists() or proc.poll() is not None,
                 timeout=120, what=f"{name}'s worker")
        proc.send_signal(signal.SIGTERM)
    done = wait_all(started)
    (ours_rc, ours_stderr, ours), (torch_rc, _, theirs) = done["ours"], done["torchrun"]
    assert ours_rc == 128 + signal.SIGTERM, ours_stderr
    assert torch_rc != 0
    assert shape(ours) == shape(theirs)
    for data, proc in ((ours, started["ours"][0]), (theirs, started["torchrun"][0])):
        assert data["message"]["message"] == f"SignalException: Process {proc.pid} got signal: {int(signal.SIGTERM)}"


def test_usage_errors_leave_no_error_file(tmp_path):
    error_file = tmp_path / "error.json"
    (result,) = finish(start_launcher("--nnodes=0", "train.py", env=clean_env(TORCHELASTIC_ERROR_FILE=error_file)))
    assert result[0] == 2
    assert not error_file.exists()


def shape(value):
    """The keys and value types of a JSON document, without the values."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    return type(value).__name__
