"""A model bundle as the stages see it: what it applies to, how it is run, what it produces.

Pure data: ``node.infer.manifest`` reads and validates ``engines/<name>/manifest.toml`` into these
types; assembly (which bundles apply), inference (pre/post-processing, window, engine) and writing
(labels, codes, colours) all take them from here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from node.model.enums import (
    Activation,
    CpuPrecisionRequest,
    Crop,
    IntensityScheme,
    ModelKind,
    PartsCombine,
    PrecisionRequest,
    Resampling,
    WindowMode,
)
from node.model.volume import UnevenSlices

#: Built-in (rule-based) algorithms a bundle may name, and the label values each produces.
BUILTIN_ALGORITHMS = {"body-lungs": (1, 2, 3)}
#: RT ROI Interpreted Types (PS3.3 C.8.8.8) a label may declare.
RT_ROI_TYPES = {"EXTERNAL", "ORGAN", "PTV", "CTV", "GTV", "AVOIDANCE", "CAVITY", "SUPPORT", "CONTROL", "MARKER"}


@dataclass(frozen=True)
class Code:
    """A coded concept: (scheme designator, code value, code meaning)."""

    scheme: str
    value: str
    meaning: str


@dataclass(frozen=True)
class Label:
    value: int
    name: str
    category: Code
    type: Code
    color_rgb: tuple[int, int, int]
    rt_roi_type: str  # one of RT_ROI_TYPES
    #: Other label values whose voxels also belong to this structure (BODY includes the lungs): the
    #: label volume holds each voxel's innermost structure, the writers give every structure its own mask.
    includes: tuple[int, ...] = ()
    #: The RTSTRUCT ROI Name (TG-263 for imported TotalSegmentator bundles); empty: ``name``. The SEG's segment
    #: label is ``name`` either way, and both carry the coded type.
    roi_name: str = ""
    #: Laterality and the like (SegmentedPropertyTypeModifier): Kidney + Left for the left kidney.
    type_modifier: Code | None = None

    @property
    def structure_set_name(self) -> str:
        """The ROI Name an RTSTRUCT gives this structure (before a site's rename table)."""
        return self.roi_name or self.name


class MrAcquisition(enum.StrEnum):
    """MR Acquisition Type (0018,0023), PS3.3 C.8.3.1."""

    TWO_D = "2D"  # slices excited one by one (or several at once)
    THREE_D = "3D"  # a volume excited and phase-encoded in both in-plane and through-plane directions


class ScanningSequence(enum.StrEnum):
    """Scanning Sequence (0018,0020) defined terms, PS3.3 C.8.3.1 (a series may carry several)."""

    SE = "SE"  # spin echo
    IR = "IR"  # inversion recovery
    GR = "GR"  # gradient recalled
    EP = "EP"  # echo planar
    RM = "RM"  # research mode


@dataclass(frozen=True)
class MrSelection:
    """``[select.mr]``: the MR series a bundle takes, by header facts (node.assemble.select.MrFacts). A rule
    whose fact the series does not carry declines it (what cannot be confirmed is not taken)."""

    acquisition_types: tuple[MrAcquisition, ...] = ()  # () takes any
    max_slice_thickness_mm: float = 0.0  # SliceThickness (0018,0050); 0: no limit
    scanning_sequences: tuple[ScanningSequence, ...] = ()  # the series' ScanningSequence must hold one of these
    max_echo_time_ms: float = 0.0  # EchoTime (0018,0081); 0: no limit
    max_repetition_time_ms: float = 0.0  # RepetitionTime (0018,0080); 0: no limit
    max_inversion_time_ms: float = 0.0  # InversionTime (0018,0082), when the series has one; 0: no limit
    #: SeriesDescription words that mark a series this bundle must not take (case-insensitive substrings).
    exclude_descriptions: tuple[str, ...] = ()
    takes: str = "only the MR series its [select.mr] rules describe"  # for the decline sentence: "3D T1-weighted MR"


@dataclass(frozen=True)
class Selection:
    modalities: tuple[str, ...]
    sop_classes: tuple[str, ...]
    min_slices: int
    mr: MrSelection | None = None  # MR header rules ([select.mr]); None: any MR series of the right class


@dataclass(frozen=True)
class NnunetResampling:
    """The ``resampling_fn_*_kwargs`` of an nnU-Net plan, for ``resampling = "nnunet"``: spline orders in-plane and
    along a separate low-resolution axis, for the image (in) and the probabilities (back)."""

    order: int = 3
    order_z: int = 0
    probabilities_order: int = 1
    probabilities_order_z: int = 0
    force_separate_z: bool | None = None  # None: separate when the spacing's anisotropy exceeds the threshold
    anisotropy_threshold: float = 3.0  # nnU-Net's ANISO_THRESHOLD


@dataclass(frozen=True)
class Preprocess:
    spacing_mm: tuple[float, float, float] | None  # (axis 0, 1, 2) target, None = native
    clip: tuple[float, float]
    scale: float
    offset: float  # x' = (clip(x) + offset) * scale
    #: Reorient to these patient directions first: three letters from L/R, A/P, S/I, the direction in which
    #: each array axis increases (``"SAR"``: axis 0 inferior→superior, 1 posterior→anterior, 2 left→right).
    #: None keeps the acquisition's (slice, row, column) axes.
    orientation: str | None = None
    #: Resample to this spacing and median-filter there before going to ``spacing_mm`` (None: skip).
    intermediate_spacing_mm: tuple[float, float, float] | None = None
    median_size: int = 0  # median filter size at the intermediate spacing (0: none)
    #: A stack whose slices are not evenly spaced: declined, or resampled along the slices to a regular grid
    #: first (node.infer.uneven; only for a network that resamples to ``spacing_mm`` anyway).
    uneven_slices: UnevenSlices = UnevenSlices.DECLINE
    crop: Crop = Crop.NONE  # ABDOMEN: the body's box, at most crop_max_mm, centred on the liver dome region
    crop_max_mm: tuple[float, float, float] | None = None
    resampling: Resampling = Resampling.LINEAR
    nnunet: NnunetResampling = NnunetResampling()  # used when resampling is NNUNET
    normalisation: IntensityScheme = IntensityScheme.FIXED  # ZSCORE*: clip, offset and scale are not used
    #: The network's axes as a permutation of the array's (nnU-Net's transpose_forward); ``spacing_mm`` stays in
    #: the array's own order. The probabilities are transposed back.
    transpose: tuple[int, int, int] = (0, 1, 2)


@dataclass(frozen=True)
class Window:
    patch: tuple[int, int, int]
    overlap: float
    batch: int
    mode: WindowMode = WindowMode.SLIDING
    block: tuple[int, int, int] | None = None  # single-block input size
    output_margin: int = 0  # the network's output is smaller than its input by this much per side
    pad_value: float | None = None  # value outside the image, after normalisation (None: the clip minimum's)

    @property
    def network_input(self) -> tuple[int, int, int]:
        """The spatial shape of one network input: the block in single-block mode, else the patch."""
        if self.mode is WindowMode.SINGLE_BLOCK:
            assert self.block is not None  # load_bundle requires a block in single-block mode
            return self.block
        return self.patch


@dataclass(frozen=True)
class Coverage:
    """What a series must be for this model to give a trustworthy answer; otherwise it is declined."""

    min_extent_mm: float = 0.0  # along the slice normal
    max_slice_spacing_mm: float = 0.0  # 0: no limit
    max_obliquity_deg: float = 90.0  # angle between the slice normal and the patient's S-I axis
    min_body_width_mm: float = 0.0  # widest body extent left-right (a head is ~150 mm, an abdomen ≥ 250 mm)


@dataclass(frozen=True)
class Postprocess:
    largest_component: bool
    fill_holes_2d: bool
    min_volume_ml: float
    threshold: float = 0.5  # sigmoid outputs: probability above which a voxel is in the structure
    open_model_grid: bool = False  # erode, keep the largest component, dilate — on the model's grid


class ContourSmoothing(enum.StrEnum):
    """How a traced contour is smoothed (node/write/contours.py)."""

    NONE = "none"  # the pixel outline as traced (through pixel-edge midpoints)
    HALF_PIXEL = "half-pixel"  # rounded staircases; no point moves by more than MAX_SMOOTHING_SHIFT_PX


#: The most a smoothed contour point moves, in pixels: under half a pixel, and under the 0.354 px between a
#: traced contour's 45° chamfers and the nearest pixel centre, so the smoothed polygon, filled by pixel
#: centres, gives back exactly the pixels of the mask (the SEG) it was traced from.
MAX_SMOOTHING_SHIFT_PX = 0.35


@dataclass(frozen=True)
class ContourRule:
    """How one structure's mask is cleaned before both writers (node/write/clean.py) and traced.

    Areas are in-plane (mm² on each slice): the pixels a part or hole covers times the pixel area.
    """

    min_island_mm2: float = 10.0  # a part (4-connected on its slice) smaller than this is dropped
    min_hole_mm2: float = 10.0  # a hole smaller than this is filled
    keep_holes: bool = True  # False: every hole is filled, whatever its size
    smoothing: ContourSmoothing = ContourSmoothing.HALF_PIXEL


#: Built-in rules by RT ROI interpreted type (other types: ``ContourRule()``): the External is one outline
#: per part, without holes, and parts under 0.5 cm² (specks outside the skin) are dropped.
DEFAULT_CONTOUR_RULES = {"EXTERNAL": ContourRule(min_island_mm2=50.0, keep_holes=False)}


@dataclass(frozen=True)
class ContourOptions:
    """Each label's :class:`ContourRule`, as the manifest's ``[contours]`` table resolved them."""

    rules: tuple[tuple[int, ContourRule], ...] = ()  # (label value, rule); a label not listed: the built-in rule

    def rule(self, label: Label) -> ContourRule:
        for value, rule in self.rules:
            if value == label.value:
                return rule
        return DEFAULT_CONTOUR_RULES.get(label.rt_roi_type, ContourRule())


@dataclass(frozen=True)
class GpuOptions:
    """How a TensorRT plan of this model is built (see node/infer/gpu/plan.py)."""

    precision: PrecisionRequest = PrecisionRequest.AUTO  # AUTO: FP16 on tensor cores, else FP32
    max_batch: int = 0  # cap on the optimisation profile's tile batch; 0: sized from free GPU memory
    #: Agreement with ONNX Runtime the plan must reach (node/infer/gpu/check.py and the GPU tests):
    #: largest |difference| of a probability, and Dice of the label masks.
    max_abs_difference: float = 0.05
    min_dice: float = 0.99


@dataclass(frozen=True)
class CpuOptions:
    """How an OpenVINO model of this network is compiled for the CPU (see node/infer/cpu/precision.py)."""

    precision: CpuPrecisionRequest = CpuPrecisionRequest.AUTO  # AUTO: BF16 on AMX / AVX-512 BF16, else FP32
    #: Agreement with ONNX Runtime FP32 a BF16 model must reach (node/infer/cpu/agreement.py); the manifest
    #: takes them from ``[gpu]`` when ``[cpu]`` does not give them.
    max_abs_difference: float = 0.05
    min_dice: float = 0.99


@dataclass(frozen=True)
class Bundle:
    name: str
    version: str
    description: str
    directory: Path
    model_kind: ModelKind
    model_file: Path | None  # None for built-in algorithms
    model_sha256: str
    input_name: str
    output_name: str
    activation: Activation
    builtin: str  # the built-in algorithm's name when model_kind is BUILTIN
    select: Selection
    coverage: Coverage
    preprocess: Preprocess
    window: Window
    postprocess: Postprocess
    labels: tuple[Label, ...]
    algorithm_name: str
    algorithm_family: Code
    #: Run when the configuration names no bundles; an example or test bundle says false.
    enabled_by_default: bool = True
    gpu: GpuOptions = GpuOptions()
    cpu: CpuOptions = CpuOptions()
    contours: ContourOptions = ContourOptions()  # cleaning and smoothing of the written contours

    #: A parts bundle's networks (``[model] kind = "parts"``), in the order their labels are combined.
    parts: tuple[Part, ...] = ()
    combine: PartsCombine = PartsCombine.OVERLAY

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def networks(self) -> tuple[Bundle, ...]:
        """The single-network bundles an engine is made for: a parts bundle's parts, a network bundle itself,
        none for a built-in algorithm."""
        if self.parts:
            return tuple(part.bundle for part in self.parts)
        return () if self.model_file is None else (self,)


@dataclass(frozen=True)
class Part:
    """One network of a parts bundle: a complete single-network bundle (its own model file, preprocessing
    and window; labels carrying the network's own class values) and where its classes go in the
    combined label map."""

    name: str
    bundle: Bundle
    values: tuple[tuple[int, int], ...]  # (class the network outputs, bundle label value); others dropped

    def lookup(self) -> np.ndarray:
        """A 256-entry table from the network's classes to the bundle's label values (0: dropped)."""
        table = np.zeros(256, dtype=np.uint8)
        for source, target in self.values:
            table[source] = target
        return table
