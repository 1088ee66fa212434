"""Which precision a bundle's OpenVINO model is compiled at on this CPU (``[cpu] precision``).

BF16 where the CPU has a unit that computes in it (AMX-BF16, AVX-512 BF16) and OpenVINO offers it there;
FP32 otherwise, and whenever the bundle asks for FP32. A BF16 model still has to pass the agreement
check (node/infer/cpu/agreement.py) before it is used; the backend runs FP32 when it does not.

Note that OpenVINO's own default on such a CPU is BF16: the backend always states the precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from node.infer.cpu.features import CpuInfo
from node.model.enums import CpuPrecisionRequest


# Not a StrEnum, as node/infer/gpu/plan.py's Precision: ``.value`` is typed as the literal.
class CpuPrecision(str, Enum):  # noqa: UP042
    FP32 = "fp32"
    BF16 = "bf16"

    @property
    def openvino_type(self) -> str:
        """The value of OpenVINO's ``INFERENCE_PRECISION_HINT``."""
        return "f32" if self is CpuPrecision.FP32 else "bf16"


@dataclass(frozen=True)
class CpuPrecisionChoice:
    precision: CpuPrecision
    reason: str


def choose_cpu_precision(cpu: CpuInfo, requested: CpuPrecisionRequest, *, openvino_bf16: bool) -> CpuPrecisionChoice:
    """The compile precision for ``requested`` on ``cpu``; ``openvino_bf16``: OpenVINO lists BF16 among
    the CPU device's optimisation capabilities."""
    if requested is CpuPrecisionRequest.FP32:
        return CpuPrecisionChoice(CpuPrecision.FP32, "FP32, as the bundle asks")
    asked = "asks for BF16" if requested is CpuPrecisionRequest.BF16 else "would use BF16"
    unit = cpu.bf16_unit
    if unit is None:
        return CpuPrecisionChoice(CpuPrecision.FP32, f"FP32: {cpu.model} has no AMX-BF16 or AVX-512 BF16 unit "
                                                     f"(the bundle {asked})")
    if not openvino_bf16:
        return CpuPrecisionChoice(CpuPrecision.FP32, f"FP32: OpenVINO does not offer BF16 on {cpu.model} although it "
                                                     f"has {unit} (the bundle {asked})")
    how = "as the bundle asks" if requested is CpuPrecisionRequest.BF16 else "[cpu] precision = 'auto'"
    return CpuPrecisionChoice(CpuPrecision.BF16, f"BF16 on the CPU's {unit} units ({how}); checked against "
                                                 "ONNX Runtime FP32 when compiled")
