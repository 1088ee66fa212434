"""Model bundles: ``engines/<name>/manifest.toml`` plus the model file it names.

A bundle declares everything the pipeline needs: which series it applies to and which it must
decline (coverage), the preprocessing, how the network is run (a sliding window of patches, or one
fixed block), the post-processing, the labels (names, SNOMED CT codes, colours, RT ROI interpreted
types), the algorithm's identity and the model file with its sha256. Adding a model means adding a
directory; the README walks through one.

Two kinds of model: ``kind = "onnx"`` (a network run by the configured engine) and
``kind = "builtin"`` (a rule-based algorithm shipped in the node's code, named by ``algorithm``).
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import BundleError

MODEL_KINDS = ("onnx", "builtin")
#: Built-in (rule-based) algorithms a bundle may name, and the label values each produces.
BUILTIN_ALGORITHMS = {"body-lungs": (1, 2, 3)}
ACTIVATIONS = ("softmax", "sigmoid")
WINDOW_MODES = ("sliding", "single-block")
CROPS = ("none", "abdomen")
GPU_PRECISIONS = ("auto", "fp32", "fp16", "bf16")
PATIENT_DIRECTIONS = set("LRAPSI")
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
    rt_roi_type: str
    #: Other label values whose voxels also belong to this structure (BODY includes the lungs): the
    #: label volume holds each voxel's innermost structure, the writers give every structure its own mask.
    includes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Selection:
    modalities: tuple[str, ...]
    sop_classes: tuple[str, ...]
    min_slices: int


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
    crop: str = "none"  # "abdomen": the body's box, at most crop_max_mm, centred on the liver dome region
    crop_max_mm: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class Window:
    patch: tuple[int, int, int]
    overlap: float
    batch: int
    mode: str = "sliding"  # "single-block": the whole (cropped) image in one zero-padded block
    block: tuple[int, int, int] | None = None  # single-block input size
    output_margin: int = 0  # the network's output is smaller than its input by this much per side
    pad_value: float | None = None  # value outside the image, after normalisation (None: the clip minimum's)

    @property
    def network_input(self) -> tuple[int, int, int]:
        """The spatial shape of one network input: the block in single-block mode, else the patch."""
        if self.mode == "single-block":
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


@dataclass(frozen=True)
class GpuOptions:
    """How a TensorRT plan of this model is built (see node/gpu/plan.py)."""

    precision: str = "auto"  # "auto" (FP16 on tensor cores, else FP32), "fp32", "fp16" or "bf16"
    max_batch: int = 0  # cap on the optimisation profile's tile batch; 0: sized from free GPU memory
    #: Agreement with ONNX Runtime the plan must reach (node/gpu/check.py and the GPU tests):
    #: largest |difference| of a probability, and Dice of the label masks.
    max_abs_difference: float = 0.05
    min_dice: float = 0.99


@dataclass(frozen=True)
class Bundle:
    name: str
    version: str
    description: str
    directory: Path
    model_kind: str  # "onnx" or "builtin"
    model_file: Path | None  # None for built-in algorithms
    model_sha256: str
    input_name: str
    output_name: str
    activation: str  # "softmax": K channels, channel 0 background; "sigmoid": one channel per label
    builtin: str  # the built-in algorithm's name when model_kind == "builtin"
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

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    def verify_model(self) -> None:
        """Check the model file's sha256 against the manifest (built-in algorithms have no file)."""
        if self.model_file is None:
            return
        try:
            digest = hashlib.sha256(self.model_file.read_bytes()).hexdigest()
        except OSError as exc:
            raise BundleError(f"bundle {self.name}: cannot read model file {self.model_file}: {exc}") from exc
        if digest != self.model_sha256:
            raise BundleError(
                f"bundle {self.name}: {self.model_file.name} has sha256 {digest}, "
                f"but manifest.toml says {self.model_sha256}"
            )


class _Reader:
    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.data = data
        self.where = where

    def req(self, key: str, kind: type | tuple[type, ...]) -> Any:
        if key not in self.data:
            raise BundleError(f"{self.where}: key '{key}' is missing")
        return self.opt(key, kind, None)

    def opt(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = self.data.get(key, default)
        if value is default:
            return value
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds):
            raise BundleError(f"{self.where}: key '{key}' is {value!r}; expected {' or '.join(k.__name__ for k in kinds)}")
        return value

    def table(self, key: str) -> _Reader:
        return _Reader(self.req(key, dict), f"{self.where} [{key}]")


def _code(raw: Any, where: str) -> Code:
    if not isinstance(raw, dict):
        raise BundleError(f"{where}: expected a table with scheme, value, meaning; got {raw!r}")
    r = _Reader(raw, where)
    return Code(scheme=r.req("scheme", str), value=r.req("value", str), meaning=r.req("meaning", str))


def _floats(value: Any, n: int, where: str) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != n or not all(isinstance(v, (int, float)) for v in value):
        raise BundleError(f"{where}: expected a list of {n} numbers; got {value!r}")
    return tuple(float(v) for v in value)


def _orientation(value: Any, where: str) -> str | None:
    if value is None:
        return None
    axes = {"L": "x", "R": "x", "A": "y", "P": "y", "S": "z", "I": "z"}
    if not isinstance(value, str) or len(value) != 3 or not set(value) <= PATIENT_DIRECTIONS \
            or len({axes[c] for c in value}) != 3:
        raise BundleError(f"{where}: orientation {value!r} must be three letters naming one of L/R, A/P and S/I each")
    return value


def _choice(value: str, allowed: tuple[str, ...], where: str) -> str:
    if value not in allowed:
        raise BundleError(f"{where}: {value!r} is not one of {list(allowed)}")
    return value


def _labels(raw_labels: list[Any], where: str) -> tuple[Label, ...]:
    labels = []
    for i, raw_label in enumerate(raw_labels):
        lw = f"{where} labels[{i}]"
        lr = _Reader(raw_label, lw)
        rt_type = lr.req("rt_roi_type", str)
        if rt_type not in RT_ROI_TYPES:
            raise BundleError(f"{lw}: rt_roi_type {rt_type!r} is not one of {sorted(RT_ROI_TYPES)}")
        color = lr.req("color_rgb", list)
        if len(color) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in color):
            raise BundleError(f"{lw}: color_rgb {color!r} must be three integers 0-255")
        labels.append(
            Label(
                value=lr.req("value", int),
                name=lr.req("name", str),
                category=_code(lr.req("category", dict), f"{lw}.category"),
                type=_code(lr.req("type", dict), f"{lw}.type"),
                color_rgb=(color[0], color[1], color[2]),
                rt_roi_type=rt_type,
                includes=tuple(lr.opt("includes", list, [])),
            )
        )
    if not labels:
        raise BundleError(f"{where}: a bundle needs at least one label")
    values = [label.value for label in labels]
    if len(set(values)) != len(values) or min(values) < 1 or max(values) > 255:
        raise BundleError(f"{where}: label values must be unique integers 1-255; got {values}")
    for label in labels:
        unknown = [v for v in label.includes if v not in values or v == label.value]
        if unknown:
            raise BundleError(f"{where}: label {label.name} includes {unknown}, which are not other labels' values")
    return tuple(labels)


def _optional_table(top: _Reader, key: str) -> _Reader:
    return top.table(key) if key in top.data else _Reader({}, f"{top.where} [{key}]")


def load_bundle(directory: Path) -> Bundle:
    """Read and validate ``directory/manifest.toml``."""
    manifest = directory / "manifest.toml"
    where = str(manifest)
    try:
        raw = tomllib.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{directory}: no manifest.toml in this bundle directory") from None
    except tomllib.TOMLDecodeError as exc:
        raise BundleError(f"{where}: not valid TOML ({exc})") from None
    top = _Reader(raw, where)
    b = top.table("bundle")
    m = top.table("model")
    s = top.table("select")
    alg = top.table("algorithm")
    kind = _choice(m.opt("kind", str, "onnx"), MODEL_KINDS, f"{where} [model] kind")
    labels = _labels(top.req("labels", list), where)

    builtin = ""
    model_file: Path | None = None
    sha256 = ""
    if kind == "builtin":
        builtin = m.req("algorithm", str)
        if builtin not in BUILTIN_ALGORITHMS:
            raise BundleError(f"{where} [model] algorithm {builtin!r} is not a built-in algorithm "
                              f"({sorted(BUILTIN_ALGORITHMS)})")
        produced = set(BUILTIN_ALGORITHMS[builtin])
        unknown = sorted({label.value for label in labels} - produced)
        if unknown:
            raise BundleError(f"{where}: label values {unknown} are not produced by {builtin} (it produces {sorted(produced)})")
    else:
        model_file = directory / m.req("file", str)
        sha256 = m.req("sha256", str).lower()

    # Sections a built-in algorithm does not need are optional for it.
    p = top.table("preprocess") if kind == "onnx" else _optional_table(top, "preprocess")
    w = top.table("window") if kind == "onnx" else _optional_table(top, "window")
    post = _optional_table(top, "postprocess")
    cov = _optional_table(top, "coverage")
    g = _optional_table(top, "gpu")

    def triple(reader: _Reader, key: str) -> tuple[float, float, float] | None:
        value = reader.opt(key, list, None)
        return _floats(value, 3, f"{reader.where} {key}") if value is not None else None  # type: ignore[return-value]

    mode = _choice(w.opt("mode", str, "sliding"), WINDOW_MODES, f"{where} [window] mode")
    block = triple(w, "block")
    if mode == "single-block" and block is None:
        raise BundleError(f"{where} [window]: mode 'single-block' needs block = [D, H, W]")
    patch = _floats(w.opt("patch", list, [64, 64, 64]), 3, f"{where} [window] patch")
    clip = _floats(p.opt("clip", list, [-1024.0, 3071.0]), 2, f"{where} [preprocess] clip")
    median_size = p.opt("median_size", int, 0)
    if median_size < 0 or (median_size and median_size % 2 == 0):
        raise BundleError(f"{where} [preprocess] median_size {median_size} must be 0 or an odd number")
    return Bundle(
        name=b.req("name", str),
        version=b.req("version", str),
        description=b.opt("description", str, ""),
        directory=directory,
        model_kind=kind,
        model_file=model_file,
        model_sha256=sha256,
        input_name=m.opt("input", str, "image"),
        output_name=m.opt("output", str, "probabilities"),
        activation=_choice(m.opt("activation", str, "softmax"), ACTIVATIONS, f"{where} [model] activation"),
        builtin=builtin,
        select=Selection(
            modalities=tuple(s.req("modalities", list)),
            sop_classes=tuple(s.opt("sop_classes", list, [])),
            min_slices=s.opt("min_slices", int, 1),
        ),
        coverage=Coverage(
            min_extent_mm=cov.opt("min_extent_mm", float, 0.0),
            max_slice_spacing_mm=cov.opt("max_slice_spacing_mm", float, 0.0),
            max_obliquity_deg=cov.opt("max_obliquity_deg", float, 90.0),
            min_body_width_mm=cov.opt("min_body_width_mm", float, 0.0),
        ),
        preprocess=Preprocess(
            spacing_mm=triple(p, "spacing_mm"),
            clip=clip,  # type: ignore[arg-type]
            scale=p.opt("scale", float, 1.0),
            offset=p.opt("offset", float, 0.0),
            orientation=_orientation(p.opt("orientation", str, None), f"{where} [preprocess]"),
            intermediate_spacing_mm=triple(p, "intermediate_spacing_mm"),
            median_size=median_size,
            crop=_choice(p.opt("crop", str, "none"), CROPS, f"{where} [preprocess] crop"),
            crop_max_mm=triple(p, "crop_max_mm"),
        ),
        window=Window(
            patch=tuple(int(v) for v in patch),  # type: ignore[arg-type]
            overlap=w.opt("overlap", float, 0.25),
            batch=w.opt("batch", int, 1),
            mode=mode,
            block=tuple(int(v) for v in block) if block else None,  # type: ignore[arg-type]
            output_margin=w.opt("output_margin", int, 0),
            pad_value=w.opt("pad_value", float, None),
        ),
        postprocess=Postprocess(
            largest_component=post.opt("largest_component", bool, False),
            fill_holes_2d=post.opt("fill_holes_2d", bool, False),
            min_volume_ml=post.opt("min_volume_ml", float, 0.0),
            threshold=post.opt("threshold", float, 0.5),
            open_model_grid=post.opt("open_model_grid", bool, False),
        ),
        labels=labels,
        algorithm_name=alg.req("name", str),
        algorithm_family=_code(alg.req("family", dict), f"{where} [algorithm] family"),
        enabled_by_default=b.opt("enabled_by_default", bool, True),
        gpu=_gpu_options(g, where),
    )


def _gpu_options(g: _Reader, where: str) -> GpuOptions:
    max_batch = g.opt("max_batch", int, 0)
    if max_batch < 0:
        raise BundleError(f"{where} [gpu] max_batch {max_batch} must be 0 (sized from memory) or positive")
    return GpuOptions(
        precision=_choice(g.opt("precision", str, "auto"), GPU_PRECISIONS, f"{where} [gpu] precision"),
        max_batch=max_batch,
        max_abs_difference=g.opt("max_abs_difference", float, 0.05),
        min_dice=g.opt("min_dice", float, 0.99),
    )


def discover_bundles(bundles_dir: Path, names: tuple[str, ...] = ()) -> list[Bundle]:
    """Load the bundles named in ``names`` from ``bundles_dir`` — or, with no names, every bundle there
    that is enabled by default — verifying model hashes."""
    if not bundles_dir.is_dir():
        raise BundleError(f"bundles directory {bundles_dir} does not exist")
    found = {d.name: d for d in sorted(bundles_dir.iterdir()) if (d / "manifest.toml").is_file()}
    missing = [n for n in names if n not in found]
    if missing:
        raise BundleError(f"bundle(s) {missing} not found in {bundles_dir}; available: {sorted(found)}")
    if names:
        bundles = [load_bundle(found[n]) for n in names]
    else:
        bundles = [b for b in (load_bundle(d) for d in found.values()) if b.enabled_by_default]
    for bundle in bundles:
        bundle.verify_model()
    if not bundles:
        raise BundleError(f"no bundles (directories with manifest.toml, enabled by default or named in "
                          f"engines.bundles) in {bundles_dir}")
    return bundles
