"""A real Slurm cluster for the tests: munged, slurmctld and one slurmd per node, all on this machine.

Debian's slurmd is built with multiple-slurmd support: every node is a
``slurmd -N nI`` on a port of its own. Each runs in a UTS and mount namespace
of its own (``unshare``, root), so that its tasks see ``hostname`` == nI and a
private /etc/hosts in which n1..nN resolve to 127.S.T.1..N, a loopback subnet
drawn at random so that two clusters on one machine do not meet. The network
namespace is the machine's: every node reaches every other, and a port bound
on one node's address is free on the others'.

The slurm_cluster fixture (tests/conftest.py) starts one per session; its tests
are skipped, naming what is missing, only where the packages are not installed
(``.ci/install-slurm`` installs them) or ``unshare`` is refused.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import tempfile
import time

from helpers import comm, free_port, wait_for

COMMANDS = ("munged", "slurmctld", "slurmd", "srun", "sbatch", "scancel", "squeue", "sinfo", "scontrol")
MISSING = [name for name in COMMANDS if shutil.which(name) is None]
NO_SLURM = (
    f"Slurm or munge not installed ({', '.join(MISSING)} not on PATH; "
    "`.ci/install-slurm` installs slurmctld slurmd slurm-client munge)"
)
NODES = 2
CPUS_PER_NODE = 4  # what Slurm may allocate; the workers are not bound to them
LOG_LINES = 40  # of each log, shown under a failed test
KILL_WAIT = 120  # seconds from scancel's SIGTERM to its SIGKILL


class DaemonExited(RuntimeError):
    """A daemon of the cluster exited while it started (a port taken meanwhile, a bad configuration)."""


def unshare_refused() -> str | None:
    """Why this process cannot give a node its own hostname and /etc/hosts, or None when it can."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) not installed: the Slurm nodes need their own hostname"
    probe = subprocess.run(["unshare", "--mount", "--uts", "--", "hostname", "probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare --mount --uts refused (root or CAP_SYS_ADMIN needed): {probe.stderr.strip()}"
    return None


class SlurmCluster:
    """munged, slurmctld and NODES slurmd on this machine; ``env`` is what Slurm's commands need."""

    def __init__(self, nodes: int = NODES):
        # munged checks that every directory above its socket is world-searchable: mkdtemp makes 0700.
        self.directory = tempfile.mkdtemp(prefix="launcher-slurm-")
        os.chmod(self.directory, 0o755)
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        subnet = f"127.{random.randint(16, 254)}.{random.randint(0, 255)}"
        self.addresses = {node: f"{subnet}.{i}" for i, node in enumerate(self.nodes, 1)}
        self.conf = self._path("etc", "slurm.conf")
        self.env = {"SLURM_CONF": self.conf}
        self._daemons: dict[str, subprocess.Popen] = {}
        self._namespaces: dict[str, str] = {}  # node -> its UTS namespace (/proc/PID/ns/uts)

    def _path(self, *parts: str) -> str:
        return os.path.join(self.directory, *parts)

    # -- start and stop -------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> "SlurmCluster":
        """Start every daemon and wait until every node is idle; on failure stop what started, and raise."""
        # Ports picked free can be taken before the daemons bind them: a daemon that exits is tried again.
        for attempt in range(3):
            try:
                self._start(timeout)
                return self
            except DaemonExited:
                self._stop_daemons()
                if attempt == 2:
                    raise
            except BaseException:
                self._stop_daemons()
                raise

    def _start(self, timeout: float) -> None:
        self._write_config(free_port(), {node: free_port() for node in self.nodes})
        key = self._path("munge", "munge.key")
        with open(key, "wb") as out:
            out.write(os.urandom(1024))
        os.chmod(key, 0o400)
        munge = self._path("munge", "munge.socket")
        self._spawn("munged", ["munged", "-F", f"--key-file={key}", f"--socket={munge}",
                               f"--pid-file={self._path('munge', 'munged.pid')}",
                               f"--log-file={self._path('log', 'munged.log')}",
                               f"--seed-file={self._path('munge', 'munged.seed')}"])
        self._wait("munged", lambda: os.path.exists(munge), timeout)
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", self.conf])
        self._wait("slurmctld", lambda: "UP" in self.command("scontrol", "ping", check=False).stdout, timeout)
        for node in self.nodes:
            # The namespaces' setup runs in the shell that then becomes slurmd: its pid is slurmd's.
            self._spawn(node, ["unshare", "--mount", "--uts", "--propagation", "private", "--", "sh", "-ec",
                               'hostname "$1"; mount --bind "$2" /etc/hosts; exec slurmd -D -N "$1" -f "$3"',
                               "sh", node, self._path("etc", "hosts"), self.conf])
            pid = self._daemons[node].pid
            self._wait(f"slurmd {node} to start", lambda pid=pid: comm(pid) == "slurmd", timeout)  # unshare done
            self._namespaces[node] = os.readlink(f"/proc/{pid}/ns/uts")
        self._wait("every node to be idle", self._nodes_idle, timeout)

    def _write_config(self, port: int, node_ports: dict[str, int]) -> None:
        for directory in ("etc", "log", "state", "tmp", "munge", *(os.path.join("spool", n) for n in self.nodes)):
            os.makedirs(self._path(directory), exist_ok=True)
        lines = [
            "ClusterName=launcher-tests",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self._path('munge', 'munge.socket')}",
            f"StateSaveLocation={self._path('state')}",
            f"SlurmdSpoolDir={self._path('spool', '%n')}",
            f"SlurmctldPidFile={self._path('state', 'slurmctld.pid')}",
            f"SlurmdPidFile={self._path('spool', '%n', 'slurmd.pid')}",
            f"SlurmctldLogFile={self._path('log', 'slurmctld.log')}",
            f"SlurmdLogFile={self._path('log', 'slurmd-%n.log')}",
            f"PlugStackConfig={self._path('etc', 'plugstack.conf')}",
            f"TmpFS={self._path('tmp')}",
            "MailProg=/bin/true",
            # Tasks are tracked by process tree, not cgroups: a container has no cgroup of its own to give.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            # The nodes' CPUs as configured, not as slurmd finds them: a 2-core machine runs 2 x 4.
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "InactiveLimit=0",
            # scancel: SIGTERM, then SIGKILL after KillWait; long enough that what the tests see ending a job
            # is the SIGTERM and the launcher's own teardown.
            f"KillWait={KILL_WAIT}",
            "MinJobAge=300",
        ]
        for node in self.nodes:
            lines.append(f"NodeName={node} NodeHostname=localhost NodeAddr={self.addresses[node]} "
                         f"Port={node_ports[node]} CPUs={CPUS_PER_NODE} RealMemory=1000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        with open(self.conf, "w") as out:
            out.write("\n".join(lines) + "\n")
        open(self._path("etc", "plugstack.conf"), "w").close()
        # The nodes' /etc/hosts: the machine's, where no line names a node, and the nodes.
        with open("/etc/hosts") as machine:
            kept = [line for line in machine if not set(line.split()[1:]) & set(self.nodes)]
        with open(self._path("etc", "hosts"), "w") as out:
            out.writelines(kept + [f"{address} {node}\n" for node, address in self.addresses.items()])

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self._path("log", f"{name}.out"), "wb") as out:
            # A session of its own: a Ctrl-C of the test run is not theirs, stop() ends them.
            self._daemons[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                                   stderr=subprocess.STDOUT, start_new_session=True)

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            exited = {name: proc.returncode for name, proc in self._daemons.items() if proc.poll() is not None}
            if exited:
                raise DaemonExited(f"Slurm test cluster: waiting for {what}, exited: {exited}\n{self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Slurm test cluster: {what} not ready after {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.1)

    def _nodes_idle(self) -> bool:
        states = self.command("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split("\n")
        return sorted(line.split()[0] for line in states if line.endswith(" idle")) == self.nodes

    def stop(self) -> None:
        """Cancel every job, stop every daemon and every process left in a node, remove the directory.

        Raises when something this cluster started was still there after SIGKILL.
        """
        if "slurmctld" in self._daemons and self._daemons["slurmctld"].poll() is None:
            self.command("scancel", "--full", "--partition=debug", check=False)
        self._stop_daemons()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _stop_daemons(self) -> None:
        for name in [*self.nodes, "slurmctld", "munged"]:  # the nodes first: they report to slurmctld
            proc = self._daemons.pop(name, None)
            if proc is None:
                continue
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if name in self._namespaces:
                self._end_node_processes(self._namespaces.pop(name))

    def _end_node_processes(self, namespace: str) -> None:
        """SIGTERM, then SIGKILL, what runs in a node's namespace (slurmstepd, tasks): nothing else runs there."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = processes_in(namespace)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            try:
                wait_for(lambda: not processes_in(namespace), timeout=10, what="the node's processes to end")
                return
            except AssertionError:
                continue
        raise RuntimeError(f"processes {processes_in(namespace)} survived SIGKILL in the node's namespace")

    # -- using it -------------------------------------------------------------------------------------

    def command(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """One of Slurm's commands (scontrol, sinfo, squeue, scancel...) against this cluster; text mode."""
        result = subprocess.run(argv, env={**os.environ, **self.env}, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def node_processes(self) -> dict[str, list[int]]:
        """Per node, the pids of what runs on it but its slurmd: slurmstepd, the tasks and their children."""
        return {node: [pid for pid in processes_in(self._namespaces[node]) if pid != self._daemons[node].pid]
                for node in self.nodes}

    def logs(self) -> str:
        """The last lines of every daemon's log, for a failed test's report."""
        sections = []
        for name in sorted(os.listdir(self._path("log"))):
            with open(self._path("log", name), errors="replace") as f:
                lines = f.readlines()[-LOG_LINES:]
            sections.append(f"==> {name} <==\n{''.join(lines)}")
        return "\n".join(sections)


def processes_in(namespace: str) -> list[int]:
    """The pids of the processes in a UTS namespace (as /proc/PID/ns/uts names it)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.readlink(f"/proc/{name}/ns/uts") == namespace:
                    pids.append(int(name))
            except OSError:  # gone meanwhile, or not ours to look at (another user namespace's)
                continue
    return pids
