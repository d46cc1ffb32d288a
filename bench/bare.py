"""The floor: the same workers started, watched and ended by the fewest steps a launcher can take.

Each worker is forked and exec'd (posix_spawn) in a process group of its own,
with the environment a launcher gives it (``worker_env``); exits are seen on
their pidfds in one epoll, as the launcher's supervisor sees them. Nothing
else: no rendezvous, no store, no logs, no output routing.

* ``run``: start every worker, wait for them all (the hello-world floor, run
  in the benchmark's own process so that no interpreter start-up is counted);
* ``teardown``: as run, and at the first failed exit SIGTERM the others'
  process groups;
* ``respawn``: as teardown, then wait for the others to be gone and start
  every worker again, once, and wait for them all.

Run as a script, ``bare.py MODE NPROC PROGRAM [ARG...]``, this is a process
the benchmark starts as it starts a launcher.
"""
from __future__ import annotations

import os
import select
import signal
import sys


def worker_env(rank: int, nproc: int, restart_count: int = 0) -> dict[str, str]:
    """A launcher's worker environment on one node: this one's, with the ranks and the rendezvous' variables."""
    env = dict(os.environ)
    env.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
        "ROLE_NAME": "default", "LOCAL_WORLD_SIZE": str(nproc), "WORLD_SIZE": str(nproc),
        "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500", "TORCHELASTIC_RESTART_COUNT": str(restart_count),
        "TORCHELASTIC_MAX_RESTARTS": "1", "TORCHELASTIC_RUN_ID": "bare", "TORCHELASTIC_USE_AGENT_STORE": "True",
    })
    return env


def spawn(argv: list[str], env: dict[str, str]) -> int:
    """One worker, its output discarded as the benchmarks discard a launcher's."""
    return os.posix_spawn(argv[0], argv, env, setpgroup=0,
                          file_actions=[(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])


def start(argv: list[str], nproc: int, restart_count: int = 0) -> dict[int, int]:
    """Every worker started: {pidfd: pid}."""
    pids = [spawn(argv, worker_env(rank, nproc, restart_count)) for rank in range(nproc)]
    return {os.pidfd_open(pid): pid for pid in pids}


def wait_all(workers: dict[int, int]) -> list[int]:
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in workers.values()]
    for pidfd in workers:
        os.close(pidfd)
    return codes


def run(argv: list[str], nproc: int) -> list[int]:
    return wait_all(start(argv, nproc))


def teardown(workers: dict[int, int]) -> dict[int, int]:
    """Wait for the first failed exit, SIGTERM the others' process groups; the workers still to reap."""
    poller = select.epoll()
    for pidfd in workers:
        poller.register(pidfd, select.EPOLLIN)
    running = dict(workers)
    while running:
        for pidfd, _ in poller.poll():
            pid = running.pop(pidfd)
            poller.unregister(pidfd)
            os.close(pidfd)
            if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
                for other in running.values():
                    os.killpg(other, signal.SIGTERM)
                poller.close()
                return running
    poller.close()
    return running


def respawn(argv: list[str], nproc: int) -> list[int]:
    wait_all(teardown(start(argv, nproc)))
    return wait_all(start(argv, nproc, restart_count=1))


def main(argv: list[str]) -> int:
    mode, nproc, program = argv[0], int(argv[1]), argv[2:]
    if mode == "teardown":
        wait_all(teardown(start(program, nproc)))
        return 1
    if mode == "respawn":
        return max(respawn(program, nproc))
    return max(run(program, nproc))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
