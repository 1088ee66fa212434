"""What to build for this GPU: the precision, the optimisation profile (tile batch) and the workspace.

Pure decisions on a :class:`~node.infer.gpu.profile.GpuProfile` and the model's cost, with no TensorRT or
CUDA import, so they are unit-tested on CPU-only machines against recorded profiles.

Memory model (per engine, on the device): weights at the build precision + the builder's workspace
+ per sample of the batch (peak live activations at the build precision + the float32 input and
output of one sample, twice for double buffering) ≤ a fraction of the memory free at start. The
remaining headroom is the CUDA context, the resident volume and what other processes take.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from node.errors import InferenceError
from node.infer.gpu.profile import GpuProfile
from node.infer.model_cost import ModelCost
from node.model.enums import PrecisionRequest

GiB = 1 << 30
MiB = 1 << 20

#: Share of the free memory at start that one engine may plan for (the rest: CUDA context, the
#: GPU-resident volume and its accumulators, other processes).
MEMORY_FRACTION = 0.6
#: Largest tile batch a profile offers: beyond this, batching gains nothing measurable for 3D
#: networks (each tile is already millions of voxels) and the build takes longer.
MAX_BATCH_CAP = 32
#: Fixed allowance for the CUDA context and TensorRT's runtime structures.
CONTEXT_OVERHEAD_BYTES = 512 * MiB
#: Most voxels the tiles of one sliding-window batch hold together (a 256³ volume): past this a batch
#: gains nothing measurable on any GPU (a 3D network's tile already fills it), while its outputs (one float32
#: per class per voxel, 100+ classes for an imported TotalSegmentator model) and the last, partly empty
#: batch of a series grow with it. So the tile batch follows the patch size: 8 tiles of 128³,
#: 4 of nnU-Net's 160x128x112, 32 of 32x128x128 (``tile_batch_for_patch``).
TILE_BATCH_VOXELS = 1 << 24


# Not a StrEnum: mypy types a StrEnum's .value as plain str, while backend.onnx_at_precision passes
# precision.value where the literals "fp16" | "bf16" are required.
class Precision(str, Enum):  # noqa: UP042
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def element_size(self) -> int:
        return 4 if self is Precision.FP32 else 2


@dataclass(frozen=True)
class PrecisionChoice:
    precision: Precision
    reason: str


def choose_precision(gpu: GpuProfile, requested: PrecisionRequest | str = PrecisionRequest.AUTO) -> PrecisionChoice:
    """The build precision for ``gpu``: FP16 on tensor cores (7.0+), BF16 only when asked and 8.0+,
    FP32 without tensor cores.

    FP16 is the default even where BF16 runs at the same rate: it keeps 10 mantissa bits to BF16's
    7, and :mod:`node.infer.gpu.mixed_precision` keeps the operations that overflow FP16's range
    (normalisations, reductions, exponentials) in FP32.
    """
    try:
        requested = PrecisionRequest(requested)
    except ValueError:
        raise InferenceError(f"precision {requested!r} is not one of "
                             f"{', '.join(str(r) for r in PrecisionRequest)}") from None
    cc = gpu.cc_text
    if requested is PrecisionRequest.FP32:
        return PrecisionChoice(Precision.FP32, "FP32, as the bundle asks")
    if not gpu.has_tensor_cores:
        why = "asks for " + requested.upper() if requested is not PrecisionRequest.AUTO else "would use FP16"
        return PrecisionChoice(Precision.FP32, f"FP32: {gpu.name} (compute capability {cc}) has no tensor cores "
                                               f"(the bundle {why})")
    if requested is PrecisionRequest.BF16:
        if gpu.supports_bf16:
            return PrecisionChoice(Precision.BF16,
                                   f"BF16 on tensor cores (compute capability {cc}), as the bundle asks")
        return PrecisionChoice(Precision.FP16, f"FP16: the bundle asks for BF16, which needs compute capability 8.0; "
                                               f"{gpu.name} has {cc}")
    return PrecisionChoice(Precision.FP16, f"FP16 on tensor cores (compute capability {cc}); FP32 accumulation, "
                                           "normalisation and exponentials in FP32")


@dataclass(frozen=True)
class BuildSizing:
    """The optimisation profile's batches and the builder's workspace for one engine."""

    min_batch: int
    opt_batch: int
    max_batch: int
    workspace_bytes: int
    per_sample_bytes: int     # device memory one more tile of the batch costs
    fixed_bytes: int          # weights + workspace + context allowance
    budget_bytes: int         # MEMORY_FRACTION of the free memory
    reason: str


def workspace_for(gpu: GpuProfile, budget_bytes: int | None = None) -> int:
    """The builder's scratch limit: a quarter of the card's memory and of the budget, between 256 MiB
    and 4 GiB. Not part of the plan's cache key (it bounds the tactics tried, it does not make a
    plan invalid), so it may follow the free memory without causing rebuilds."""
    quarter = gpu.total_memory_bytes // 4
    if budget_bytes is not None:
        quarter = min(quarter, budget_bytes // 4)
    return int(min(4 * GiB, max(256 * MiB, quarter)))


def _power_of_two_at_most(n: int) -> int:
    p = 1
    while p * 2 <= n:
        p *= 2
    return p


def tile_batch_for_patch(patch: tuple[int, ...]) -> int:
    """The most tiles of ``patch`` worth running as one batch: a power of two, at most
    :data:`MAX_BATCH_CAP`, whose tiles hold at most :data:`TILE_BATCH_VOXELS` voxels (at least 1)."""
    voxels = 1
    for n in patch:
        if n < 1:
            raise InferenceError(f"patch {tuple(patch)}: every side must be at least 1 voxel")
        voxels *= n
    return _power_of_two_at_most(max(1, min(MAX_BATCH_CAP, TILE_BATCH_VOXELS // voxels)))


def size_batches(gpu: GpuProfile, cost: ModelCost, precision: Precision, *, batch_dim_fixed: int | None,
                 preferred_batch: int, name: str, patch_cap: int = MAX_BATCH_CAP) -> BuildSizing:
    """Size the tile batch of ``name``'s optimisation profile from ``gpu``'s free memory.

    ``cost`` is the model's cost for one sample (batch 1). ``batch_dim_fixed`` is the ONNX input's
    fixed batch size, or None when it is dynamic. ``patch_cap`` bounds the batch as well (the tiles'
    own size: :func:`tile_batch_for_patch`). The maximum batch is a power of two, so small
    changes in free memory between starts do not change the plan's cache key. Raises
    :class:`InferenceError` naming the figures when even one sample does not fit.
    """
    scale = precision.element_size / 4
    per_sample = int(cost.peak_live_bytes * scale + 2 * cost.io_bytes)
    budget = int(gpu.free_memory_bytes * MEMORY_FRACTION)
    workspace = workspace_for(gpu, budget)
    fixed = int(cost.weight_bytes * scale) + workspace + CONTEXT_OVERHEAD_BYTES
    fits = (budget - fixed) // per_sample if per_sample > 0 else MAX_BATCH_CAP
    if fits < 1:
        raise InferenceError(
            f"{name} needs {per_sample / MiB:,.0f} MiB per sample at {precision.value.upper()} plus "
            f"{fixed / MiB:,.0f} MiB fixed (weights, {workspace / MiB:,.0f} MiB workspace, CUDA context), more than "
            f"{MEMORY_FRACTION:.0%} of the {gpu.free_memory_bytes / MiB:,.0f} MiB free on {gpu.name}"
        )
    if batch_dim_fixed is not None:
        if fits < batch_dim_fixed:
            raise InferenceError(f"{name} has a fixed batch of {batch_dim_fixed}; only {fits} fit(s) in "
                                 f"{MEMORY_FRACTION:.0%} of the {gpu.free_memory_bytes / MiB:,.0f} MiB free on "
                                 f"{gpu.name}")
        return BuildSizing(batch_dim_fixed, batch_dim_fixed, batch_dim_fixed, workspace, per_sample, fixed, budget,
                           f"batch fixed at {batch_dim_fixed} (by the model's input, or one block per series)")
    cap = max(1, min(MAX_BATCH_CAP, patch_cap))
    max_batch = _power_of_two_at_most(int(min(fits, cap)))
    opt = max(1, min(preferred_batch, max_batch))
    bound = f"at most {cap} by the tile size" if cap < MAX_BATCH_CAP else f"at most {MAX_BATCH_CAP}"
    reason = (f"{fits} tile(s) of {per_sample / MiB:,.0f} MiB fit in {MEMORY_FRACTION:.0%} of "
              f"{gpu.free_memory_bytes / GiB:,.1f} GiB free after {fixed / MiB:,.0f} MiB fixed; "
              f"max batch {max_batch} (power of two, {bound})")
    return BuildSizing(1, opt, max_batch, workspace, per_sample, fixed, budget, reason)


@dataclass(frozen=True)
class RooflineEstimate:
    """The time one sample cannot beat on this GPU: max(compute time, memory time).

    Compute time counts the convolutions/matrix products at the precision's peak (tensor cores for
    FP16/BF16) and every other operation at the FP32 CUDA-core peak; memory time is the model's
    unfused traffic (:meth:`ModelCost.bytes_moved`) at the peak bandwidth, so it is an upper bound
    for the memory side of an engine whose layers TensorRT fused.
    """

    conv_flops: float
    other_flops: float
    bytes_moved: float
    peak_flops: float          # the precision's peak for convolutions
    peak_other_flops: float    # FP32 CUDA cores
    peak_bandwidth: float

    @property
    def flops(self) -> float:
        return self.conv_flops + self.other_flops

    @property
    def compute_s(self) -> float:
        return self.conv_flops / self.peak_flops + self.other_flops / self.peak_other_flops

    @property
    def memory_s(self) -> float:
        return self.bytes_moved / self.peak_bandwidth

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def roofline(gpu: GpuProfile, cost: ModelCost, precision: Precision) -> RooflineEstimate:
    return RooflineEstimate(
        conv_flops=cost.conv_flops,
        other_flops=cost.elementwise_flops,
        bytes_moved=cost.bytes_moved(precision.element_size),
        peak_flops=gpu.peak_flops(precision.value),
        peak_other_flops=gpu.peak_fp32_flops,
        peak_bandwidth=gpu.peak_bandwidth_bytes_s,
    )
