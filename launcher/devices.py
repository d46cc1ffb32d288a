"""Counting this node's devices and placing workers near them, without torch.

GPUs are found through NVML (ctypes on ``libnvidia-ml.so.1``; the environment
variable ``LAUNCHER_NVML_LIBRARY`` names another library file), else through
``/proc/driver/nvidia/gpus``; a machine without the NVIDIA driver has none.
``CUDA_VISIBLE_DEVICES`` is applied as CUDA applies it. Devices are in NVML
order (PCI bus order), which is CUDA's order on machines of one GPU model and
with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``.
"""
from __future__ import annotations

import ctypes
import glob
import itertools
import logging
import os
from dataclasses import dataclass

log = logging.getLogger("launcher")

NVML_LIBRARY = "libnvidia-ml.so.1"
NPROC_KINDS = ("auto", "cpu", "gpu", "xpu")
NUMA_MODES = ("node", "socket", "exclusive", "core-complex")
INTEL_VENDOR = "0x8086"
INTEL_GPU_DRIVERS = ("i915", "xe")


@dataclass(frozen=True)
class Gpu:
    uuid: str  # "GPU-<uuid>" (empty for a MIG instance named in CUDA_VISIBLE_DEVICES)
    pci_bus_id: str  # sysfs form "0000:3b:00.0" ("" for a MIG instance)


class _PciInfo(ctypes.Structure):
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


class NvmlError(Exception):
    pass


def _nvml_gpus(library: str) -> list[Gpu]:
    """Every GPU NVML reports, in NVML order; NvmlError or OSError when NVML is unusable."""
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
            pci = _PciInfo()
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


def usable_cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, as cgroups and taskset set it)."""
    return len(os.sched_getaffinity(0))


def determine_local_world_size(nproc_per_node: str) -> int:
    """Workers per node for ``--nproc-per-node``: a number, ``cpu``, ``gpu``, ``xpu`` or ``auto``."""
    if nproc_per_node.isdigit() and int(nproc_per_node) > 0:
        return int(nproc_per_node)
    if nproc_per_node == "cpu":
        count, kind = usable_cpu_count(), "cpu"
    elif nproc_per_node == "gpu":
        count, kind = len(visible_gpus()), "gpu"
        if count == 0:
            raise ValueError(f"argument --nproc-per-node: 'gpu' needs CUDA GPUs and {_why_no_gpus()}")
    elif nproc_per_node == "xpu":
        count, kind = xpu_count(), "xpu"
        if count == 0:
            raise ValueError(
                "argument --nproc-per-node: 'xpu' needs Intel GPUs and none were found "
                f"(no /sys/class/drm/renderD* with vendor {INTEL_VENDOR} and driver {' or '.join(INTEL_GPU_DRIVERS)})"
            )
    elif nproc_per_node == "auto":
        count, kind = len(visible_gpus()), "gpu"
        if count == 0:
            count, kind = xpu_count(), "xpu"
        if count == 0:
            count, kind = usable_cpu_count(), "cpu"
    else:
        raise ValueError(
            f"argument --nproc-per-node: expected a number >= 1 or one of {', '.join(NPROC_KINDS)}, "
            f"got {nproc_per_node!r}"
        )
    log.info(
        "Using nproc_per_node=%s, setting nproc_per_node to %s since the instance has %s %s",
        nproc_per_node,
        count,
        count,
        kind,
    )
    return count


def _why_no_gpus() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and physical_gpus():
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    return "none were found (no NVIDIA driver: NVML and /proc/driver/nvidia/gpus list no GPU)"


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
