"""--hosts and --hostfile over a real sshd (tests/sshd.py): one launcher per host, started from here.

The hosts are 127.0.0.2 and 127.0.0.3, both this machine: the workers share tmp_path, and each tells
its host by sshd's address in SSH_CONNECTION (tests/workers/hosts_worker.sh). Rank order across hosts
is the rendezvous' join order, so the tests look workers up by host, not by rank.
"""
import json
import os
import re
import signal
import subprocess
import sys

from helpers import LAUNCHER, REPO, WORKERS, clean_env, dead, descendants, finish, parent, start_launcher, wait_for
from sshd import HIDING_HOST

FIRST, SECOND = "127.0.0.2", "127.0.0.3"
UNREACHABLE = "127.0.0.4"  # loopback, where sshd does not listen
WORKER = os.path.join(WORKERS, "hosts_worker.sh")
ALLREDUCE = os.path.join(WORKERS, "bin_allreduce.py")


def run_hosts(sshd, *args, env=None, cwd=REPO, timeout=180):
    return subprocess.run([*LAUNCHER, f"--ssh={sshd.ssh}", *map(str, args)], env=env or clean_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def start_hosts(sshd, *args):
    return start_launcher(f"--ssh={sshd.ssh}", *args)


def records(directory, count, suffix):
    """What each rank's worker wrote to <rank><suffix>, by rank."""
    return {rank: (directory / f"{rank}{suffix}").read_bytes() for rank in range(count)}


def host_of(environ: bytes) -> str:
    variables = dict(entry.split("=", 1) for entry in environ.decode().split("\0") if "=" in entry)
    return variables["SSH_CONNECTION"].split()[2]


def environment(environ: bytes) -> dict:
    return dict(entry.split("=", 1) for entry in environ.decode().split("\0") if "=" in entry)


def wait_until_ready(directory, proc, count):
    wait_for(lambda: all((directory / f"{rank}.ready").exists() for rank in range(count)) or proc.poll() is not None,
             timeout=120, what="every worker on every host to be ready")
    assert proc.poll() is None, proc.communicate()


def connecting_lines(stderr):
    return [line.split("launcher] ", 1)[1] for line in stderr.splitlines() if ": connecting (" in line]


def test_two_hosts_with_two_workers_each_all_reduce_over_gloo(sshd, tmp_path):
    result = run_hosts(sshd, f"--hosts={FIRST},{SECOND}", "--nproc-per-node=2", ALLREDUCE, tmp_path)
    assert result.returncode == 0, result.stderr
    for rank in range(4):
        record = json.loads((tmp_path / f"{rank}.json").read_text())
        assert (record["sum"], record["world_size"], record["python"]) == (10.0, 4, sys.executable)
    assert connecting_lines(result.stderr) == [
        f"{host}: connecting (ssh -F {sshd.path('ssh_config')} {host})" for host in (FIRST, SECOND)
    ]


def test_a_hostfile_with_unequal_slots_and_every_line_whole_and_prefixed(sshd, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"# two hosts\n{FIRST} slots=1\n{SECOND} slots=3  # the bigger one\n")
    out = tmp_path / "out"
    out.mkdir()
    result = run_hosts(sshd, f"--hostfile={hostfile}", "--nproc-per-node=5", "--no-python", WORKER, out, "record")
    assert result.returncode == 0, result.stderr
    environs = {rank: environment(environ) for rank, environ in records(out, 4, ".environ").items()}
    by_host = {}
    for rank, variables in environs.items():
        by_host.setdefault(variables["SSH_CONNECTION"].split()[2], []).append(rank)
        assert (variables["WORLD_SIZE"], variables["RANK"]) == ("4", str(rank))
    assert sorted(len(by_host[host]) for host in by_host) == [1, 3] and len(by_host[FIRST]) == 1
    for ranks in by_host.values():
        assert {environs[rank]["LOCAL_WORLD_SIZE"] for rank in ranks} == {str(len(ranks))}
    # What the workers print arrives whole, each line prefixed with its host.
    said = sorted(line for line in result.stdout.splitlines())
    assert said == sorted(f"{host}: rank {rank} says hello" for host, ranks in by_host.items() for rank in ranks)
    for host, ranks in by_host.items():
        for rank in ranks:
            assert f"{host}: rank {rank} complains" in result.stderr.splitlines()


def test_a_failure_on_the_second_host_stops_the_first_and_exits_1(sshd, tmp_path):
    # On SECOND the workers fail once FIRST's two workers are up.
    result = run_hosts(sshd, f"--hosts={FIRST},{SECOND}", "--nproc-per-node=2", "--no-python", WORKER, tmp_path,
                       "fail", SECOND, 2)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert lines[-1] == f"launcher: error: the job failed on {SECOND} (its launcher exited with 1, the failure " \
                        f"summary above); stopped {FIRST}"
    ready = sorted(path.name for path in tmp_path.glob("*.ready"))  # FIRST's workers'
    assert len(ready) == 2
    # SECOND's own failure summary, prefixed with its host, names its failed ranks (the two that FIRST's workers
    # do not have: the nodes' ranks follow their addresses, the same here, then their launchers' pids) and
    # their exit code.
    second_ranks = {"0", "1", "2", "3"} - {name.removesuffix(".ready") for name in ready}
    summary = [line.removeprefix(f"{SECOND}: ") for line in lines if line.startswith(f"{SECOND}: ")]
    assert f"{WORKER} FAILED" in summary
    ranks = [re.fullmatch(r"  rank      : (\d) \(local_rank: [01]\)", line) for line in summary]
    assert {rank[1] for rank in ranks if rank} <= second_ranks and any(ranks), summary
    assert [line for line in summary if re.fullmatch(r"  exitcode  : 3 \(pid: \d+\)", line)]
    for name in ready:  # FIRST's workers were stopped with SIGTERM
        assert (tmp_path / name.replace(".ready", ".signals")).read_text() == "SIGTERM\n"


def test_sigterm_is_forwarded_to_every_host_and_exits_143(sshd, tmp_path):
    proc = start_hosts(sshd, f"--hosts={FIRST},{SECOND}", "--nproc-per-node=2", "--no-python", WORKER, tmp_path,
                       "wait")
    wait_until_ready(tmp_path, proc, 4)
    proc.send_signal(signal.SIGTERM)
    [(code, _, err)] = finish(proc)
    assert code == 128 + signal.SIGTERM, err
    for rank in range(4):
        assert (tmp_path / f"{rank}.signals").read_text() == "SIGTERM\n"
    assert "Traceback" not in err


def test_kill_9_of_the_local_launcher_leaves_nothing_on_any_host(sshd, tmp_path):
    proc = start_hosts(sshd, f"--hosts={FIRST},{SECOND}", "--nproc-per-node=2", "--no-python", WORKER, tmp_path,
                       "wait")
    try:
        wait_until_ready(tmp_path, proc, 4)
        workers = [int((tmp_path / f"{rank}.ready").read_text().split()[0]) for rank in range(4)]
        remote_launchers = {parent(worker) for worker in workers}
        assert len(remote_launchers) == 2
        # Every remote launcher with its guardian, workers and their sleep children; the local ssh processes.
        processes = [*remote_launchers, *(pid for launcher in remote_launchers for pid in descendants(launcher)),
                     *descendants(proc.pid)]
        assert len(processes) >= 2 + 2 * (1 + 2 * 2) + 2
        proc.kill()
        proc.wait()
        wait_for(lambda: all(dead(pid) for pid in processes), timeout=30, what="every process on every host to end")
    finally:
        finish(proc)


def test_awkward_arguments_environment_and_working_directory_reach_every_host(sshd, tmp_path):
    workdir = tmp_path / "a dir with 'quotes', \"doubles\", $dollars and `ticks`"
    workdir.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    awkward = ["", " ", "two words", "'", '"', "\\", "$HOME", "${PATH}", "`id`", "$(id)", ";", "&&", "|", "*", "~",
               "#", "!", "a\nnewline", "tab\there", "ünïcödé", "--nnodes=9", "-m", "--", "%s"]
    env = clean_env(NCCL_AWKWARD="a b 'c' \"d\" $HOME `e`\nline two", OMP_NUM_THREADS="3", MY_VAR="mine",
                    MYPREFIX_ONE="1", MYPREFIX_TWO="2", NOT_EXPORTED="stays here")
    result = run_hosts(sshd, f"--hosts={FIRST},{SECOND}", "--export=MY_VAR,MYPREFIX_*", "--no-python", WORKER,
                       out, "record", *awkward, env=env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    hosts = set()
    for rank in range(2):
        assert (out / f"{rank}.argv").read_bytes() == b"".join(arg.encode() + b"\0" for arg in awkward)
        assert (out / f"{rank}.cwd").read_text() == str(workdir)
        variables = environment((out / f"{rank}.environ").read_bytes())
        for name in ("NCCL_AWKWARD", "OMP_NUM_THREADS", "MY_VAR", "MYPREFIX_ONE", "MYPREFIX_TWO", "PATH"):
            assert variables[name] == env[name], name
        assert "NOT_EXPORTED" not in variables
        hosts.add(variables["SSH_CONNECTION"].split()[2])
    assert hosts == {FIRST, SECOND}


def test_a_host_that_cannot_be_reached_fails_the_launch_with_one_line(sshd, tmp_path):
    result = run_hosts(sshd, f"--hosts={FIRST},{UNREACHABLE}", "--no-python", WORKER, tmp_path, "record")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"launcher: error: {UNREACHABLE}: ssh: connect to host {UNREACHABLE} port {sshd.port}: Connection refused"
    )
    assert list(tmp_path.iterdir()) == []  # nothing started anywhere


def test_a_working_directory_missing_on_a_host_fails_with_one_line(sshd, tmp_path):
    workdir = os.path.join(sshd.hidden_dir, tmp_path.name)  # there is no hidden_dir on the hiding host
    os.mkdir(workdir)
    try:
        result = run_hosts(sshd, f"--hosts={FIRST},{HIDING_HOST}", "--no-python", WORKER, tmp_path, "record",
                           cwd=workdir)
    finally:
        os.rmdir(workdir)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"launcher: error: {HIDING_HOST}: no directory {workdir} there (every host runs in this working directory)"
    )


def test_python_m_launcher_missing_on_a_host_says_so_in_one_line(sshd, tmp_path):
    # This interpreter, by a path that the hiding host lacks.
    directory = os.path.join(sshd.hidden_dir, tmp_path.name)
    os.mkdir(directory)
    python = os.path.join(directory, "python")
    os.symlink(sys.executable, python)
    try:
        result = subprocess.run([python, "-m", "launcher", f"--ssh={sshd.ssh}", f"--hosts={FIRST},{HIDING_HOST}",
                                 "--no-python", WORKER, tmp_path, "record"], env=clean_env(), cwd=REPO,
                                capture_output=True, text=True, timeout=180)
    finally:
        os.remove(python)
        os.rmdir(directory)
    assert result.returncode == 1
    # The parenthesis holds the remote shell's own words, "launcher: 1: exec: PATH: not found" for dash.
    assert re.fullmatch(
        re.escape(f"launcher: error: {HIDING_HOST}: {python} -m launcher does not start there (") + ".*"
        + re.escape(f"{python}: not found); python -m launcher needs the same installation on every host (the "
                    "single binary copies itself)"),
        result.stderr.splitlines()[-1],
    )
