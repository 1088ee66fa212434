"""The installed GPU as the node sees it: what it has (memory, bandwidth, SMs, clocks) and what it can do.

For inference the GPU's memory size and bandwidth matter most: memory decides how many tiles fit in
one batch, bandwidth how fast activations stream; compute capability decides the precision (tensor
cores) and the peak arithmetic rate. ``read_profile`` reads a live GPU through pycuda's device
attributes and fills what the driver does not report (some clocks read 0 on recent drivers and in
virtual machines) from NVML. ``GpuProfile`` round-trips through JSON, so the logic that acts on a
profile is unit-tested on CPU-only machines against recorded ones (``tests/data/gpu_profiles``).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from node.errors import InferenceError

# FP32 lanes per SM (each does one fused multiply-add, 2 FLOP, per clock), by compute capability.
_FP32_LANES_PER_SM: dict[tuple[int, int], int] = {
    (6, 0): 64, (6, 1): 128, (6, 2): 128,
    (7, 0): 64, (7, 2): 64, (7, 5): 64,
    (8, 0): 64, (8, 6): 128, (8, 7): 128, (8, 9): 128,
    (9, 0): 128,
    (10, 0): 128, (10, 3): 128, (11, 0): 128, (12, 0): 128, (12, 1): 128,
}

# Dense FP16 tensor-core FLOP per SM per clock with FP32 accumulation (the data-centre parts' rate;
# GeForce parts of 8.6/8.9 run FP32 accumulation at half of it). BF16 runs at the FP16 rate from 8.0.
# Derived from NVIDIA's published peak figures: V100 125 TFLOP/s = 80 SM x 1.53 GHz x 1024; A100
# 312 = 108 x 1.41 x 2048; H100 SXM 989 = 132 x 1.83 x 4096.
_TENSOR_FP16_PER_SM: dict[tuple[int, int], int] = {
    (7, 0): 1024, (7, 2): 1024, (7, 5): 1024,
    (8, 0): 2048, (8, 6): 1024, (8, 7): 1024, (8, 9): 1024,
    (9, 0): 4096,
    (10, 0): 8192, (10, 3): 8192, (11, 0): 4096, (12, 0): 1024, (12, 1): 1024,
}


# Chips whose compute capability says tensor cores but that have none.
_NO_TENSOR_CORES = ("GTX 16",)


def _nearest_known(cc: tuple[int, int], table: dict[tuple[int, int], int]) -> int | None:
    """The table's value for ``cc``, or for the highest known capability of the same major version."""
    if cc in table:
        return table[cc]
    same_major = [k for k in table if k[0] == cc[0] and k <= cc]
    return table[max(same_major)] if same_major else None


@dataclass(frozen=True)
class GpuProfile:
    """One GPU, as read from the driver (or recorded from one)."""

    name: str
    compute_capability: tuple[int, int]
    total_memory_bytes: int
    free_memory_bytes: int
    sm_count: int
    sm_clock_khz: int           # peak SM clock
    memory_clock_khz: int       # peak memory clock (the rate the bus transfers twice per cycle)
    memory_bus_width_bits: int
    l2_cache_bytes: int = 0
    driver_version: str = ""
    source: str = ""            # where the figures came from ("pycuda", "pycuda+nvml", a recording's note)

    # ---------------------------------------------------------------------------- derived rates
    @property
    def cc_text(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    @property
    def peak_bandwidth_bytes_s(self) -> float:
        """Bus width × memory clock × 2 (double data rate): H100 SXM 5120 bit × 2.619 GHz × 2 = 3.35 TB/s."""
        return self.memory_bus_width_bits / 8 * self.memory_clock_khz * 1e3 * 2

    @property
    def has_tensor_cores(self) -> bool:
        """From Volta (7.0) on, except the Turing GTX 16xx chips (TU116/TU117), which have none."""
        return self.compute_capability >= (7, 0) and not any(n in self.name for n in _NO_TENSOR_CORES)

    @property
    def supports_bf16(self) -> bool:
        return self.compute_capability >= (8, 0)

    @property
    def peak_fp32_flops(self) -> float:
        lanes = _nearest_known(self.compute_capability, _FP32_LANES_PER_SM) or 64
        return self.sm_count * lanes * 2 * self.sm_clock_khz * 1e3

    def peak_flops(self, precision: str) -> float:
        """Peak dense FLOP/s for ``precision`` ("fp32", "fp16", "bf16") on this GPU."""
        if precision == "fp32" or not self.has_tensor_cores:
            return self.peak_fp32_flops
        if precision == "bf16" and not self.supports_bf16:
            return self.peak_fp32_flops
        per_sm = _nearest_known(self.compute_capability, _TENSOR_FP16_PER_SM)
        if per_sm is None:
            return self.peak_fp32_flops
        return self.sm_count * per_sm * self.sm_clock_khz * 1e3

    # ---------------------------------------------------------------------------- persistence
    def to_json(self) -> str:
        data = asdict(self)
        data["compute_capability"] = list(self.compute_capability)
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "profile") -> GpuProfile:
        try:
            major, minor = (int(v) for v in data["compute_capability"])
            return cls(
                name=str(data["name"]),
                compute_capability=(major, minor),
                total_memory_bytes=int(data["total_memory_bytes"]),
                free_memory_bytes=int(data["free_memory_bytes"]),
                sm_count=int(data["sm_count"]),
                sm_clock_khz=int(data["sm_clock_khz"]),
                memory_clock_khz=int(data["memory_clock_khz"]),
                memory_bus_width_bits=int(data["memory_bus_width_bits"]),
                l2_cache_bytes=int(data.get("l2_cache_bytes", 0)),
                driver_version=str(data.get("driver_version", "")),
                source=str(data.get("source", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InferenceError(f"{where} is not a GPU profile: {exc!r} "
                                 "(see node/infer/gpu/profile.py for the fields)") from exc

    @classmethod
    def load(cls, path: Path) -> GpuProfile:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InferenceError(f"cannot read the GPU profile {path}: {exc}") from exc
        return cls.from_dict(data, str(path))

    def with_free_memory(self, free_bytes: int) -> GpuProfile:
        return replace(self, free_memory_bytes=free_bytes)


# ------------------------------------------------------------------------------------ reading
def _nvml_figures(index: int) -> dict[str, int | str]:
    """Clocks, bus width, memory and driver from NVML (nvidia-ml-py); {} when NVML is unavailable."""
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except Exception:  # pynvml raises NVMLError subclasses
        return {}
    figures: dict[str, int | str] = {}
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        probes: dict[str, Any] = {
            "sm_clock_khz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM) * 1000,
            "memory_clock_khz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM) * 1000,
            "memory_bus_width_bits": lambda: pynvml.nvmlDeviceGetMemoryBusWidth(handle),
            "free_memory_bytes": lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).free,
            "driver_version": lambda: pynvml.nvmlSystemGetDriverVersion(),
        }
        for key, probe in probes.items():
            try:
                value = probe()
            except Exception:
                continue
            figures[key] = value.decode() if isinstance(value, bytes) else value
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return figures


def _cuda_version_text(version: int) -> str:
    """CUDA's integer version (major·1000 + minor·10) as text: 12040 → "12.4"."""
    return f"{version // 1000}.{(version % 1000) // 10}"


def read_profile(index: int = 0) -> GpuProfile:
    """Read GPU ``index`` through pycuda (and NVML for what pycuda's attributes leave at 0).

    Raises :class:`InferenceError` with the reason when pycuda or a GPU is missing.
    """
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise InferenceError(f"pycuda is not importable ({exc}); install the GPU extra: pip install '.[gpu]'") from exc
    try:
        cuda.init()
        count = cuda.Device.count()
        if index >= count:
            raise InferenceError(f"GPU {index} does not exist: the driver reports {count} GPU(s)")
        device = cuda.Device(index)
        attr = cuda.device_attribute

        def attribute(name: str) -> int:
            """The attribute, or 0 when this pycuda or driver does not know it (NVML fills it in)."""
            key = getattr(attr, name, None)
            if key is None:
                return 0
            try:
                return int(device.get_attribute(key))
            except Exception:  # pycuda.driver.Error: an attribute the driver rejects
                return 0

        context = device.make_context()
        try:
            free, total = cuda.mem_get_info()
        finally:
            context.pop()
            context.detach()
        major, minor = device.compute_capability()
        figures: dict[str, Any] = {
            "name": device.name(),
            "compute_capability": (major, minor),
            "total_memory_bytes": int(total),
            "free_memory_bytes": int(free),
            "sm_count": attribute("MULTIPROCESSOR_COUNT"),
            "sm_clock_khz": attribute("CLOCK_RATE"),
            "memory_clock_khz": attribute("MEMORY_CLOCK_RATE"),
            "memory_bus_width_bits": attribute("GLOBAL_MEMORY_BUS_WIDTH"),
            "l2_cache_bytes": attribute("L2_CACHE_SIZE"),
            "driver_version": _cuda_version_text(cuda.get_driver_version()),
        }
    except InferenceError:
        raise
    except Exception as exc:  # pycuda.driver.Error and its subclasses
        raise InferenceError(f"CUDA cannot read GPU {index}: {exc}") from exc
    source = "pycuda"
    missing = [k for k in ("sm_clock_khz", "memory_clock_khz", "memory_bus_width_bits") if not figures[k]]
    nvml = _nvml_figures(index)
    if missing and nvml:
        for key in missing:
            if nvml.get(key):
                figures[key] = int(nvml[key])
        source = "pycuda+nvml"
    if nvml.get("driver_version"):
        figures["driver_version"] = str(nvml["driver_version"])
    still_missing = [k for k in ("sm_clock_khz", "memory_clock_khz", "memory_bus_width_bits") if not figures[k]]
    if still_missing:
        source += f" ({', '.join(still_missing)} unknown: install nvidia-ml-py)"
    figures["source"] = source
    return GpuProfile.from_dict(figures, f"GPU {index}")
