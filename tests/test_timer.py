"""torch's file timer (TORCHELASTIC_ENABLE_FILE_TIMER): served by the agent, unchanged for the worker.

The launches run real torch workers (gloo on CPU, two ranks) with torch's own
``FileTimerClient`` and ``expires``; the FIFO's own rules (lines, releases,
scopes, floods) are checked on the server in this process, with a real FIFO.
"""
import fcntl
import json
import os
import select
import signal
import stat
import struct
import termios

import pytest
from helpers import WORKERS, clean_env, run_launcher

from launcher.timer import BAD_LINES_LOGGED_PER_TURN, LINE_MAX, READ_PER_TURN, FileTimerServer, Timer

TIMER_WORKER = os.path.join(WORKERS, "hang_timer.py")
ENV_DUMP = os.path.join(WORKERS, "env_dump.py")


def launch_timer_job(mode, directory, *options, timer_file=None):
    env = clean_env(TORCHELASTIC_ENABLE_FILE_TIMER=1, LOGLEVEL="INFO")
    if timer_file is not None:
        env["TORCHELASTIC_TIMER_FILE"] = str(timer_file)
    return run_launcher("--standalone", "--nproc-per-node=2", "--shutdown-timeout=10", *options,
                        TIMER_WORKER, mode, directory, env=env, timeout=300)


def test_an_expired_timer_ends_the_hung_rank_with_its_stack_in_the_report(tmp_path):
    fifo = tmp_path / "timer.fifo"
    result = launch_timer_job("expire", tmp_path, timer_file=fifo)
    assert result.returncode == 1, result.stderr
    summary = result.stderr[result.stderr.index("FAILED"):]
    assert "rank      : 0 (local_rank: 0)" in summary
    assert "signal    : SIGKILL" in summary
    assert "hang      : timer of scope 'allreduce' expired " in summary
    assert " in hang_in_allreduce" in summary  # the function it hung in, from its stack
    assert " in all_reduce" in summary
    assert "<NO_OTHER_FAILURES>" in summary  # rank 1 was only torn down
    assert not fifo.exists()  # the launcher made it, and removed it


def test_the_hung_rank_is_an_event_of_its_own(tmp_path):
    result = launch_timer_job("expire", tmp_path, "--event-log-handler=console")
    assert result.returncode == 1, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith('{"name": ')]
    (hung,) = [event for event in events if event["metadata"]["state"] == "HUNG"]
    assert (hung["name"], hung["source"], hung["metadata"]["global_rank"]) == (
        "torchelastic.worker.status.HUNG", "WORKER", 0
    )
    raw_error = json.loads(hung["metadata"]["raw_error"])
    assert raw_error["hang"].startswith("timer of scope 'allreduce' expired ")
    assert " in hang_in_allreduce" in raw_error["stack"]
    assert [event["metadata"]["state"] for event in events][-1] == "FAILED"  # the agent, after its workers


def test_the_failure_json_and_stderr_log_hold_the_stack(tmp_path):
    result = launch_timer_job("expire", tmp_path, f"--log-dir={tmp_path / 'logs'}", "--redirects=2")
    assert result.returncode == 1, result.stderr
    attempt = next((tmp_path / "logs").glob("*/attempt_0"))
    root = json.loads((attempt / "failure.json").read_text())["root_cause"]
    assert root["rank"] == 0 and root["signal_name"] == "SIGKILL"
    assert root["hang"].startswith("timer of scope 'allreduce' expired ")
    assert " in hang_in_allreduce" in root["stack"]
    assert " in hang_in_allreduce" in (attempt / "0" / "stderr.log").read_text()


def test_a_released_timer_ends_nobody(tmp_path):
    result = launch_timer_job("release", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "timer of scope" not in result.stderr


def test_an_expired_timer_then_a_clean_attempt_succeeds(tmp_path):
    result = launch_timer_job("restart", tmp_path, "--max-restarts=1")
    assert result.returncode == 0, result.stderr
    assert "timer of scope 'allreduce' expired" in result.stderr
    assert "1/1 restarts left, restarting" in result.stderr
    assert sorted(p.name for p in tmp_path.glob("attempt1_*")) == ["attempt1_0", "attempt1_1"]


def test_a_timer_without_a_signal_ends_nobody(tmp_path):
    result = launch_timer_job("signal0", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "timer of scope 'no signal' expired" in result.stderr
    assert "its signal is 0: not ending it" in result.stderr


def test_bad_lines_and_strangers_are_logged_and_serving_goes_on(tmp_path):
    result = launch_timer_job("garbage", tmp_path)
    assert result.returncode == 1, result.stderr  # not killed by the stranger's request: the launcher is the stranger
    stranger = (tmp_path / "stranger").read_text()
    assert "timer request ignored, not JSON: b'this is not json'" in result.stderr
    assert "timer request ignored, no string 'scope_id'" in result.stderr
    assert f"timer request ignored, from pid {stranger}, which is not one of this node's workers" in result.stderr
    # The line cut short by its writer is dropped alone, or with the flood's first line when the flood's writer
    # opened the FIFO before the agent read the cut line's end: a FIFO does not tell writers apart.
    assert "more timer requests ignored" in result.stderr  # the flood, in a few lines
    assert result.stderr.count("junk line of the flood") < 100
    summary = result.stderr[result.stderr.index("FAILED"):]
    assert "hang      : timer of scope 'after-garbage' expired " in summary
    assert " in hang_in_allreduce" in summary


def test_workers_get_the_timer_file_only_when_the_timer_is_enabled(tmp_path):
    (tmp_path / "on").mkdir()
    (tmp_path / "off").mkdir()
    enabled = run_launcher("--nproc-per-node=1", ENV_DUMP, tmp_path / "on",
                           env=clean_env(TORCHELASTIC_ENABLE_FILE_TIMER=1))
    disabled = run_launcher("--nproc-per-node=1", ENV_DUMP, tmp_path / "off",
                            env=clean_env(TORCHELASTIC_ENABLE_FILE_TIMER="true"))  # torch: only "1" enables it
    assert enabled.returncode == disabled.returncode == 0, enabled.stderr + disabled.stderr
    path = json.loads((tmp_path / "on" / "0.json").read_text())["env"]["TORCHELASTIC_TIMER_FILE"]
    # torch's name, in the launcher's own directory (which the next launcher removes should this one be killed)
    assert os.path.basename(path).startswith("watchdog_timer_")
    assert os.path.basename(os.path.dirname(path)).startswith("launcher_stacks_")
    assert not os.path.exists(path)
    assert "TORCHELASTIC_TIMER_FILE" not in json.loads((tmp_path / "off" / "0.json").read_text())["env"]


def test_a_fifo_the_launcher_did_not_make_is_used_and_kept(tmp_path):
    fifo = tmp_path / "theirs.fifo"
    os.mkfifo(fifo)
    result = run_launcher("--nproc-per-node=1", ENV_DUMP, tmp_path,
                          env=clean_env(TORCHELASTIC_ENABLE_FILE_TIMER=1, TORCHELASTIC_TIMER_FILE=fifo))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "0.json").read_text())["env"]["TORCHELASTIC_TIMER_FILE"] == str(fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_timer_file_that_is_not_a_fifo_is_one_line(tmp_path):
    regular = tmp_path / "regular"
    regular.write_text("keep me")
    result = run_launcher("--nproc-per-node=1", ENV_DUMP, tmp_path,
                          env=clean_env(TORCHELASTIC_ENABLE_FILE_TIMER=1, TORCHELASTIC_TIMER_FILE=regular))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"launcher: error: TORCHELASTIC_TIMER_FILE: {regular} exists and is not a FIFO (see launcher --help)"
    )
    assert "Traceback" not in result.stderr
    assert regular.read_text() == "keep me"


# The server's rules, in this process --------------------------------------------------------------------


@pytest.fixture
def server(tmp_path):
    served = FileTimerServer(str(tmp_path / "timer.fifo"))
    yield served
    served.close()


def request(pid, scope, expiration_time, signum=signal.SIGKILL):
    """A line as torch 2.13's FileTimerRequest.to_json writes it."""
    return json.dumps({"version": 1, "pid": pid, "scope_id": scope, "expiration_time": expiration_time,
                       "signal": signum}).encode() + b"\n"


def write(server, data):
    """What one client does: open without blocking, write, close."""
    fd = os.open(server.path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_acquire_release_and_several_scopes(server):
    write(server, request(10, "a", 100.0) + request(10, "b", 50.0) + request(11, "a", 70.0, 0))
    server.serve({10, 11})
    assert server.next_deadline() == 50.0
    write(server, request(10, "b", -1, 0))  # release
    server.serve({10, 11})
    assert server.next_deadline() == 70.0
    write(server, request(10, "a", 60.0))  # a scope set again moves its deadline
    server.serve({10, 11})
    assert server.expired(65.0) == [Timer(10, "a", 60.0, 9)]
    assert server.expired(80.0) == [Timer(11, "a", 70.0, 0)]
    assert server.next_deadline() is None


def test_timers_of_workers_that_are_gone_are_dropped(server):
    write(server, request(10, "a", 100.0) + request(11, "a", 100.0))
    server.serve({10, 11})
    server.serve({11})
    assert server.expired(200.0) == [Timer(11, "a", 100.0, 9)]


@pytest.mark.parametrize("line, problem", [
    (b"[1, 2]\n", "not a JSON object"),
    (b'{"pid": "10", "scope_id": "a", "expiration_time": 1, "signal": 9}\n', "no positive integer 'pid'"),
    (b'{"pid": true, "scope_id": "a", "expiration_time": 1, "signal": 9}\n', "no positive integer 'pid'"),
    (b'{"pid": 10, "scope_id": 3, "expiration_time": 1, "signal": 9}\n', "no string 'scope_id'"),
    (b'{"pid": 10, "scope_id": "a", "expiration_time": NaN, "signal": 9}\n', "no finite number 'expiration_time'"),
    (b'{"pid": 10, "scope_id": "a", "expiration_time": "1", "signal": 9}\n', "no finite number 'expiration_time'"),
    (b'{"pid": 10, "scope_id": "a", "expiration_time": 1, "signal": 65}\n', "no integer 'signal' below 65"),
    (b"\xff\xfe\n", "not JSON"),
])
def test_a_malformed_line_is_one_log_line(server, caplog, line, problem):
    write(server, line + request(10, "ok", 5.0))
    server.serve({10})
    assert [r.getMessage() for r in caplog.records] == [f"timer request ignored, {problem}: {line[:-1]!r}"]
    assert server.expired(10.0) == [Timer(10, "ok", 5.0, 9)]  # the next line was served


def test_a_partial_line_waits_for_its_end_and_is_dropped_when_its_writer_closes(server, caplog):
    fd = os.open(server.path, os.O_WRONLY | os.O_NONBLOCK)
    line = request(10, "a", 5.0)
    os.write(fd, line[:20])
    server.serve({10})
    os.write(fd, line[20:] + line[:20])
    server.serve({10})
    assert server.next_deadline() == 5.0
    os.close(fd)
    server.serve({10})
    assert [r.getMessage() for r in caplog.records] == [f"timer request ignored, its writer closed mid-line: "
                                                        f"{line[:20]!r}"]
    write(server, request(10, "b", 3.0))  # the next writer starts afresh
    server.serve({10})
    assert server.next_deadline() == 3.0


def test_a_line_longer_than_any_request_is_dropped_to_its_end(server, caplog):
    fd = os.open(server.path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        sent = 0
        while sent <= LINE_MAX:  # more than the FIFO holds: the server reads between writes, as the loop would
            sent += os.write(fd, b"x" * 4096)
            server.serve({10})
        os.write(fd, b"tail of the long line\n" + request(10, "a", 5.0))
        server.serve({10})
    finally:
        os.close(fd)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith(f"timer request ignored, a line of over {LINE_MAX} bytes")
    assert server.expired(10.0) == [Timer(10, "a", 5.0, 9)]


def queued(fd):
    """Bytes waiting in a pipe."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def test_a_flood_is_read_a_bounded_amount_per_turn_and_logged_in_a_few_lines(server, caplog):
    fd = os.open(server.path, os.O_WRONLY | os.O_NONBLOCK)
    turns = 0
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 4 * READ_PER_TURN)
        flood = b"junk\n" * (4 * READ_PER_TURN // 5)
        assert os.write(fd, flood) == len(flood)
        server.serve({10})
        turns += 1
        assert queued(server.fileno()) == len(flood) - READ_PER_TURN  # the loop gets its turn back
        assert len(caplog.records) == BAD_LINES_LOGGED_PER_TURN + 1
        while queued(server.fileno()):
            server.serve({10})
            turns += 1
    finally:
        os.close(fd)
    write(server, request(10, "a", 5.0))
    server.serve({10})
    assert server.expired(10.0) == [Timer(10, "a", 5.0, 9)]
    assert turns == 4
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == turns * (BAD_LINES_LOGGED_PER_TURN + 1)
    counted = sum(int(m.split()[0]) if m.endswith("more timer requests ignored") else 1 for m in messages)
    assert counted == len(flood) // 5


def test_the_fifo_never_reports_an_end_of_file_that_would_wake_the_loop(server):
    write(server, request(10, "a", 5.0))
    readable = select.poll()
    readable.register(server.fileno(), select.POLLIN)
    assert readable.poll(0)  # the request
    server.serve({10})
    readable = select.poll()  # the loop registers the descriptor afresh each time it waits
    readable.register(server.fileno(), select.POLLIN)
    assert readable.poll(100) == []  # every writer gone, nothing to read: quiet


def test_close_removes_only_a_fifo_it_made(tmp_path):
    made = FileTimerServer(str(tmp_path / "made"))
    os.mkfifo(tmp_path / "theirs")
    kept = FileTimerServer(str(tmp_path / "theirs"))
    made.close()
    kept.close()
    assert not (tmp_path / "made").exists()
    assert (tmp_path / "theirs").exists()
