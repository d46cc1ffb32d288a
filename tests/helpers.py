"""What the test modules share: running the launcher, watching processes, ports and nodes, the store's wire.

The shared pytest fixtures are in conftest.py; this module holds plain functions and constants.
"""
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = os.path.join(REPO, "tests", "workers")
LAUNCHER = [sys.executable, "-m", "launcher"]
TORCHRUN = [os.path.join(os.path.dirname(sys.executable), "torchrun")]  # the reference, from .venv
# Runs a command as on an older kernel (or under Docker's default seccomp profile): the system calls it is
# given fail with ENOSYS (tests/workers/sup_seccomp.py; its filters are x86_64's).
SECCOMP = [sys.executable, os.path.join(WORKERS, "sup_seccomp.py")]
x86_64_only = pytest.mark.skipif(platform.machine() != "x86_64", reason="the seccomp filters are x86_64's")

# The fake NVML's GPUs (tests/fake_nvml.c reads them from FAKE_NVML_UUIDS and FAKE_NVML_BUS_IDS).
UUIDS = ["GPU-11111111-aaaa", "GPU-22222222-bbbb", "GPU-23333333-cccc"]
BUS_IDS = ["0000:1b:00.0", "0000:3b:00.0", "0000:b1:00.0"]


# The launcher, run as users run it ------------------------------------------------------------------


def clean_env(**extra):
    """The test process's environment without torchrun, launcher, Slurm or rendezvous settings leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC_", "SLURM_", "MASTER_"))}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_launcher(*args, env=None, timeout=180):
    """Run ``python -m launcher ARGS`` and return the CompletedProcess (text mode)."""
    return subprocess.run(
        LAUNCHER + [str(a) for a in args],
        env=clean_env() if env is None else env,
        cwd=REPO,
        timeout=timeout,
        capture_output=True,
        text=True,
    )


def start_launcher(*args, env=None, text=True, program=LAUNCHER, **popen):
    """Start ``python -m launcher ARGS`` (or ``program``: TORCHRUN) with its stdout and stderr on pipes; the Popen.

    ``popen``: more of Popen's arguments (``stdin``, ``cwd``)."""
    return subprocess.Popen(
        program + [str(a) for a in args],
        env=clean_env() if env is None else env,
        **{"cwd": REPO, **popen},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=text,
    )


def finish(*procs, timeout=180):
    """Wait for every process; their (returncode, stdout, stderr). Any still running after that is killed."""
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def launcher_imports(*args):
    """``python -m launcher ARGS``, which must succeed: its output and the modules it imported, in order (-X
    importtime). Without site (-S), as the single binary starts: the modules are the launcher's alone."""
    result = subprocess.run([sys.executable, "-S", "-X", "importtime", "-m", "launcher", *args], cwd=REPO,
                            env=clean_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")]
    return result.stdout, imported


def cli_records(directory, count):
    """What workers/cli_record.py wrote in directory, by rank."""
    return {rank: json.loads((directory / f"{rank}.json").read_text()) for rank in range(count)}


def read_env(path):
    """An environment a worker wrote, one NAME=VALUE a line (the lines of a multi-line value are left out)."""
    with open(path) as f:
        return dict(line.split("=", 1) for line in f.read().splitlines() if "=" in line)


# The supervisor's scenarios: tests/workers/sup_harness.py as the launcher process, sup_worker.py as its workers

SUP_WORKER = [sys.executable, os.path.join(WORKERS, "sup_worker.py")]
SUP_HARNESS = [sys.executable, os.path.join(WORKERS, "sup_harness.py")]


def sup_worker(directory, *args):
    """The argv of a sup_worker.py worker doing ACTION ARGS with its files in directory."""
    return SUP_WORKER + [str(directory), *map(str, args)]


class Harness:
    """The harness as a launcher process, with its workers' files in ``directory``.

    ``wrapper``: a command that runs the harness (its argv prefix), e.g. tests/workers/sup_seccomp.py.
    """

    def __init__(self, directory, argv, stdout=subprocess.PIPE, wrapper=(), **spec):
        self.directory = directory
        self.state_path = str(directory / "state")
        spec = {"argv": argv, "log_dir": str(directory / "logs"), "state": self.state_path, **spec}
        (directory / "spec.json").write_text(json.dumps(spec))
        self.nproc = spec.get("nproc", 2)
        self.proc = subprocess.Popen(
            [*wrapper, *SUP_HARNESS, str(directory / "spec.json")], env=clean_env(), cwd=REPO,
            stdout=stdout, stderr=subprocess.PIPE, text=True,
        )

    def ready(self):
        """Wait until every worker wrote its ready file; returns the state (launcher and worker pids)."""
        wait_until_ready(self.directory, self.proc, self.nproc)
        with open(self.state_path) as f:
            return json.load(f)

    def finish(self, timeout=60):
        out, err = self.proc.communicate(timeout=timeout)
        if os.path.exists(self.state_path + ".exits"):
            self.exits()  # no zombie left
        return self.proc.returncode, out, err

    def exits(self):
        """Every worker's exit, as the launcher saw it once the group ended (when it left no zombie)."""
        with open(self.state_path + ".exits") as f:
            ended = json.load(f)
        assert ended["zombies"] == []
        return ended["exits"]

    def file(self, name):
        return (self.directory / name).read_text()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pass  # a survivor holds its pipes: the test has failed already


# Processes ------------------------------------------------------------------------------------------


def wait_for(condition, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def wait_until_ready(directory, proc, nproc=2):
    """Wait until ranks 0 to nproc-1 wrote their ``<rank>.ready`` file in directory; proc must still run then."""
    wait_for(lambda: all((directory / f"{r}.ready").exists() for r in range(nproc)) or proc.poll() is not None,
             what="the workers to be ready")
    assert proc.poll() is None, proc.communicate()


def state(pid):
    """A process's state letter, None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return None


def dead(pid):
    return state(pid) in (None, "Z", "X")


def parent(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[1])


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def descendants(pid):
    found, parents = [], [pid]
    while parents:
        kids = [kid for parent in parents for kid in children(parent)]
        found += kids
        parents = kids
    return found


def cpu_seconds(pid):
    """The CPU time (user and system) a process, or a thread by its id, has used so far, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def comm(pid):
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def survivors(processes):
    """Those of processes still there, as ``{pid: "pid (name)"}``."""
    survivors = {}
    for pid in processes:
        try:
            with open(f"/proc/{pid}/stat") as f:
                survivors[pid] = f.read().split(") ")[0] + ")"
        except FileNotFoundError:
            continue
    return survivors


def fd_count():
    """Descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def thread_ids(name):
    """The ids of this process's threads of that name (comm)."""
    ids = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                if comm.read().strip() == name:
                    ids.add(int(task))
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return ids


def my_zombies():
    """This process's children that ended and were not reaped."""
    zombies = []
    for name in os.listdir("/proc"):
        if name.isdigit() and state(name) == "Z":
            try:
                if parent(name) == os.getpid():
                    zombies.append(int(name))
            except FileNotFoundError:
                continue
    return zombies


def cgroup_mounts():
    """Where the cgroup2 hierarchy and the v1 freezer are mounted: {"v2": point, "v1": point} (None: not mounted)."""
    points = {"v2": None, "v1": None}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype, options = fields[fields.index("-") + 1], fields[-1].split(",")
            if fstype == "cgroup2" and points["v2"] is None:
                points["v2"] = fields[4]
            elif fstype == "cgroup" and "freezer" in options and points["v1"] is None:
                points["v1"] = fields[4]
    return points


def job_cgroups(proc_cgroup):
    """The directories of the launcher's job cgroups (named launcher-*) that a process's /proc/PID/cgroup
    text places it in: {"v2": directory, "v1": directory}, without the hierarchies where it is in another."""
    mounts, found = cgroup_mounts(), {}
    for line in proc_cgroup.splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        version = "v2" if hierarchy == "0" else "v1" if "freezer" in controllers.split(",") else None
        if version and mounts[version] and os.path.basename(path).startswith("launcher-"):
            found[version] = mounts[version] + path
    return found


# Ports and nodes ------------------------------------------------------------------------------------


def free_port(host="127.0.0.1"):
    """A TCP port free on host right now (not reserved: another process may take it first)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def node_addr(i):
    """Node i's own loopback address: 127.0.0.2, 127.0.0.3..."""
    return f"127.0.0.{i + 2}"


def rdzv_options(backend, nodes, node, endpoint, run_id, conf, min_nodes=None):
    """Node ``node``'s rendezvous options in a job of ``nodes`` nodes (MIN:MAX with ``min_nodes``);
    with c10d node 0 hosts the store, whichever node a test kills. ``conf``: --rdzv-conf of c10d and etcd."""
    nnodes = f"{min_nodes}:{nodes}" if min_nodes else str(nodes)
    if backend == "static":
        host, port = endpoint.rsplit(":", 1)
        return [f"--nnodes={nnodes}", "--rdzv-backend=static", f"--node-rank={node}", f"--master-addr={host}",
                f"--master-port={port}"]
    if backend == "c10d":
        conf += f",is_host={'true' if node == 0 else 'false'}"
    return [f"--nnodes={nnodes}", f"--rdzv-backend={backend}", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}",
            f"--rdzv-conf={conf}"]


def rdzv_endpoint(backend, request):
    """Where the nodes of a test meet: the module's etcd (the etcd_server fixture), else node 0's address."""
    if backend == "etcd":
        return request.getfixturevalue("etcd_server").endpoint
    return f"{node_addr(0)}:{free_port()}"


def together(calls, timeout=60):
    """Run calls concurrently, as nodes do; their results in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result(timeout=timeout) for f in futures]


# The store's wire protocol, and torch's store as the reference peer ---------------------------------

VALIDATE = b"\x00" + struct.pack("<I", 0x3C85F7CE)  # the handshake every connection starts with


def wire(value):
    """A key or value as the protocol sends it: its length, then its bytes."""
    return struct.pack("<Q", len(value)) + value


def ping_frame(nonce):
    return b"\x0d" + struct.pack("<I", nonce)


def recv_exactly(conn, size):
    """Read exactly ``size`` bytes from a socket, failing if the peer closes first."""
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


def torch_client(port, timeout=30):
    """A client of torch's own TCPStore."""
    import torch.distributed as torch_dist  # here: importing torch takes seconds that most tests do not need

    return torch_dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=timeout))


def every_command(store):
    """One of each store call through a torch-API store; what each returned (or raised)."""
    results = []

    def record(name, call):
        try:
            results.append((name, call()))
        except Exception as error:  # the point is to compare what happens
            results.append((name, type(error).__name__, str(error).splitlines()[0]))

    record("set", lambda: store.set("ab", "xy"))
    record("get", lambda: store.get("ab"))
    record("add", lambda: store.add("cnt", 5))
    record("add again", lambda: store.add("cnt", -7))
    record("get counter", lambda: store.get("cnt"))
    record("compare_set swap", lambda: store.compare_set("ab", "xy", "zz"))
    record("compare_set mismatch", lambda: store.compare_set("ab", "nope", "qq"))
    record("compare_set creates", lambda: store.compare_set("fresh", "", "d1"))
    record("compare_set missing", lambda: store.compare_set("absent", "e", "d"))
    record("check", lambda: store.check(["ab", "nokey"]))
    record("check present", lambda: store.check(["ab", "fresh"]))
    record("num_keys", lambda: store.num_keys())
    record("delete_key", lambda: store.delete_key("ab"))
    record("delete_key missing", lambda: store.delete_key("missing"))
    record("append creates", lambda: store.append("ap", "12"))
    record("append", lambda: store.append("ap", b"\x00\xff"))
    record("get appended", lambda: store.get("ap"))
    record("multi_set", lambda: store.multi_set(["k1", "k2"], ["v1", b"v2"]))
    record("multi_get", lambda: store.multi_get(["k1", "k2"]))
    record("wait present", lambda: store.wait(["k1", "k2"]))
    record("wait timeout", lambda: store.wait(["never", "k1"], timedelta(milliseconds=200)))
    record("queue_push", lambda: store.queue_push("q", "a"))
    record("queue_push 2", lambda: store.queue_push("q", b"b"))
    record("queue_len", lambda: store.queue_len("q"))
    record("queue_pop", lambda: store.queue_pop("q"))
    record("queue_pop nonblocking", lambda: store.queue_pop("q", block=False))
    record("queue_pop empty", lambda: store.queue_pop("q", block=False))
    record("queue_len empty", lambda: store.queue_len("q"))
    record("list_keys", lambda: sorted(store.list_keys()))
    record("num_keys end", lambda: store.num_keys())
    return results
