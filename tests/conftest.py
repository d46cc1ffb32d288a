"""The pytest fixtures more than one test module uses (the shared functions are in helpers.py)."""
import os
import subprocess

import pytest
from etcd import ETCD, NO_ETCD, EtcdServer
from helpers import BUS_IDS, REPO, UUIDS, Harness


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


@pytest.fixture
def handlers():
    """Rendezvous handlers a test made, shut down after it in reverse: the store's host, made first, last."""
    made = []
    yield made
    for handler in reversed(made):
        handler.shutdown()


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
