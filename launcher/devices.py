"""Counting this node's devices and placing workers near them, without torch.

NVIDIA GPUs are found through NVML (ctypes on ``libnvidia-ml.so.1``; the
environment variable ``LAUNCHER_NVML_LIBRARY`` names another library file),
else through ``/proc/driver/nvidia/gpus``; a machine without the NVIDIA driver
has none. ``CUDA_VISIBLE_DEVICES`` is applied as CUDA applies it. Devices are
in NVML order (PCI bus order), which is CUDA's order on machines of one GPU
model and with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``.

AMD GPUs are the compute nodes of the KFD topology in sysfs, with
``ROCR_VISIBLE_DEVICES`` applied as the ROCr runtime applies it, then
``HIP_VISIBLE_DEVICES`` (else ``CUDA_VISIBLE_DEVICES``) as HIP applies it to
what remains: the count torch's ROCm build gets from ``hipGetDeviceCount``.

A device type torch knows only through a plug-in backend (``npu``, ...) is
counted by one call of the workers' Python, which imports torch and answers
as torchrun's ``determine_local_world_size`` does.
"""
from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("launcher")

NVML_LIBRARY = "libnvidia-ml.so.1"
NPROC_KINDS = ("auto", "cpu", "gpu", "xpu")  # counted here; another device type is torch's to count
NPROC_EXPECTED = f"a number >= 1, one of {', '.join(NPROC_KINDS)}, or a torch device type (npu, ...)"
NUMA_MODES = ("node", "socket", "exclusive", "core-complex")
INTEL_VENDOR = "0x8086"
INTEL_GPU_DRIVERS = ("i915", "xe")
KFD_NODES = ("class", "kfd", "kfd", "topology", "nodes")  # under the sysfs root
# torch's device type names are identifiers; anything else is no device
DEVICE_TYPE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PLUGIN_COUNT_TIMEOUT = 300.0  # seconds for the workers' Python to import torch and its plug-ins, and count

# Run by the workers' Python: torchrun's determine_local_world_size for a privateuse1 backend
# (torch.utils.backend_registration._get_custom_mod_func's lookup and messages), as one JSON line.
_PLUGIN_COUNT = """\
import json, sys
name = sys.argv[1]
try:
    import torch
    if name != torch._C._get_privateuse1_backend_name():
        raise ValueError(f"Unsupported nproc_per_node value: {name}")
    def custom(func_name):
        function = getattr(getattr(torch, name, None), func_name, None)
        if function is None:
            raise RuntimeError(
                f"Try to call torch.{name}.{func_name}. The backend must register a custom backend module with "
                f"`torch._register_device_module('{name}', BackendModule)`. And BackendModule needs to have the "
                f"following API's:\\n `{func_name}(*args, **kwargs)`. \\n")
        return function
    if not custom("is_available")():
        raise ValueError(f"{name} is not available.")
    answer = {"count": int(custom("device_count")())}
except Exception as error:
    answer = {"error": type(error).__name__, "message": str(error)}
print(json.dumps(answer))
"""


@dataclass(frozen=True)
class Gpu:
    uuid: str  # "GPU-<uuid>" (empty for a MIG instance named in CUDA_VISIBLE_DEVICES)
    pci_bus_id: str  # sysfs form "0000:3b:00.0" ("" for a MIG instance)


class NvmlError(Exception):
    pass


def _nvml_gpus(library: str) -> list[Gpu]:
    """Every GPU NVML reports, in NVML order; NvmlError or OSError when NVML is unusable."""
    import ctypes  # here: only counting GPUs needs it, not the launcher's start-up

    class PciInfo(ctypes.Structure):
        # nvmlPciInfo_t (v3). The integer fields sit at the same offsets in every
        # version of the struct, and the buffer is large enough for all of them.
        _fields_ = [
            ("busIdLegacy", ctypes.c_char * 16),
            ("domain", ctypes.c_uint),
            ("bus", ctypes.c_uint),
            ("device", ctypes.c_uint),
            ("pciDeviceId", ctypes.c_uint),
            ("pciSubSystemId", ctypes.c_uint),
            ("busId", ctypes.c_char * 32),
        ]

    nvml = ctypes.CDLL(library)

    def check(name: str, rc: int) -> None:
        if rc != 0:
            raise NvmlError(f"{name} returned {rc}")

    check("nvmlInit_v2", nvml.nvmlInit_v2())
    try:
        count = ctypes.c_uint()
        check("nvmlDeviceGetCount_v2", nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)))
        gpus = []
        for index in range(count.value):
            handle = ctypes.c_void_p()
            check("nvmlDeviceGetHandleByIndex_v2", nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)))
            uuid = ctypes.create_string_buffer(96)
            check("nvmlDeviceGetUUID", nvml.nvmlDeviceGetUUID(handle, uuid, len(uuid)))
            pci = PciInfo()
            check("nvmlDeviceGetPciInfo", nvml.nvmlDeviceGetPciInfo(handle, ctypes.byref(pci)))
            gpus.append(Gpu(uuid.value.decode("ascii"), f"{pci.domain:04x}:{pci.bus:02x}:{pci.device:02x}.0"))
        return gpus
    finally:
        nvml.nvmlShutdown()


def _procfs_gpus(procfs_root: str) -> list[Gpu]:
    """The GPUs the driver lists in ``<procfs_root>/driver/nvidia/gpus/<bus id>/information``."""
    gpus = []
    for directory in sorted(glob.glob(os.path.join(procfs_root, "driver", "nvidia", "gpus", "*"))):
        uuid = ""
        with open(os.path.join(directory, "information")) as information:
            for line in information:
                key, _, value = line.partition(":")
                if key.strip() == "GPU UUID":
                    uuid = value.strip()
        gpus.append(Gpu(uuid, os.path.basename(directory).lower()))
    return gpus


def physical_gpus(procfs_root: str = "/proc") -> list[Gpu]:
    """Every NVIDIA GPU of this machine, whatever CUDA_VISIBLE_DEVICES says."""
    library = os.environ.get("LAUNCHER_NVML_LIBRARY", NVML_LIBRARY)
    try:
        return _nvml_gpus(library)
    except (OSError, AttributeError, NvmlError) as error:
        log.debug("NVML (%s) unusable (%s); reading %s/driver/nvidia/gpus", library, error, procfs_root)
    return _procfs_gpus(procfs_root)


def _leading_int(text: str) -> int:
    """CUDA reads each CUDA_VISIBLE_DEVICES entry like strtoul: ``1gpu`` is 1; -1 when no digits lead."""
    digits = "".join(itertools.takewhile(str.isdigit, text.lstrip("+")))
    if text.startswith("-") or not digits:
        return -1
    return int(digits)


def apply_visible_devices(gpus: list[Gpu], visible: str | None) -> list[Gpu]:
    """The GPUs CUDA shows for ``CUDA_VISIBLE_DEVICES=visible``, in that order.

    Unset: all of them. Entries are indices, ``GPU-<uuid prefix>`` or
    ``MIG-<uuid>``; the first invalid entry (out of range, no or several
    matching GPUs, another kind) ends the list, and a repeated device empties
    it, as in CUDA.
    """
    if visible is None:
        return list(gpus)
    entries = [entry.strip() for entry in visible.split(",")]
    chosen: list[Gpu] = []
    if entries[0].startswith("MIG-"):
        # A MIG instance is one CUDA device; NVML's plain API does not map it to its parent.
        names = list(itertools.takewhile(lambda entry: entry.startswith("MIG-"), entries))
        return [] if len(set(names)) != len(names) else [Gpu("", "") for _ in names]
    for entry in entries:
        if entries[0].startswith("GPU-"):
            matches = [gpu for gpu in gpus if entry.startswith("GPU-") and gpu.uuid.startswith(entry)]
            if len(matches) != 1:
                break
            gpu = matches[0]
        else:
            index = _leading_int(entry)
            if not 0 <= index < len(gpus):
                break
            gpu = gpus[index]
        if gpu in chosen:
            return []
        chosen.append(gpu)
    return chosen


def visible_gpus(procfs_root: str = "/proc") -> list[Gpu]:
    """The NVIDIA GPUs this node's workers can use, in CUDA order."""
    return apply_visible_devices(physical_gpus(procfs_root), os.environ.get("CUDA_VISIBLE_DEVICES"))


def xpu_count(sysfs_root: str = "/sys") -> int:
    """Intel GPUs: render nodes whose PCI vendor is Intel and whose driver is i915 or xe."""
    count = 0
    for render_node in glob.glob(os.path.join(sysfs_root, "class", "drm", "renderD*")):
        device = os.path.join(render_node, "device")
        try:
            with open(os.path.join(device, "vendor")) as vendor:
                is_intel = vendor.read().strip() == INTEL_VENDOR
            driver = os.path.basename(os.readlink(os.path.join(device, "driver")))
        except OSError:
            continue
        if is_intel and driver in INTEL_GPU_DRIVERS:
            count += 1
    return count


def amd_physical_gpus(sysfs_root: str = "/sys") -> list[str]:
    """Every AMD GPU of this machine in ROCr's order, by UUID (``GPU-<16 hex digits>``; "" when it has none).

    The GPUs are the KFD topology's nodes with SIMDs (``simd_count`` > 0 in
    ``properties``; CPU nodes have none), in node order.
    """
    nodes = glob.glob(os.path.join(sysfs_root, *KFD_NODES, "[0-9]*", "properties"))
    uuids = []
    for path in sorted(nodes, key=lambda path: int(os.path.basename(os.path.dirname(path)))):
        with open(path) as properties:
            values = dict(line.split(None, 1) for line in properties if len(line.split()) == 2)
        if int(values.get("simd_count", "0")) > 0:
            unique_id = int(values.get("unique_id", "0"))
            uuids.append(f"GPU-{unique_id:016x}" if unique_id else "")
    return uuids


def _strtol_whole(text: str) -> int | None:
    """C's ``strtol(text, &end, 0)`` when it reads all of ``text`` (``0x`` hex, ``0`` octal, "" is 0), else None."""
    if not text:
        return 0
    match = re.fullmatch(r"([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", text)
    if match is None:
        return None
    sign, digits = match.groups()
    value = int(digits, 16) if digits[:2].lower() == "0x" else int(digits, 8) if digits[0] == "0" else int(digits)
    return -value if sign == "-" else value


def apply_rocr_visible_devices(gpus: list[str], visible: str | None) -> list[str]:
    """The GPUs the ROCr runtime shows for ``ROCR_VISIBLE_DEVICES=visible``, in that order.

    Unset: all of them; empty: none. Entries (trimmed) are indices as C's
    strtol reads them (``0x1`` is 1, an empty entry 0) or UUID prefixes of 5
    to 20 characters, in any case, naming exactly one GPU; the first invalid
    or repeated entry ends the list, and entries past the number of GPUs are
    not read.
    """
    if visible is None:
        return list(gpus)
    tokens = visible.split(",") if visible else []
    if tokens and tokens[-1] == "":  # ROCr splits with getline: a trailing comma adds no entry
        tokens.pop()
    chosen: list[int] = []
    for token in (token.strip().upper() for token in tokens[: len(gpus)]):
        if token.startswith("G"):
            matches = [i for i, uuid in enumerate(gpus) if uuid and uuid.upper().startswith(token)]
            index = matches[0] if 5 <= len(token) <= 20 and len(matches) == 1 else None
        else:
            index = _strtol_whole(token)
        if index is None or not 0 <= index < len(gpus) or index in chosen:
            break
        chosen.append(index)
    return [gpus[index] for index in chosen]


def apply_hip_visible_devices(gpus: list[str], visible: str | None) -> list[str]:
    """The GPUs HIP shows for ``HIP_VISIBLE_DEVICES=visible`` (else ``CUDA_VISIBLE_DEVICES``), in that order.

    Unset or empty: all of them. Entries are plain decimal indices or a
    ``GPU-...`` string found in a GPU's UUID; the first invalid entry ends the
    list; a repeated device is skipped.
    """
    if not visible:
        return list(gpus)
    chosen: list[int] = []
    for token in visible.split(","):
        if "GPU-" in token:
            token = next((str(index) for index, uuid in enumerate(gpus) if uuid and token in uuid), token)
        if not (token.isdigit() and str(int(token)) == token and int(token) < len(gpus)):
            break
        if int(token) not in chosen:
            chosen.append(int(token))
    return [gpus[index] for index in chosen]


def amd_visible_gpus(sysfs_root: str = "/sys") -> list[str]:
    """The AMD GPUs this node's workers can use: ROCR_VISIBLE_DEVICES first, then HIP's variable on what remains."""
    rocr = apply_rocr_visible_devices(amd_physical_gpus(sysfs_root), os.environ.get("ROCR_VISIBLE_DEVICES"))
    hip = os.environ.get("HIP_VISIBLE_DEVICES") or os.environ.get("CUDA_VISIBLE_DEVICES")
    return apply_hip_visible_devices(rocr, hip)


def usable_cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, as cgroups and taskset set it)."""
    return len(os.sched_getaffinity(0))


def nproc_per_node_ok(value: str) -> bool:
    """``--nproc-per-node``'s syntax (:data:`NPROC_EXPECTED`); which device types exist, torch decides."""
    return (value.isdigit() and int(value) >= 1) or DEVICE_TYPE_NAME.fullmatch(value) is not None


def determine_local_world_size(nproc_per_node: str, worker_python: Callable[[], str]) -> int:
    """Workers per node for ``--nproc-per-node``, as torchrun's ``determine_local_world_size``.

    A number; ``cpu``; ``gpu`` (NVIDIA, else AMD GPUs); ``xpu``; ``auto``
    (GPUs, else Intel GPUs, else CPUs); any other device type name is asked
    of torch in ``worker_python()`` (its privateuse1 backend: ``npu``, ...).
    """
    if not nproc_per_node_ok(nproc_per_node):
        raise ValueError(f"argument --nproc-per-node: expected {NPROC_EXPECTED}, got {nproc_per_node!r}")
    if nproc_per_node.isdigit():
        return int(nproc_per_node)
    if nproc_per_node == "cpu":
        count, kind = usable_cpu_count(), "cpu"
    elif nproc_per_node == "gpu":
        count, kind = gpu_count(), "gpu"
        if count == 0:
            raise ValueError(f"argument --nproc-per-node: 'gpu' needs CUDA or ROCm GPUs and {_why_no_gpus()}")
    elif nproc_per_node == "xpu":
        count, kind = xpu_count(), "xpu"
        if count == 0:
            raise ValueError(
                "argument --nproc-per-node: 'xpu' needs Intel GPUs and none were found "
                f"(no /sys/class/drm/renderD* with vendor {INTEL_VENDOR} and driver {' or '.join(INTEL_GPU_DRIVERS)})"
            )
    elif nproc_per_node == "auto":
        count, kind = gpu_count(), "gpu"
        if count == 0:
            count, kind = xpu_count(), "xpu"
        if count == 0:
            count, kind = usable_cpu_count(), "cpu"
    else:
        count, kind = plugin_device_count(nproc_per_node, worker_python()), nproc_per_node
    log.info(
        "Using nproc_per_node=%s, setting nproc_per_node to %s since the instance has %s %s",
        nproc_per_node,
        count,
        count,
        kind,
    )
    return count


def gpu_count() -> int:
    """The GPUs torch's CUDA or ROCm build would count: NVIDIA's when there are any, else AMD's."""
    nvidia = physical_gpus()
    if nvidia:
        return len(apply_visible_devices(nvidia, os.environ.get("CUDA_VISIBLE_DEVICES")))
    return len(amd_visible_gpus())


def plugin_device_count(device_type: str, python: str) -> int:
    """The devices of a torch plug-in backend, counted by torch in ``python``; ValueError with torch's reason."""
    import subprocess  # here: only a plug-in's count needs it, not the launcher's start-up

    try:
        result = subprocess.run(
            [python, "-c", _PLUGIN_COUNT, device_type],
            capture_output=True,
            text=True,
            timeout=PLUGIN_COUNT_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ValueError(
            f"argument --nproc-per-node: cannot ask torch in {python} to count {device_type!r}: {error}"
        ) from None
    lines = result.stdout.splitlines()
    try:
        answer = json.loads(lines[-1])
    except (IndexError, ValueError):
        stderr = result.stderr.strip().splitlines()
        raise ValueError(
            f"argument --nproc-per-node: {python} exited {result.returncode} while torch counted {device_type!r}"
            + (f": {stderr[-1]}" if stderr else "")
        ) from None
    if "count" in answer:
        return answer["count"]
    if answer["error"] in ("ImportError", "ModuleNotFoundError"):
        raise ValueError(
            f"argument --nproc-per-node: {device_type!r} is not one of {', '.join(NPROC_KINDS)}, and torch, which "
            f"would count it, cannot be imported by the workers' Python {python} ({answer['message']})"
        )
    # torchrun's ValueErrors are its message; other errors keep their type, as torchrun's traceback shows them
    reason = answer["message"] if answer["error"] == "ValueError" else f"{answer['error']}: {answer['message']}"
    raise ValueError(f"argument --nproc-per-node: {reason}")


def _why_no_gpus() -> str:
    if physical_gpus():
        return f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} hides every GPU"
    if amd_physical_gpus():
        hidden_by = [
            f"{name}={os.environ[name]!r}"
            for name in ("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")
            if name in os.environ
        ]
        return f"{' and '.join(hidden_by)} hide every GPU"
    return (
        "none were found (no NVIDIA driver: NVML and /proc/driver/nvidia/gpus list no GPU; "
        "no AMD GPU in /sys/class/kfd/kfd/topology/nodes)"
    )


# NUMA placement ---------------------------------------------------------------------------------


def parse_cpu_list(text: str) -> set[int]:
    """sysfs lists such as ``0-3,8,10-11``."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


class _Topology:
    """The sysfs facts the NUMA modes need, read under ``sysfs_root``."""

    def __init__(self, sysfs_root: str, allowed_cpus: set[int]):
        self.root = sysfs_root
        self.allowed = allowed_cpus

    def read(self, *parts: str) -> str:
        with open(os.path.join(self.root, *parts)) as f:
            return f.read().strip()

    def gpu_node(self, gpu: Gpu) -> int:
        # One-node machines often report -1: that node is node 0.
        return max(int(self.read("bus", "pci", "devices", gpu.pci_bus_id, "numa_node")), 0)

    def node_cpus(self, node: int) -> set[int]:
        return parse_cpu_list(self.read("devices", "system", "node", f"node{node}", "cpulist")) & self.allowed

    def nodes(self) -> list[int]:
        paths = glob.glob(os.path.join(self.root, "devices", "system", "node", "node[0-9]*"))
        return sorted(int(os.path.basename(path)[4:]) for path in paths)

    def socket(self, cpu: int) -> int:
        return int(self.read("devices", "system", "cpu", f"cpu{cpu}", "topology", "physical_package_id"))

    def core(self, cpu: int) -> int:
        """A physical core, named by its lowest logical CPU; a CPU without the file is its own core."""
        try:
            siblings = self.read("devices", "system", "cpu", f"cpu{cpu}", "topology", "thread_siblings_list")
            return min(parse_cpu_list(siblings))
        except FileNotFoundError:
            return cpu

    def core_complex(self, cpu: int) -> int:
        """The CPUs sharing ``cpu``'s last-level (unified or data) cache, named by the lowest."""
        cache_dir = os.path.join("devices", "system", "cpu", f"cpu{cpu}", "cache")
        best_level, shared = -1, {cpu}
        for index in sorted(glob.glob(os.path.join(self.root, cache_dir, "index[0-9]*"))):
            name = os.path.basename(index)
            if self.read(cache_dir, name, "type") not in ("Unified", "Data"):
                continue
            level = int(self.read(cache_dir, name, "level"))
            if level > best_level:
                best_level, shared = level, parse_cpu_list(self.read(cache_dir, name, "shared_cpu_list"))
        return min(shared)


def _group(cpus: set[int], key) -> list[set[int]]:
    groups: dict[int, set[int]] = {}
    for cpu in cpus:
        groups.setdefault(key(cpu), set()).add(cpu)
    return [groups[name] for name in sorted(groups)]


def numa_bindings(
    mode: str,
    local_world_size: int,
    *,
    sysfs_root: str = "/sys",
    gpus: list[Gpu] | None = None,
    allowed_cpus: set[int] | None = None,
) -> dict[int, tuple[set[int], set[int]]] | None:
    """``{local rank: (cpus, memory nodes)}`` near each local rank's GPU, or None without GPUs.

    Local rank ``i`` uses the ``i``-th visible GPU. Modes (torch's AffinityMode):
    ``node``: the CPUs of the GPU's NUMA node; ``socket``: the CPUs of every
    node on that node's socket; ``exclusive``: the node's physical cores split
    evenly among the GPUs on that node (lower GPUs get the extra core);
    ``core-complex``: one group of CPUs sharing a last-level cache, a different
    one per GPU on the node while they last. Only CPUs this process may use
    count. Raises ValueError when the topology does not allow the binding.
    """
    if mode not in NUMA_MODES:
        raise ValueError(f"argument --numa-binding: expected one of {', '.join(NUMA_MODES)}, got {mode!r}")
    gpus = visible_gpus() if gpus is None else gpus
    if not gpus:
        return None
    if local_world_size > len(gpus):
        raise ValueError(
            f"argument --numa-binding: {local_world_size} workers per node but {len(gpus)} visible GPU(s); "
            "each worker is bound near the GPU of its local rank"
        )
    if any(not gpu.pci_bus_id for gpu in gpus[:local_world_size]):
        raise ValueError(
            "argument --numa-binding: MIG instances in CUDA_VISIBLE_DEVICES have no PCI location to bind near"
        )
    topology = _Topology(sysfs_root, os.sched_getaffinity(0) if allowed_cpus is None else allowed_cpus)
    try:
        gpu_nodes = [topology.gpu_node(gpu) for gpu in gpus]
        return {rank: _binding(mode, rank, gpu_nodes, topology) for rank in range(local_world_size)}
    except (OSError, ValueError) as error:
        raise ValueError(f"argument --numa-binding={mode}: cannot place the workers: {error}") from None


def _binding(mode: str, rank: int, gpu_nodes: list[int], topology: _Topology) -> tuple[set[int], set[int]]:
    node = gpu_nodes[rank]
    node_cpus = topology.node_cpus(node)
    if not node_cpus:
        raise ValueError(f"NUMA node {node} (of GPU {rank}) has no CPU this process may use")
    peers = [index for index, other in enumerate(gpu_nodes) if other == node]
    position = peers.index(rank)
    if mode == "node":
        return node_cpus, {node}
    if mode == "socket":
        socket = topology.socket(min(node_cpus))
        nodes = {
            other
            for other in topology.nodes()
            if (cpus := topology.node_cpus(other)) and topology.socket(min(cpus)) == socket
        }
        return set().union(*(topology.node_cpus(other) for other in nodes)), nodes
    if mode == "exclusive":
        cores = _group(node_cpus, topology.core)
        share, extra = divmod(len(cores), len(peers))
        if share < 1:
            raise ValueError(f"NUMA node {node} has {len(cores)} physical core(s) for {len(peers)} GPUs")
        start = position * share + min(position, extra)
        end = start + share + (1 if position < extra else 0)
        return set().union(*cores[start:end]), {node}
    complexes = sorted(_group(node_cpus, topology.core_complex), key=lambda cpus: (-len(cpus), min(cpus)))
    return complexes[position % len(complexes)], {node}
