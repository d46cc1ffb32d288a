"""Failure reports: torch's error-file format, launcher.errors.record, and the summary.

Workers run as real subprocesses with TORCHELASTIC_ERROR_FILE set and stderr
going to a log file, as the agent runs them; the Failure is built by hand from
the exit status. torch's own @record (in .venv) is the reference; the torch
workers run once per module, in parallel, because each import of torch costs
about a second and a half.
"""
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, fields

import pytest
from helpers import REPO, WORKERS, clean_env

from launcher.errors import (
    ChildFailedError,
    Failure,
    SignalException,
    format_summary,
    read_error_file,
    summary_json,
    write_summary_json,
)

TORCH_WORKER = os.path.join(WORKERS, "err_torch_record.py")
LAUNCHER_WORKER = os.path.join(WORKERS, "err_launcher_record.py")
TORCH_REPORT = os.path.join(WORKERS, "err_torch_report.py")
PLAIN_WORKER = os.path.join(WORKERS, "err_plain_stderr.py")
STALE = '{"message": "stale error file from an earlier run"}'


@dataclass
class WorkerRun:
    """A worker started the way the agent starts one."""

    process: subprocess.Popen
    error_file: str
    stderr_log: str

    def wait(self) -> "WorkerRun":
        self.process.wait(timeout=120)
        return self

    @property
    def returncode(self) -> int:
        return self.process.returncode

    @property
    def stdout(self) -> str:
        return self.process.stdout.read()

    def failure(self, rank=0, **overrides) -> Failure:
        """The Failure the agent would build from this worker's exit."""
        code = self.returncode
        values = dict(
            rank=rank,
            local_rank=rank,
            role="trainer",
            host="node0",
            pid=self.process.pid,
            exitcode=code if code >= 0 else None,
            signal=-code if code < 0 else None,
            core_dumped=False,
            ended_at=time.time(),
            error_file=self.error_file,
            stderr_tail=open(self.stderr_log).read().splitlines()[-20:],  # what the supervisor keeps
        )
        values.update(overrides)
        return Failure(**values)


def start_worker(directory, name, script, *args, stale_error_file=False) -> WorkerRun:
    os.makedirs(directory / name)
    error_file = str(directory / name / "error.json")
    stderr_log = str(directory / name / "stderr.log")
    if stale_error_file:
        with open(error_file, "w") as fp:
            fp.write(STALE)
    with open(stderr_log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, script, *map(str, args)],
            env=clean_env(TORCHELASTIC_ERROR_FILE=error_file, PYTHONPATH=REPO),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    return WorkerRun(process, error_file, stderr_log)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every worker scenario, torch's and ours side by side, run once."""
    directory = tmp_path_factory.mktemp("workers")
    ours = {
        "raise": start_worker(directory, "ours-raise", LAUNCHER_WORKER, "raise", stale_error_file=True),
        "exit 0": start_worker(directory, "ours-exit0", LAUNCHER_WORKER, "exit", 0),
        "exit 3": start_worker(directory, "ours-exit3", LAUNCHER_WORKER, "exit", 3),
        "segv": start_worker(directory, "ours-segv", LAUNCHER_WORKER, "segv"),
        "plain": start_worker(directory, "plain", PLAIN_WORKER),
    }
    for run in ours.values():
        run.wait()
    torch = {
        "raise": start_worker(directory, "torch-raise", TORCH_WORKER, "raise", stale_error_file=True),
        "exit 0": start_worker(directory, "torch-exit0", TORCH_WORKER, "exit", 0),
        "exit 3": start_worker(directory, "torch-exit3", TORCH_WORKER, "exit", 3),
        # torch's agent reading the file our record wrote
        "report ours": start_worker(directory, "torch-report", TORCH_REPORT, ours["raise"].error_file, 1),
    }
    for run in torch.values():
        run.wait()
    # Both launchers pass torch's worker error file up as the root cause of a SIGSEGV'd child.
    child_error_file = torch["raise"].error_file
    ours["child"] = start_worker(directory, "ours-child", LAUNCHER_WORKER, "child", child_error_file, -11).wait()
    torch["child"] = start_worker(directory, "torch-child", TORCH_WORKER, "child", child_error_file, -11).wait()
    return {"ours": ours, "torch": torch}


def shape(value):
    """The keys and value types of a JSON document, without the values."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    return type(value).__name__


def test_torch_record_traceback_appears_in_summary(runs):
    run = runs["torch"]["raise"]
    assert run.returncode == 1
    summary = format_summary("train.py", [run.failure()])
    assert "ValueError: rank failed: bad batch" in summary
    assert f'File "{TORCH_WORKER}", line 11, in load_batch' in summary
    assert f"error_file: {run.error_file}" in summary
    assert "exitcode  : 1 (pid: " in summary
    # a traceback from the error file makes the stderr tail unnecessary
    assert "stderr" not in summary


def raw_error_file(run):
    with open(run.error_file) as fp:
        return json.load(fp)


def test_launcher_record_writes_what_torch_record_writes(runs):
    ours, torch = runs["ours"]["raise"], runs["torch"]["raise"]
    assert ours.returncode == torch.returncode == 1
    ours_raw, torch_raw = raw_error_file(ours), raw_error_file(torch)
    assert shape(ours_raw) == shape(torch_raw)
    assert ours_raw["message"]["message"] == torch_raw["message"]["message"] == "ValueError: rank failed: bad batch"
    assert re.fullmatch(r"\d+", ours_raw["message"]["extraInfo"]["timestamp"])

    ours_record, torch_record = read_error_file(ours.error_file), read_error_file(torch.error_file)
    assert ours_record.message == torch_record.message
    assert abs(ours_record.timestamp - torch_record.timestamp) < 120
    assert ours_record.traceback.endswith("ValueError: rank failed: bad batch\n")
    summary = format_summary("train.py", [ours.failure()])
    assert f'File "{LAUNCHER_WORKER}", line 16, in load_batch' in summary
    assert "ValueError: rank failed: bad batch" in summary


def test_record_overwrites_a_stale_error_file_like_torch(runs):
    for run in (runs["ours"]["raise"], runs["torch"]["raise"]):
        assert read_error_file(run.error_file).message == "ValueError: rank failed: bad batch"


@pytest.mark.parametrize("scenario", ["exit 0", "exit 3"])
def test_record_handles_system_exit_like_torch(runs, scenario):
    ours, torch = runs["ours"][scenario], runs["torch"][scenario]
    assert ours.returncode == torch.returncode == int(scenario.split()[1])
    # sys.exit(0) returns from the decorated function; neither writes an error file
    assert ours.stdout == torch.stdout
    assert os.path.exists(ours.error_file) is os.path.exists(torch.error_file) is False


def test_record_passes_a_child_failure_up_like_torch(runs):
    ours, torch = runs["ours"]["child"], runs["torch"]["child"]
    assert ours.returncode == torch.returncode == 1
    ours_raw, torch_raw = raw_error_file(ours), raw_error_file(torch)
    assert ours_raw == torch_raw
    assert ours_raw["message"]["errorCode"] == -11
    record = read_error_file(ours.error_file)
    assert record.message == "ValueError: rank failed: bad batch"
    assert "in load_batch" in record.traceback


def test_torch_reads_the_launcher_record_error_file(runs):
    report = runs["torch"]["report ours"]
    assert report.returncode == 0
    output = report.stdout
    assert f'File "{LAUNCHER_WORKER}", line 16, in load_batch' in output
    assert "ValueError: rank failed: bad batch" in output


def test_stderr_tail_replaces_missing_traceback(runs):
    run = runs["ours"]["plain"]
    assert run.returncode == 1
    failure = run.failure()
    assert not os.path.exists(run.error_file)
    summary = format_summary("train.py", [failure])
    expected = [f"stderr line {n:02d}" for n in range(11, 31)]
    assert failure.stderr_tail == expected
    assert "  stderr    : (last 20 lines)\n" + "\n".join("    " + line for line in expected) in summary
    assert "stderr line 10" not in summary
    assert "error_file: <N/A>" in summary
    assert "traceback" not in summary


@pytest.mark.parametrize("core_dumped", [True, False])
def test_signal_death_shows_signal_and_faulthandler_stack(runs, core_dumped):
    run = runs["ours"]["segv"]
    assert run.returncode == -signal.SIGSEGV
    summary = format_summary("train.py", [run.failure(core_dumped=core_dumped)])
    assert f"exitcode  : -11 (pid: {run.process.pid})" in summary
    signal_line = "  signal    : SIGSEGV (core dumped)\n" if core_dumped else "  signal    : SIGSEGV\n"
    assert signal_line in summary
    # record enabled faulthandler, so the stderr tail has the Python stack of the crash
    assert "Fatal Python error: Segmentation fault" in summary
    assert f'File "{LAUNCHER_WORKER}", line 20 in crash' in summary


def write_json(path, data):
    with open(path, "w") as fp:
        json.dump(data, fp)
    return str(path)


def torch_error(message, timestamp):
    extra_info = {"py_callstack": f"Traceback:\n{message}\n", "timestamp": str(timestamp)}
    return {"message": {"message": message, "extraInfo": extra_info}}


def make_failure(rank, ended_at, error_file=None, **overrides):
    values = dict(
        rank=rank, local_rank=rank % 4, role="trainer", host=f"node{rank // 4}", pid=1000 + rank,
        exitcode=1, signal=None, core_dumped=False, ended_at=ended_at, error_file=error_file,
        stderr_tail=[f"rank {rank} last words"],
    )
    values.update(overrides)
    return Failure(**values)


@pytest.fixture
def cascade(tmp_path):
    """Failures given in rank order; in time order they are ranks 5, 2, 0, 7."""
    t = 1_795_000_000
    return [
        # error file's whole second 100 and exit 100.9: later than rank 2, which ended at 100.4
        make_failure(0, t + 100.9, write_json(tmp_path / "0.json", torch_error("RuntimeError: NCCL timeout", t + 100))),
        make_failure(2, t + 100.4, exitcode=None, signal=signal.SIGKILL),
        # raised at second 99, exited last after a slow teardown: still the root cause
        make_failure(5, t + 102.0, write_json(tmp_path / "5.json", torch_error("ValueError: bad batch", t + 99))),
        make_failure(7, t + 101.5, str(tmp_path / "missing.json")),
    ]


def test_root_cause_first_then_others_by_time(cascade):
    summary = format_summary("train.py", cascade)
    root, others = summary.split("Other Failures:")
    assert "Root Cause (first observed failure):\n[0]:" in root
    assert "rank      : 5 (local_rank: 1)" in root
    assert "ValueError: bad batch" in root
    assert [int(r) for r in re.findall(r"rank      : (\d+)", others)] == [2, 0, 7]
    assert re.findall(r"^\[(\d+)\]:", others, re.M) == ["1", "2", "3"]
    # the shown time is the error file's (whole seconds), like torchrun's
    assert f"time      : {datetime.datetime.fromtimestamp(1_795_000_099).isoformat(sep='_')}" in root
    assert "exitcode  : -9 (pid: 1002)\n  signal    : SIGKILL\n" in others
    assert "rank 2 last words" in others
    assert "rank 5 last words" not in summary  # its error file has the traceback
    lines = summary.split("\n")
    assert lines[0] == "=" * 60 and lines[1] == "train.py FAILED" and lines[-1] == "=" * 60


def test_single_failure_has_no_other_failures(cascade):
    summary = format_summary("train.py", cascade[:1])
    assert summary.endswith("Other Failures:\n  <NO_OTHER_FAILURES>\n" + "=" * 60)


@pytest.mark.parametrize(
    "content, problem",
    [
        (b'{"message": {"message": "ValueError', "JSONDecodeError"),
        (b"", "JSONDecodeError"),
        (b'{"message": "\xff\xfe"}', "UnicodeDecodeError"),
    ],
    ids=["truncated", "empty", "not utf-8"],
)
def test_garbled_error_file_is_reported_not_raised(tmp_path, content, problem):
    path = tmp_path / "error.json"
    path.write_bytes(content)
    record = read_error_file(str(path))
    assert record.raw is None and record.traceback is None and record.timestamp is None
    assert record.message.startswith(f"unreadable error file ({problem}: ")
    summary = format_summary("train.py", [make_failure(3, 1_795_000_000.0, str(path))])
    assert f"error_file: {path}" in summary
    assert f"traceback : unreadable error file ({problem}: " in summary
    assert "stderr    : (last 1 lines)\n    rank 3 last words" in summary


def test_missing_error_file(tmp_path):
    assert read_error_file(str(tmp_path / "absent.json")) is None
    assert read_error_file(str(tmp_path)) is None  # a directory is no error file either


@pytest.mark.parametrize(
    "data, message, traceback, timestamp",
    [
        (torch_error("ValueError: x", 1_795_000_000), "ValueError: x", "Traceback:\nValueError: x\n", 1_795_000_000.0),
        # what torch's record in a launcher passes up from its child
        ({"message": {**torch_error("ValueError: x", 5)["message"], "errorCode": -11}}, "ValueError: x",
         "Traceback:\nValueError: x\n", 5.0),
        # the plain-string form torch's reader accepts, with and without a timestamp
        ({"message": "OOM on device 0", "timestamp": 1_795_000_001}, "OOM on device 0", None, 1_795_000_001.0),
        ({"message": "OOM on device 0"}, "OOM on device 0", None, None),
        ({"message": {"message": "ValueError: x"}}, "ValueError: x", None, None),
        ({"message": {"message": "ValueError: x", "extraInfo": {"timestamp": "nan"}}}, "ValueError: x", None, None),
        ({"errorTraits": {"category": "system_terminated_error"}}, "error file has no 'message' field", None, None),
        (["not", "an", "object"], "error file has no 'message' field", None, None),
    ],
    ids=["record", "dumped", "string", "string-no-time", "no-extra", "bad-time", "no-message", "not-object"],
)
def test_error_file_shapes(tmp_path, data, message, traceback, timestamp):
    record = read_error_file(write_json(tmp_path / "error.json", data))
    assert (record.message, record.traceback, record.timestamp, record.raw) == (message, traceback, timestamp, data)


def test_summary_without_traceback_shows_message_and_stderr(tmp_path):
    path = write_json(tmp_path / "error.json", {"message": "OOM on device 0", "timestamp": 1_795_000_001})
    summary = format_summary("train.py", [make_failure(1, 1_795_000_002.0, path)])
    assert "traceback : OOM on device 0\n  stderr    : (last 1 lines)\n    rank 1 last words" in summary


def test_stderr_not_captured_or_empty():
    not_captured = format_summary("train.py", [make_failure(0, 1.0, stderr_tail=None)])
    empty = format_summary("train.py", [make_failure(0, 1.0, stderr_tail=[])])
    assert "  stderr    : <not captured>\n" in not_captured
    assert "  stderr    : <empty>\n" in empty


def test_summary_json_round_trips(tmp_path, cascade):
    path = tmp_path / "attempt_0" / "failure.json"
    path.parent.mkdir()
    write_summary_json(str(path), "train.py", cascade)
    with open(path) as fp:
        loaded = json.load(fp)
    assert loaded == summary_json("train.py", cascade)
    assert loaded["name"] == "train.py"
    entries = [loaded["root_cause"], *loaded["other_failures"]]
    names = [f.name for f in fields(Failure)]
    by_rank = {failure.rank: failure for failure in cascade}
    assert [Failure(**{name: entry[name] for name in names}) for entry in entries] == [by_rank[r] for r in (5, 2, 0, 7)]
    assert entries[0]["time"] == 1_795_000_099.0
    assert entries[0]["error"]["message"] == "ValueError: bad batch"
    assert entries[1]["signal_name"] == "SIGKILL" and entries[1]["error"] is None
    assert entries[3]["error"] is None  # its error file was never written
    assert not [name for name in os.listdir(path.parent) if name != "failure.json"]


def test_child_failed_error(cascade):
    error = ChildFailedError("train.py", cascade)
    assert str(error) == error.summary == format_summary("train.py", cascade)
    assert error.name == "train.py"
    assert [failure.rank for failure in error.failures] == [5, 2, 0, 7]
    with pytest.raises(ValueError):
        ChildFailedError("train.py", [])


def test_signal_exception():
    error = SignalException("Process 42 got signal: SIGTERM", signal.SIGTERM)
    assert error.sigval is signal.SIGTERM and str(error) == "Process 42 got signal: SIGTERM"


def test_failure_needs_exactly_one_of_exitcode_and_signal():
    with pytest.raises(ValueError):
        make_failure(0, 1.0, exitcode=None, signal=None)
    with pytest.raises(ValueError):
        make_failure(0, 1.0, exitcode=1, signal=signal.SIGTERM)
    assert make_failure(0, 1.0, exitcode=None, signal=40).signal_name == "signal 40"


def test_a_hung_worker_shows_why_it_was_ended_and_where_it_was():
    stack = 'Current thread 0x1 (most recent call first):\n  File "train.py", line 7 in all_reduce_forever'
    hung = make_failure(1, 2.0, exitcode=None, signal=signal.SIGKILL, hang="timer of scope 'step' expired",
                        stack=stack)
    summary = format_summary("train.py", [hung])
    assert "  signal    : SIGKILL\n  hang      : timer of scope 'step' expired\n" in summary
    assert (
        "  stack     : (before the launcher ended it)\n"
        "    Current thread 0x1 (most recent call first):\n"
        '      File "train.py", line 7 in all_reduce_forever\n---'
    ) in summary
    entry = summary_json("train.py", [hung])["root_cause"]
    assert (entry["hang"], entry["stack"], entry["still_running"]) == ("timer of scope 'step' expired", stack, False)


def test_a_worker_still_running_after_sigkill_has_no_exit_yet():
    stuck = make_failure(0, 1.0, exitcode=None, signal=None, still_running=True, hang="uninterruptible sleep")
    assert stuck.torchrun_exitcode is None
    summary = format_summary("train.py", [stuck])
    assert f"  exitcode  : <none: still running after SIGKILL, stuck in the kernel> (pid: {stuck.pid})\n" in summary
    assert "  signal    :" not in summary
    with pytest.raises(ValueError):
        make_failure(0, 1.0, exitcode=None, signal=signal.SIGKILL, still_running=True)


def test_launcher_errors_does_not_import_torch():
    code = "import sys, launcher.errors; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("variable", [None, ""], ids=["unset", "empty"])
def test_record_without_an_error_file_writes_nothing(tmp_path, variable):
    # torch's agent sets an empty TORCHELASTIC_ERROR_FILE for workers whose logs go nowhere
    env = clean_env(PYTHONPATH=REPO)
    if variable is not None:
        env["TORCHELASTIC_ERROR_FILE"] = variable
    result = subprocess.run(
        [sys.executable, LAUNCHER_WORKER, "raise"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.rstrip().endswith("ValueError: rank failed: bad batch")
    assert "Unable to write" not in result.stderr
    assert os.listdir(tmp_path) == []


def test_record_keeps_the_user_exception_when_the_error_file_cannot_be_written(tmp_path):
    unwritable = str(tmp_path / "no such directory" / "error.json")
    result = subprocess.run(
        [sys.executable, LAUNCHER_WORKER, "raise"],
        env=clean_env(PYTHONPATH=REPO, TORCHELASTIC_ERROR_FILE=unwritable),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "UserWarning: Unable to write error to file. FileNotFoundError" in result.stderr
    assert result.stderr.rstrip().endswith("ValueError: rank failed: bad batch")
