"""The CPU this process runs on: its model, the vector and matrix units it has, its cores and clock, and
the peak arithmetic rate those give for each precision.

Read from ``/proc/cpuinfo`` and sysfs (Linux; elsewhere the flags are unknown and BF16 is never chosen).
The flags that matter for inference (:data:`ISA_FLAGS`) are part of the OpenVINO model cache's key, so a
model compiled on one CPU is never reused on another with different units.

The peak (what ``engines bench`` divides by) is ``cores × clock × FLOP per cycle per core``:

- FP32: two FMA pipes × the datapath's FP32 lanes × 2 (an FMA is two FLOPs). The datapath is 512 bits
  with AVX-512 (Intel Xeon Scalable, AMD Zen 5), 256 bits on AMD Zen 4 and older even with AVX-512 (it
  executes a 512-bit instruction as two halves) and with AVX2, 128 bits otherwise. Two pipes is the
  Xeon Gold/Platinum and Zen figure; a one-FMA-unit Xeon (Silver, Bronze) reaches half of it.
- BF16 with AVX-512 BF16 (``VDPBF16PS``): twice the FP32 rate (each FP32 lane takes two BF16 products).
- BF16 with AMX-BF16: 1,024 FLOP per cycle per core (one tile multiply unit: a 16×32 by 32×16 BF16 tile
  product, 8,192 multiply-adds, every 16 cycles) — Intel's figure for Sapphire Rapids and later.
- cores: physical cores this process may run on (its affinity mask), or ``engines.threads`` when fewer;
  hyper-threads share their core's units and add nothing to the peak.
- clock: the highest frequency cpufreq reports, else the current one from ``/proc/cpuinfo`` (a virtual
  machine's nominal clock). Heavy AVX-512/AMX code runs below the highest turbo on Intel, so the peak is
  an upper bound.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from node.errors import InferenceError

#: The instruction-set flags that decide how OpenVINO compiles a network (and so key its cache).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile",
             "amx_bf16", "amx_int8", "amx_fp16")
#: FLOP per cycle per core of one AMX tile multiply unit in BF16 (16×32×16 multiply-adds every 16 cycles, ×2).
AMX_BF16_FLOP_PER_CYCLE = 1024
FMA_PIPES = 2
SYS_CPU = Path("/sys/devices/system/cpu")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    vendor: str  # GenuineIntel, AuthenticAMD, … ("" when unknown)
    family: int  # the x86 family (AMD: 25 = Zen 3/4, 26 = Zen 5); 0 when unknown
    flags: frozenset[str]
    logical_cpus: int  # CPUs this process may run on
    cores: int  # physical cores among them
    clock_mhz: float
    clock_source: str  # where clock_mhz was read ("" when unknown)

    @property
    def isa(self) -> tuple[str, ...]:
        """The flags of :data:`ISA_FLAGS` this CPU has, in that order."""
        return tuple(f for f in ISA_FLAGS if f in self.flags)

    @property
    def has_amx_bf16(self) -> bool:
        return "amx_bf16" in self.flags

    @property
    def has_avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.flags

    @property
    def vnni(self) -> tuple[str, ...]:
        """The INT8 dot-product units present (VNNI in AVX-512 or AVX, AMX-INT8)."""
        return tuple(f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in self.flags)

    @property
    def bf16_unit(self) -> str | None:
        """The unit that runs BF16 arithmetic natively: "AMX-BF16", "AVX-512 BF16", or None."""
        if self.has_amx_bf16:
            return "AMX-BF16"
        if self.has_avx512_bf16:
            return "AVX-512 BF16"
        return None

    @property
    def datapath_bits(self) -> int:
        """Width of one FMA pipe (see the module docstring)."""
        if "avx512f" in self.flags:
            return 256 if self.vendor == "AuthenticAMD" and self.family < 26 else 512
        return 256 if "avx2" in self.flags else 128

    def units(self) -> str:
        """The units doctor shows: "AMX-BF16 no, AVX-512 BF16 yes, VNNI yes (avx512_vnni), AVX-512 yes"."""
        def yes(present: bool) -> str:
            return "yes" if present else "no"
        vnni = f"yes ({', '.join(self.vnni)})" if self.vnni else "no"
        return (f"AMX-BF16 {yes(self.has_amx_bf16)}, AVX-512 BF16 {yes(self.has_avx512_bf16)}, VNNI {vnni}, "
                f"AVX-512 {yes('avx512f' in self.flags)}")

    def describe(self) -> str:
        clock = f"{self.clock_mhz:,.0f} MHz ({self.clock_source})" if self.clock_mhz else "clock unknown"
        return (f"{self.model}: {self.cores} core(s), {self.logical_cpus} CPU(s) usable, {clock}; {self.units()}")


@dataclass(frozen=True)
class Peak:
    flops: float  # FLOP/s
    how: str  # the arithmetic, for the bench's footnote


def peak(cpu: CpuInfo, precision: str, threads: int = 0) -> Peak:
    """This CPU's peak FLOP/s for ``precision`` ("fp32" or "bf16") on ``threads`` threads (0: every core)."""
    if precision not in ("fp32", "bf16"):
        raise InferenceError(f"precision {precision!r} has no CPU peak; expected 'fp32' or 'bf16'")
    cores = min(cpu.cores, threads) if threads > 0 else cpu.cores
    lanes = cpu.datapath_bits // 32
    fma = 2 if "fma" in cpu.flags or "avx512f" in cpu.flags else 1
    per_cycle = FMA_PIPES * lanes * fma
    unit = f"{FMA_PIPES} × {cpu.datapath_bits}-bit {'FMA' if fma == 2 else 'mul/add'} pipes, FP32"
    if precision == "bf16":
        if cpu.has_amx_bf16:
            per_cycle, unit = AMX_BF16_FLOP_PER_CYCLE, "AMX-BF16 tile unit"
        elif cpu.has_avx512_bf16:
            per_cycle, unit = 2 * per_cycle, f"AVX-512 BF16 dot products on {unit.removesuffix(', FP32')}"
        else:
            unit += " (no BF16 unit: BF16 runs at the FP32 rate)"
    flops = cores * cpu.clock_mhz * 1e6 * per_cycle
    how = (f"{cores} core(s) × {cpu.clock_mhz / 1e3:.2f} GHz × {per_cycle:,} FLOP/cycle ({unit}) "
           f"= {flops / 1e9:,.0f} GFLOP/s")
    return Peak(flops, how)


def parse_cpuinfo(text: str) -> tuple[str, str, int, frozenset[str], float]:
    """(vendor, model name, family, flags, MHz) of the first processor in ``/proc/cpuinfo``'s text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    try:
        family = int(fields.get("cpu family", "0"))
        mhz = float(fields.get("cpu MHz", "0"))
    except ValueError:
        family, mhz = 0, 0.0
    return (fields.get("vendor_id", ""), fields.get("model name", ""), family,
            frozenset(fields.get("flags", "").split()), mhz)


def _usable_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _physical_cores(cpus: list[int]) -> int:
    found = set()
    for n in cpus:
        topology = SYS_CPU / f"cpu{n}" / "topology"
        try:
            found.add((topology.joinpath("physical_package_id").read_text().strip(),
                       topology.joinpath("core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return len(found) or len(cpus)


def _max_clock_mhz(cpus: list[int]) -> float:
    for n in cpus[:1]:
        try:
            return int((SYS_CPU / f"cpu{n}" / "cpufreq" / "cpuinfo_max_freq").read_text()) / 1e3
        except (OSError, ValueError):
            pass
    return 0.0


@functools.lru_cache(maxsize=1)
def read_cpu() -> CpuInfo:
    """This machine's CPU (read once per process)."""
    try:
        vendor, model, family, flags, mhz = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        vendor, model, family, flags, mhz = "", "", 0, frozenset(), 0.0
    cpus = _usable_cpus()
    max_mhz = _max_clock_mhz(cpus)
    clock, source = ((max_mhz, "highest cpufreq frequency") if max_mhz
                     else (mhz, "current, /proc/cpuinfo") if mhz else (0.0, ""))
    return CpuInfo(model=model or platform.processor() or "unknown CPU", vendor=vendor, family=family, flags=flags,
                   logical_cpus=len(cpus), cores=_physical_cores(cpus), clock_mhz=clock, clock_source=source)
