"""Device counting without torch: NVML through a fake library, the procfs fallback, sysfs topologies (KFD for
AMD GPUs, DRM for Intel's, NUMA), and plug-in device types counted by a stub torch in the workers' Python."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import BUS_IDS, REPO, UUIDS, WORKERS, clean_env, run_launcher

from launcher import devices
from launcher.devices import (
    Gpu,
    apply_hip_visible_devices,
    apply_rocr_visible_devices,
    apply_visible_devices,
    determine_local_world_size,
    numa_bindings,
)

PLUGIN_TORCH = os.path.join(REPO, "tests", "plugin_torch")  # a torch whose plug-in backend is npu


@pytest.fixture
def plugin_torch(monkeypatch):
    """The workers' Python imports tests/plugin_torch as torch: its npu backend has two devices."""
    monkeypatch.setenv("PYTHONPATH", PLUGIN_TORCH)
    monkeypatch.setenv("STUB_NPU_COUNT", "2")


def count(nproc_per_node):
    """--nproc-per-node as the command line counts it, the workers' Python being this one."""
    return determine_local_world_size(nproc_per_node, lambda: sys.executable)


@pytest.fixture
def fake_procfs(tmp_path):
    """A /proc with the NVIDIA driver's GPU directories, listed out of order."""
    for bus_id, uuid in [(BUS_IDS[1], UUIDS[1]), (BUS_IDS[0], UUIDS[0])]:
        gpu = tmp_path / "driver" / "nvidia" / "gpus" / bus_id
        gpu.mkdir(parents=True)
        (gpu / "information").write_text(
            f"Model: \t\t NVIDIA Fake\nIRQ:   \t\t 42\nGPU UUID: \t {uuid}\nBus Location: \t {bus_id}\n"
        )
    return str(tmp_path)


def test_nvml_lists_gpus_with_uuid_and_pci_location(fake_nvml, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_NVML_LOG", str(tmp_path / "calls"))
    assert devices.physical_gpus() == [Gpu(uuid, bus) for uuid, bus in zip(UUIDS, BUS_IDS)]
    assert (tmp_path / "calls").read_text().split() == ["init", "shutdown"]


def test_nvml_unloadable_falls_back_to_procfs(fake_nvml, fake_procfs, monkeypatch):
    monkeypatch.setenv("LAUNCHER_NVML_LIBRARY", "/nonexistent/libnvidia-ml.so.1")
    assert devices.physical_gpus(fake_procfs) == [Gpu(UUIDS[0], BUS_IDS[0]), Gpu(UUIDS[1], BUS_IDS[1])]


def test_nvml_init_failure_falls_back_to_procfs(fake_nvml, fake_procfs, monkeypatch):
    monkeypatch.setenv("FAKE_NVML_INIT_RC", "9")  # NVML_ERROR_DRIVER_NOT_LOADED
    assert len(devices.physical_gpus(fake_procfs)) == 2


def test_no_driver_means_no_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("LAUNCHER_NVML_LIBRARY", "/nonexistent/libnvidia-ml.so.1")
    assert devices.physical_gpus(str(tmp_path)) == []


GPUS = [Gpu(uuid, bus) for uuid, bus in zip(UUIDS, BUS_IDS)]


@pytest.mark.parametrize(
    "visible, expected",
    [
        (None, [0, 1, 2]),
        ("", []),
        ("2,0", [2, 0]),
        (" 1 , 2 ", [1, 2]),
        ("1gpu,2x", [1, 2]),  # CUDA reads each entry like strtoul
        ("0,7,1", [0]),  # out of range ends the list
        ("1,-1,2", [1]),  # negative ends the list
        ("0,foo,1", [0]),
        ("0,1,0", []),  # a repeated device empties it
        ("GPU-2222", [1]),
        ("GPU-11111111-aaaa,GPU-2333", [0, 2]),
        ("GPU-2", []),  # ambiguous prefix ends the list
        ("GPU-1111,GPU-9999,GPU-2222", [0]),  # no such GPU ends the list
        ("GPU-1111,2", [0]),  # another kind ends the list
        ("GPU-1111,GPU-11111111", []),  # the same GPU twice
    ],
)
def test_cuda_visible_devices(visible, expected):
    assert apply_visible_devices(GPUS, visible) == [GPUS[index] for index in expected]


def test_cuda_visible_mig_instances_count_one_device_each():
    assert len(apply_visible_devices(GPUS, "MIG-aaaa,MIG-bbbb,0")) == 2
    assert apply_visible_devices(GPUS, "MIG-aaaa,MIG-aaaa") == []


def test_visible_gpus_reads_cuda_visible_devices(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-2333,GPU-1111")
    assert [gpu.uuid for gpu in devices.visible_gpus()] == [UUIDS[2], UUIDS[0]]


# --nproc-per-node (torch's test_nproc_* seeds) ---------------------------------------------------


def test_nproc_gpu_and_auto_count_three_fake_gpus(fake_nvml):
    assert count("gpu") == 3
    assert count("auto") == 3


def test_nproc_gpu_without_gpus_says_why(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ValueError, match="--nproc-per-node.*CUDA_VISIBLE_DEVICES=''"):
        count("gpu")
    monkeypatch.setenv("FAKE_NVML_UUIDS", "")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(devices, "amd_physical_gpus", lambda sysfs_root="/sys": [])  # whatever this machine has
    with pytest.raises(ValueError, match="none were found"):
        count("gpu")


def test_nproc_auto_without_gpus_counts_usable_cpus(fake_nvml, monkeypatch):
    monkeypatch.setenv("FAKE_NVML_UUIDS", "")
    monkeypatch.setattr(devices, "amd_physical_gpus", lambda sysfs_root="/sys": [])  # whatever this machine has
    monkeypatch.setattr(devices, "xpu_count", lambda: 0)
    assert count("auto") == len(os.sched_getaffinity(0))


def test_nproc_cpu_is_the_affinity_mask_not_the_machine():
    mask = sorted(os.sched_getaffinity(0))[:1]
    result = subprocess.run(
        ["taskset", "-c", str(mask[0]), sys.executable, "-c",
         "import sys; from launcher.devices import determine_local_world_size as d; "
         "print(d('cpu', lambda: sys.executable))"],
        capture_output=True, text=True, check=True, cwd=REPO,
    )
    assert result.stdout.strip() == "1"


@pytest.mark.parametrize("value, expected", [("1", 1), ("4", 4), ("12", 12)])
def test_nproc_number(value, expected):
    assert count(value) == expected


@pytest.mark.parametrize("value", ["unknown", "0", "-2", "GPU", ""])
def test_nproc_unknown_is_a_value_error(plugin_torch, value):
    with pytest.raises(ValueError, match="--nproc-per-node"):
        count(value)


def _render_node(root, name, vendor, driver):
    device = root / "devices" / name
    device.mkdir(parents=True)
    (device / "vendor").write_text(vendor + "\n")
    drivers = root / "bus" / "pci" / "drivers" / driver
    drivers.mkdir(parents=True, exist_ok=True)
    (device / "driver").symlink_to(drivers)
    node = root / "class" / "drm" / name
    node.mkdir(parents=True)
    (node / "device").symlink_to(device)


def test_xpu_counts_intel_render_nodes_with_intel_gpu_drivers(tmp_path):
    assert devices.xpu_count(str(tmp_path)) == 0
    _render_node(tmp_path, "renderD128", "0x8086", "i915")
    _render_node(tmp_path, "renderD129", "0x8086", "xe")
    _render_node(tmp_path, "renderD130", "0x10de", "nvidia")
    _render_node(tmp_path, "renderD131", "0x8086", "vfio-pci")
    assert devices.xpu_count(str(tmp_path)) == 2


def test_nproc_xpu_without_intel_gpus_says_so(monkeypatch):
    monkeypatch.setattr(devices, "xpu_count", lambda: 0)
    with pytest.raises(ValueError, match="'xpu' needs Intel GPUs"):
        count("xpu")


# AMD GPUs: the KFD topology, ROCR_VISIBLE_DEVICES, then HIP_VISIBLE_DEVICES (else CUDA_VISIBLE_DEVICES) ----------


# ROCr's UUIDs of four GPUs; the last has no unique id (some virtual functions report none)
AMD = ["GPU-0a1b2c3d4e5f6071", "GPU-0a1b2c3d4e5f6072", "GPU-5566778899aabbcc", ""]
AMD_VARIABLES = ("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")


def _kfd_node(root, node, simd_count, unique_id=0):
    """One node of the KFD topology as the amdgpu driver writes it (the fields ROCr reads, and others)."""
    properties = (f"cpu_cores_count {0 if simd_count else 16}\nsimd_count {simd_count}\nmem_banks_count 1\n"
                  f"location_id {node * 256}\ndomain 0\nunique_id {unique_id}\n")
    _write(root / "class" / "kfd" / "kfd" / "topology" / "nodes" / str(node) / "properties", properties.rstrip())


@pytest.fixture
def kfd_sysfs(tmp_path, monkeypatch):
    """A machine with the AMD GPUs of AMD: node 0 a CPU, nodes 1-4 the GPUs, node 5 another CPU; no NVIDIA GPU.

    The launcher's AMD counting reads this tree; no visibility variable is set.
    """
    _kfd_node(tmp_path, 0, 0)
    for node, uuid in enumerate(AMD, start=1):
        _kfd_node(tmp_path, node, 304, int(uuid[4:], 16) if uuid else 0)
    _kfd_node(tmp_path, 5, 0)
    physical = devices.amd_physical_gpus
    monkeypatch.setattr(devices, "amd_physical_gpus", lambda sysfs_root="/sys": physical(str(tmp_path)))
    monkeypatch.setattr(devices, "physical_gpus", lambda procfs_root="/proc": [])
    for name in AMD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return str(tmp_path)


def test_kfd_gpus_are_the_nodes_with_simds_in_node_order(tmp_path):
    assert devices.amd_physical_gpus(str(tmp_path)) == []
    _kfd_node(tmp_path, 0, 0)
    for node in range(1, 12):  # 10 and 11 sort after 9, as ROCr numbers them
        _kfd_node(tmp_path, node, 64, node)
    assert devices.amd_physical_gpus(str(tmp_path)) == [f"GPU-{node:016x}" for node in range(1, 12)]


def test_kfd_gpus_of_the_fixture(kfd_sysfs):
    assert devices.amd_physical_gpus() == AMD


@pytest.mark.parametrize(
    "visible, expected",
    [
        (None, [0, 1, 2, 3]),
        ("", []),  # set and empty: no GPU
        ("2,0", [2, 0]),
        (" 1 , 3 ", [1, 3]),  # entries are trimmed
        ("0x1,02", [1, 2]),  # C's strtol with base 0: hex and octal
        ("1,,2", [1, 0, 2]),  # strtol reads an empty entry as 0
        ("1,", [1]),  # a trailing comma adds nothing
        ("1gpu,2", []),  # an index must be all digits
        ("1,7,2", [1]),  # out of range ends the list
        ("1,-1,2", [1]),
        ("1,1,2", [1]),  # a repeated device ends the list
        ("0,1,2,3,0", [0, 1, 2, 3]),  # entries past the number of GPUs are not read
        ("GPU-0A1B2C3D4E5F6072", [1]),  # UUIDs in any case
        ("gpu-5566,0", [2, 0]),  # a prefix of at least 5 characters
        ("GPU-0a1b", []),  # a prefix naming two GPUs ends the list
        ("GPU-", []),  # too short
        ("GPU-0a1b2c3d4e5f60710", []),  # too long
    ],
)
def test_rocr_visible_devices(visible, expected):
    assert apply_rocr_visible_devices(AMD, visible) == [AMD[index] for index in expected]


@pytest.mark.parametrize(
    "visible, expected",
    [
        (None, [0, 1, 2, 3]),
        ("", [0, 1, 2, 3]),  # empty is unset for HIP
        ("2,0", [2, 0]),
        ("1,1,2", [1, 2]),  # a repeated device is skipped
        ("1,x,2", [1]),  # an invalid entry ends the list
        ("1,5,2", [1]),
        ("01", []),  # indices are plain decimal numbers
        ("+1", []),
        (" 1", []),
        ("GPU-5566778899aabbcc,0", [2, 0]),
        ("GPU-5566", [2]),  # a part of a GPU's UUID
        ("GPU-0A1B", []),  # case matters
        ("GPU-9999", []),
    ],
)
def test_hip_visible_devices(visible, expected):
    assert apply_hip_visible_devices(AMD, visible) == [AMD[index] for index in expected]


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({}, [0, 1, 2, 3]),
        ({"ROCR_VISIBLE_DEVICES": "3,1,2"}, [3, 1, 2]),
        ({"HIP_VISIBLE_DEVICES": "2"}, [2]),
        ({"CUDA_VISIBLE_DEVICES": "2,1"}, [2, 1]),
        ({"ROCR_VISIBLE_DEVICES": "3,1,2", "HIP_VISIBLE_DEVICES": "2,0"}, [2, 3]),  # HIP indexes what ROCr shows
        ({"ROCR_VISIBLE_DEVICES": "3,1,2", "CUDA_VISIBLE_DEVICES": "1"}, [1]),
        ({"HIP_VISIBLE_DEVICES": "0", "CUDA_VISIBLE_DEVICES": "1,2"}, [0]),  # HIP's variable wins
        ({"HIP_VISIBLE_DEVICES": "", "CUDA_VISIBLE_DEVICES": "2"}, [2]),  # an empty one does not
        ({"ROCR_VISIBLE_DEVICES": "GPU-0a1b2c3d4e5f6072", "HIP_VISIBLE_DEVICES": "GPU-0a1b2c3d4e5f6072"}, [1]),
        ({"ROCR_VISIBLE_DEVICES": "1", "HIP_VISIBLE_DEVICES": "1"}, []),  # one GPU left: index 1 is out of range
        ({"ROCR_VISIBLE_DEVICES": "", "HIP_VISIBLE_DEVICES": "0"}, []),
    ],
)
def test_amd_visible_gpus_apply_rocr_then_hip(kfd_sysfs, monkeypatch, settings, expected):
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    assert devices.amd_visible_gpus() == [AMD[index] for index in expected]


def test_nproc_gpu_and_auto_count_visible_amd_gpus(kfd_sysfs, monkeypatch):
    assert count("gpu") == count("auto") == 4
    monkeypatch.setenv("ROCR_VISIBLE_DEVICES", "3,1,2")
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "2,0")
    assert count("gpu") == count("auto") == 2


def test_nproc_gpu_with_hidden_amd_gpus_names_the_variables(kfd_sysfs, monkeypatch):
    monkeypatch.setenv("ROCR_VISIBLE_DEVICES", "2")
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "1")
    with pytest.raises(ValueError, match="ROCR_VISIBLE_DEVICES='2' and HIP_VISIBLE_DEVICES='1' hide every GPU"):
        count("gpu")


def test_nvidia_gpus_come_before_amd_gpus(fake_nvml, monkeypatch):
    monkeypatch.setattr(devices, "amd_physical_gpus", lambda sysfs_root="/sys": AMD)
    assert count("gpu") == 3


# Plug-in device types: torch's answer, from the workers' Python ------------------------------------


def test_plugin_device_type_is_counted_by_torch_in_the_workers_python(plugin_torch, monkeypatch):
    asked = []
    assert determine_local_world_size("npu", lambda: asked.append(1) or sys.executable) == 2
    assert asked == [1]
    assert determine_local_world_size("cpu", lambda: asked.append(1) or sys.executable) >= 1
    assert asked == [1]  # a device the launcher counts itself needs no Python


@pytest.mark.parametrize(
    "value, settings, message",
    [
        ("npu", {"STUB_NPU_COUNT": "0"}, "argument --nproc-per-node: npu is not available."),  # torchrun's words
        ("hpu", {}, "argument --nproc-per-node: Unsupported nproc_per_node value: hpu"),
        ("npu", {"STUB_TORCH_IMPORT_ERROR": "libtorch_cpu.so: cannot open shared object file"},
         "'npu' is not one of auto, cpu, gpu, xpu, and torch, which would count it, cannot be imported by the "
         f"workers' Python {sys.executable} (libtorch_cpu.so: cannot open shared object file)"),
    ],
)
def test_plugin_device_type_errors_are_torchs(plugin_torch, monkeypatch, value, settings, message):
    for name, setting in settings.items():
        monkeypatch.setenv(name, setting)
    with pytest.raises(ValueError) as error:
        count(value)
    assert str(error.value).endswith(message)


def test_plugin_device_type_without_the_workers_python_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"cannot ask torch in /nonexistent/python to count 'npu': .*No such file"):
        determine_local_world_size("npu", lambda: "/nonexistent/python")


def test_nproc_plugin_device_type_from_the_command_line(tmp_path):
    environment = clean_env(PYTHONPATH=PLUGIN_TORCH, STUB_NPU_COUNT=3, CLI_RECORD_DIR=tmp_path, LOGLEVEL="INFO")
    result = run_launcher("--nproc-per-node=npu", "--no-python", f"{WORKERS}/cli_record.sh", env=environment)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == [f"{rank}.args" for rank in range(3)]
    assert "setting nproc_per_node to 3 since the instance has 3 npu" in result.stderr

    missing = run_launcher("--nproc-per-node=npu", "--no-python", "true", env=clean_env(PYTHONPATH=PLUGIN_TORCH))
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == [
        "launcher: error: argument --nproc-per-node: npu is not available. (see launcher --help)"
    ]


# --numa-binding -----------------------------------------------------------------------------------


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


@pytest.fixture
def two_socket_sysfs(tmp_path):
    """Two sockets, each one NUMA node of 4 cores x 2 threads, two L3 complexes per node.

    CPUs 0-3 and 8-11 are node 0 (socket 0), 4-7 and 12-15 node 1 (socket 1);
    CPU n and n+8 are hyperthreads of one core. GPUs 0 and 1 sit on node 0,
    GPU 2 on node 1.
    """
    node_cpus = {0: [0, 1, 2, 3, 8, 9, 10, 11], 1: [4, 5, 6, 7, 12, 13, 14, 15]}
    for node, cpus in node_cpus.items():
        _write(tmp_path / f"devices/system/node/node{node}/cpulist", ",".join(map(str, cpus)))
        for cpu in cpus:
            core = cpu % 8
            base = tmp_path / f"devices/system/cpu/cpu{cpu}"
            _write(base / "topology/physical_package_id", str(node))
            _write(base / "topology/thread_siblings_list", f"{core},{core + 8}")
            complex_first = core - core % 2  # cores {0,1},{2,3},{4,5},{6,7} share an L3
            l3 = f"{complex_first}-{complex_first + 1},{complex_first + 8}-{complex_first + 9}"
            for index, (level, kind, shared) in enumerate(
                [(1, "Data", f"{core},{core + 8}"), (1, "Instruction", f"{core},{core + 8}"),
                 (2, "Unified", f"{core},{core + 8}"), (3, "Unified", l3)]
            ):
                _write(base / f"cache/index{index}/level", str(level))
                _write(base / f"cache/index{index}/type", kind)
                _write(base / f"cache/index{index}/shared_cpu_list", shared)
    for bus, node in zip(BUS_IDS, [0, 0, 1]):
        _write(tmp_path / f"bus/pci/devices/{bus}/numa_node", str(node))
    return str(tmp_path)


def bind(mode, nproc, sysfs, allowed=range(16)):
    return numa_bindings(mode, nproc, sysfs_root=sysfs, gpus=GPUS, allowed_cpus=set(allowed))


def test_numa_node_mode(two_socket_sysfs):
    node0, node1 = {0, 1, 2, 3, 8, 9, 10, 11}, {4, 5, 6, 7, 12, 13, 14, 15}
    assert bind("node", 3, two_socket_sysfs) == {0: (node0, {0}), 1: (node0, {0}), 2: (node1, {1})}


def test_numa_node_mode_keeps_only_allowed_cpus(two_socket_sysfs):
    assert bind("node", 1, two_socket_sysfs, allowed=[1, 2, 4])[0] == ({1, 2}, {0})


def test_numa_socket_mode(two_socket_sysfs):
    bindings = bind("socket", 3, two_socket_sysfs)
    assert bindings[0] == ({0, 1, 2, 3, 8, 9, 10, 11}, {0})
    assert bindings[2] == ({4, 5, 6, 7, 12, 13, 14, 15}, {1})


def test_numa_socket_mode_joins_the_nodes_of_one_socket(two_socket_sysfs):
    # Make node 1 part of socket 0: both nodes are then GPU 0's socket.
    for cpu in [4, 5, 6, 7, 12, 13, 14, 15]:
        _write(Path(two_socket_sysfs) / f"devices/system/cpu/cpu{cpu}/topology/physical_package_id", "0")
    assert bind("socket", 1, two_socket_sysfs)[0] == (set(range(16)), {0, 1})


def test_numa_exclusive_mode_splits_physical_cores(two_socket_sysfs):
    bindings = bind("exclusive", 3, two_socket_sysfs)
    assert bindings[0] == ({0, 1, 8, 9}, {0})  # node 0's four cores shared by GPUs 0 and 1
    assert bindings[1] == ({2, 3, 10, 11}, {0})
    assert bindings[2] == ({4, 5, 6, 7, 12, 13, 14, 15}, {1})


def test_numa_exclusive_mode_gives_lower_gpus_the_extra_core(two_socket_sysfs):
    bindings = bind("exclusive", 2, two_socket_sysfs, allowed=[0, 1, 2, 8, 9, 10])  # three cores on node 0
    assert bindings[0] == ({0, 1, 8, 9}, {0})
    assert bindings[1] == ({2, 10}, {0})


def test_numa_exclusive_mode_needs_a_core_per_gpu(two_socket_sysfs):
    with pytest.raises(ValueError, match="--numa-binding=exclusive.*1 physical core"):
        bind("exclusive", 2, two_socket_sysfs, allowed=[0, 8, 4])


def test_numa_core_complex_mode(two_socket_sysfs):
    bindings = bind("core-complex", 3, two_socket_sysfs)
    assert bindings[0] == ({0, 1, 8, 9}, {0})
    assert bindings[1] == ({2, 3, 10, 11}, {0})
    assert bindings[2] == ({4, 5, 12, 13}, {1})


def test_numa_core_complex_prefers_the_largest_complexes(two_socket_sysfs):
    bindings = bind("core-complex", 1, two_socket_sysfs, allowed=[0, 2, 3, 10])
    assert bindings[0] == ({2, 3, 10}, {0})


def test_numa_without_gpus_is_none(two_socket_sysfs):
    assert numa_bindings("node", 2, sysfs_root=two_socket_sysfs, gpus=[], allowed_cpus=set(range(16))) is None


def test_numa_more_workers_than_gpus_is_an_error(two_socket_sysfs):
    with pytest.raises(ValueError, match="4 workers per node but 3 visible GPU"):
        bind("node", 4, two_socket_sysfs)


def test_numa_single_node_machine_reports_minus_one(two_socket_sysfs):
    _write(Path(two_socket_sysfs) / f"bus/pci/devices/{BUS_IDS[2]}/numa_node", "-1")
    assert bind("node", 3, two_socket_sysfs)[2] == ({0, 1, 2, 3, 8, 9, 10, 11}, {0})


def test_numa_missing_topology_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="--numa-binding=node: cannot place the workers"):
        bind("node", 1, str(tmp_path))


def test_numa_bindings_default_to_the_visible_gpus(fake_nvml, two_socket_sysfs, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    bindings = numa_bindings("node", 1, sysfs_root=two_socket_sysfs, allowed_cpus=set(range(16)))
    assert bindings == {0: ({4, 5, 6, 7, 12, 13, 14, 15}, {1})}
