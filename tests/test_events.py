"""--event-log-handler=console: torch's event records, in torch's order, for tools that read torchrun's stream.

The launcher and torchrun (.venv's, the reference) run the same job side by
side; every record of ours is parsed by torch's own ``Event.deserialize`` and
has, record for record, the keys torchrun's has, down to the inner metadata.
"""
import json
from dataclasses import asdict, fields

from helpers import TORCHRUN, clean_env, finish, free_port, start_launcher
from torch.distributed.elastic.events.api import Event, EventSource

CONSOLE = ["--event-log-handler=console"]
RANK_1_FAILS = ["--no-python", "bash", "-c", 'if [ "$RANK" = 1 ]; then exit 3; fi; exec sleep 120']


def console_events(stderr):
    """The event lines of a launch's stderr, each parsed by torch."""
    return [Event.deserialize(line) for line in stderr.splitlines() if line.startswith('{"name": ')]


def run_both(*args, env=None):
    """Ours and torchrun on the same command line, at once; {name: (exit status, stderr, events)}."""
    procs = {
        "ours": start_launcher(*args, env=env),
        "torchrun": start_launcher(*args, env=env, program=TORCHRUN),
    }
    return {
        name: (returncode, stderr, console_events(stderr))
        for name, (returncode, _, stderr) in zip(procs, finish(*procs.values()))
    }


def steps(events):
    """(state, source) of each event."""
    return [(event.metadata["state"], event.source) for event in events]


def assert_same_schema(ours, theirs, same_states=True):
    """Record for record: torch's Event fields, then torchrun's metadata keys and inner metadata keys, in order;
    with ``same_states`` the same state names too."""
    assert len(ours) == len(theirs)
    for mine, reference in zip(ours, theirs):
        assert list(asdict(mine)) == [field.name for field in fields(Event)]
        assert mine.name == f"torchelastic.worker.status.{mine.metadata['state']}"
        assert mine.name == reference.name or not same_states
        assert list(mine.metadata) == list(reference.metadata)
        assert list(json.loads(mine.metadata["metadata"])) == list(json.loads(reference.metadata["metadata"]))
        assert mine.timestamp > 0  # milliseconds since the epoch; torch leaves 0


def workers_metadata(event):
    return json.loads(event.metadata["metadata"])


AGENT, WORKER = EventSource.AGENT, EventSource.WORKER


def test_success_records_torchs_events_in_torchs_order():
    done = run_both("--standalone", "--nproc-per-node=2", *CONSOLE, "--no-python", "true")
    (ours_rc, ours_stderr, ours), (torch_rc, torch_stderr, theirs) = done["ours"], done["torchrun"]
    assert ours_rc == torch_rc == 0, ours_stderr + torch_stderr
    expected = [("RENDEZVOUS", AGENT), ("ASSIGN_WORKER_RANKS", AGENT), ("START", WORKER), ("START", WORKER),
                ("SUCCEEDED", WORKER), ("SUCCEEDED", WORKER), ("SUCCEEDED", AGENT)]
    assert steps(ours) == steps(theirs) == expected
    assert_same_schema(ours, theirs)

    rendezvous, _, start0, start1, done0, done1, agent = ours
    run_id = rendezvous.metadata["run_id"]
    assert {event.metadata["run_id"] for event in ours} == {run_id}
    assert rendezvous.metadata["rdzv_backend"] == "c10d" and rendezvous.metadata["duration_ms"] > 0
    assert (rendezvous.metadata["group_rank"], workers_metadata(rendezvous)) == (
        0, {"group_world_size": 1, "entry_point": "true"}
    )
    for rank, (start, end) in enumerate([(start0, done0), (start1, done1)]):
        assert start.metadata["global_rank"] == end.metadata["global_rank"] == rank
        assert start.metadata["worker_id"] == end.metadata["worker_id"]
        pid = int(start.metadata["worker_id"])
        assert workers_metadata(start) == {"group_world_size": 1, "entry_point": "true", "local_rank": [rank],
                                           "role_rank": [rank], "role_world_size": [2], "exit_code": [None],
                                           "worker_pid": [pid]}
        assert workers_metadata(end)["exit_code"] == [0] and end.metadata["raw_error"] is None
    assert (agent.metadata["global_rank"], agent.metadata["worker_id"], agent.metadata["raw_error"]) == (
        None, None, None
    )


def test_failure_records_the_failed_worker_and_the_agent_failed_where_torchrun_says_succeeded():
    done = run_both("--standalone", "--nproc-per-node=1", *CONSOLE, "--no-python", "bash", "-c",
                    "echo no luck >&2; exit 3")
    (ours_rc, ours_stderr, ours), (torch_rc, torch_stderr, theirs) = done["ours"], done["torchrun"]
    assert ours_rc == torch_rc == 1, ours_stderr + torch_stderr
    expected = [("RENDEZVOUS", AGENT), ("ASSIGN_WORKER_RANKS", AGENT), ("START", WORKER), ("FAILED", WORKER)]
    # torchrun records SUCCEEDED for an agent whose workers failed; ours says FAILED, with the root cause
    assert steps(theirs) == [*expected, ("SUCCEEDED", AGENT)]
    assert steps(ours) == [*expected, ("FAILED", AGENT)]
    assert_same_schema(ours, theirs, same_states=False)
    assert json.loads(ours[4].metadata["raw_error"])["message"]["errorCode"] == 3

    failed = ours[3]
    assert workers_metadata(failed)["exit_code"] == [3]
    raw_error = json.loads(failed.metadata["raw_error"])  # the record the launcher's error file would hold
    assert raw_error["message"]["errorCode"] == 3
    assert raw_error["message"]["extraInfo"]["stderr_tail"] == ["no luck"]


def test_the_agents_own_failure_is_recorded_as_torchrun():
    # two nodes wanted, one comes: the rendezvous times out
    args = ["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-id=lonely", "--rdzv-conf=join_timeout=2", *CONSOLE,
            "--no-python", "true"]
    procs = {
        "ours": start_launcher(f"--rdzv-endpoint=127.0.0.1:{free_port()}", *args),
        "torchrun": start_launcher(f"--rdzv-endpoint=127.0.0.1:{free_port()}", *args, program=TORCHRUN),
    }
    (ours_rc, _, ours_stderr), (torch_rc, _, torch_stderr) = finish(*procs.values())
    ours, theirs = console_events(ours_stderr), console_events(torch_stderr)
    assert ours_rc == torch_rc == 1
    assert steps(ours) == steps(theirs) == [("RENDEZVOUS", AGENT), ("FAILED", AGENT)]
    assert_same_schema(ours, theirs)
    rendezvous, failed = ours
    assert rendezvous.metadata["duration_ms"] >= 2000
    assert failed.metadata["raw_error"].startswith("Traceback (most recent call last):")
    assert "RendezvousTimeoutError" in failed.metadata["raw_error"]


def test_ours_the_stopped_worker_is_terminated_and_a_restart_is_recorded():
    ((returncode, _, stderr),) = finish(
        start_launcher("--standalone", "--nproc-per-node=2", "--max-restarts=1", *CONSOLE, *RANK_1_FAILS)
    )
    events = console_events(stderr)
    assert returncode == 1, stderr
    attempt = [("RENDEZVOUS", AGENT), ("ASSIGN_WORKER_RANKS", AGENT), ("START", WORKER), ("START", WORKER)]
    assert steps(events) == [*attempt, ("RESTARTING", AGENT), *attempt, ("TERMINATED", WORKER),
                             ("FAILED", WORKER), ("FAILED", AGENT)]
    restarting = events[4]
    assert (restarting.metadata["agent_restarts"], workers_metadata(restarting)["failed_ranks"]) == (0, [1])
    assert json.loads(restarting.metadata["raw_error"])["message"]["errorCode"] == 3
    assert {event.metadata["agent_restarts"] for event in events[5:]} == {1}
    terminated, failed = events[9:11]
    assert (terminated.metadata["global_rank"], workers_metadata(terminated)["exit_code"]) == (0, [-15])
    assert (failed.metadata["global_rank"], workers_metadata(failed)["exit_code"]) == (1, [3])
    assert terminated.metadata["raw_error"] is None and failed.metadata["raw_error"] is not None


def test_loglevel_above_info_silences_the_events_as_under_torchrun():
    ((returncode, _, stderr),) = finish(
        start_launcher("--standalone", *CONSOLE, "--no-python", "true", env=clean_env(LOGLEVEL="WARNING"))
    )
    assert returncode == 0
    assert console_events(stderr) == []
