"""The pytest fixtures more than one test module uses (the shared functions are in helpers.py)."""
import os
import signal
import subprocess

import pytest
from etcd import ETCD, NO_ETCD, EtcdServer
from helpers import BUS_IDS, REPO, UUIDS, Harness, together
from slurm_cluster import MISSING, NO_SLURM, SlurmCluster, unshare_refused
from sshd import SshServer, unavailable


@pytest.fixture
def isolated_environment(monkeypatch):
    """No launcher settings from the outside; OMP_NUM_THREADS restored after config_from_args sets it.

    For the modules that parse or launch in this process; each opts in with
    ``pytestmark = pytest.mark.usefixtures("isolated_environment")``.
    """
    for name in list(os.environ):
        if name.startswith(("PET_", "SLURM_", "TORCHELASTIC_")) or name in ("PYTHON_EXEC", "LOGLEVEL"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OMP_NUM_THREADS", "placeholder")
    monkeypatch.delenv("OMP_NUM_THREADS")


@pytest.fixture(scope="session")
def fake_nvml_library(tmp_path_factory):
    """The fake NVML (tests/fake_nvml.c), compiled once."""
    library = tmp_path_factory.mktemp("fake_nvml") / "libfake_nvml.so"
    source = os.path.join(REPO, "tests", "fake_nvml.c")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(library), source], check=True)
    return str(library)


@pytest.fixture
def fake_nvml(fake_nvml_library, monkeypatch):
    """This process sees the fake NVML with three GPUs and no CUDA_VISIBLE_DEVICES; returns its environment."""
    settings = {
        "LAUNCHER_NVML_LIBRARY": fake_nvml_library,
        "FAKE_NVML_UUIDS": ",".join(UUIDS),
        "FAKE_NVML_BUS_IDS": ",".join(BUS_IDS),
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("FAKE_NVML_INIT_RC", raising=False)
    return settings


@pytest.fixture(scope="module")
def etcd_server():
    """A real etcd (tests/etcd.py) for the module's tests; they are skipped, naming etcd, where it is missing."""
    if ETCD is None:
        pytest.skip(NO_ETCD)
    server = EtcdServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def sshd():
    """A real OpenSSH server on 127.0.0.1-3 (tests/sshd.py) for the --hosts tests; they are skipped, saying
    why, where it cannot run."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    server = SshServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def handlers():
    """Rendezvous handlers a test made, shut down together after it, as the nodes of a job end.

    Together: a node that serves the others (the c10d store's host, rank 0) waits at shutdown
    until they have left, so one by one each such node would wait out its close_timeout.
    """
    made = []
    yield made
    if made:
        together([handler.shutdown for handler in made])


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real Slurm cluster (tests/slurm_cluster.py), started once for the session.

    Its tests are skipped, naming what is missing, only where the packages are not
    installed or unshare is refused; a cluster that fails to start is an error.
    """
    if MISSING:
        pytest.skip(NO_SLURM)
    refused = unshare_refused()
    if refused:
        pytest.skip(refused)
    cluster = SlurmCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that used the Slurm cluster shows the daemons' logs under its report."""
    outcome = yield
    report = outcome.get_result()
    cluster = getattr(item, "funcargs", {}).get("slurm_cluster")
    if report.failed and cluster is not None:
        report.sections.append(("Slurm cluster logs", cluster.logs()))


@pytest.fixture
def launchers():
    """Launcher processes a test started (it appends them): SIGKILLed after it, those still running."""
    started = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


@pytest.fixture
def harness(tmp_path):
    """Starts sup_harness.py scenarios in tmp_path (helpers.Harness); kills what is left after the test."""
    started = []

    def start(argv, **spec):
        h = Harness(tmp_path, argv, **spec)
        started.append(h)
        return h

    yield start
    for h in started:
        h.kill()
