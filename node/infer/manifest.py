"""Model bundles on disk: ``engines/<name>/manifest.toml`` plus the model file it names.

A bundle declares everything the pipeline needs: which series it applies to and which it must
decline (coverage), the preprocessing, how the network is run (a sliding window of patches, or one
fixed block), the post-processing, the labels (names, SNOMED CT codes, colours, RT ROI interpreted
types), how their contours are cleaned and smoothed (``[contours]``: minimum part and hole areas per RT
ROI type or label, half-pixel smoothing; node/write/clean.py), the algorithm's identity and the model
file with its sha256. Adding a model means adding a
directory; the README walks through one.

Three kinds of model: ``kind = "onnx"`` (a network run by the configured engine), ``kind = "builtin"``
(a rule-based algorithm shipped in the node's code, named by ``algorithm``) and ``kind = "parts"``
(several networks, ``[[parts]]``, each with its own ``file``, ``sha256``, ``values`` (its classes → the
bundle's label values), ``[parts.preprocess]`` and ``[parts.window]``; combined as ``combine`` says:
node/infer/parts.py). A label's ``roi_name`` is its RTSTRUCT ROI name when that differs from ``name``.

The manifest is read with the same typed reader as the node's configuration
(:class:`node.model.tables.Table`): a wrong type, a value outside its choices or a key the format
does not have is an error naming the file, the table and the key. The types it produces live on the
ground floor (:mod:`node.model.bundle`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from pathlib import Path

from node.errors import BundleError
from node.model.bundle import (
    BUILTIN_ALGORITHMS,
    DEFAULT_CONTOUR_RULES,
    RT_ROI_TYPES,
    Bundle,
    Code,
    ContourOptions,
    ContourRule,
    ContourSmoothing,
    Coverage,
    CpuOptions,
    GpuOptions,
    Label,
    MrAcquisition,
    MrSelection,
    NnunetResampling,
    Part,
    Postprocess,
    Preprocess,
    ScanningSequence,
    Selection,
    Window,
)
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
from node.model.tables import Table
from node.model.volume import UnevenSlices

PATIENT_DIRECTIONS = set("LRAPSI")


def _code(t: Table) -> Code:
    return Code(scheme=t.require("scheme", str), value=t.require("value", str), meaning=t.require("meaning", str))


def _orientation(t: Table, key: str) -> str | None:
    value = t.get(key, str, None)
    if value is None:
        return None
    axes = {"L": "x", "R": "x", "A": "y", "P": "y", "S": "z", "I": "z"}
    if len(value) != 3 or not set(value) <= PATIENT_DIRECTIONS or len({axes[c] for c in value}) != 3:
        raise t.fail(key, f"is {value!r}; expected three letters naming one of L/R, A/P and S/I each")
    return value


def _labels(top: Table) -> tuple[Label, ...]:
    labels = []
    for lt in top.tables("labels", required=True):
        rt_type = lt.require("rt_roi_type", str)
        if rt_type not in RT_ROI_TYPES:
            raise lt.fail("rt_roi_type", f"is {rt_type!r}; expected one of {sorted(RT_ROI_TYPES)}")
        color = lt.require("color_rgb", list)
        if len(color) != 3 or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color):
            raise lt.fail("color_rgb", f"is {color!r}; expected three integers 0-255")
        includes = lt.get("includes", list, [])
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in includes):
            raise lt.fail("includes", f"is {includes!r}; expected a list of label values (integers)")
        labels.append(
            Label(
                value=lt.require("value", int),
                name=lt.require("name", str),
                category=_code(lt.table("category", required=True)),
                type=_code(lt.table("type", required=True)),
                color_rgb=(color[0], color[1], color[2]),
                rt_roi_type=rt_type,
                includes=tuple(includes),
                roi_name=lt.get("roi_name", str, ""),
                type_modifier=_code(lt.table("type_modifier")) if "type_modifier" in lt else None,
            )
        )
    where = f"{top.source}: [[labels]]"
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


def _triple(t: Table, key: str) -> tuple[float, float, float] | None:
    value: tuple[float, float, float] | None = t.numbers(key, 3)
    return value


def _int_triple(t: Table, key: str, default: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
    value = t.numbers(key, 3)
    return default if value is None else (int(value[0]), int(value[1]), int(value[2]))


def _model(top: Table, labels: tuple[Label, ...]) -> tuple[ModelKind, str, Path | None, str, Table]:
    """The ``[model]`` table: kind, built-in algorithm name, model file and its sha256."""
    m = top.table("model", required=True)
    kind = m.choice("kind", ModelKind, ModelKind.ONNX)
    if kind is ModelKind.BUILTIN:
        builtin = m.require("algorithm", str)
        if builtin not in BUILTIN_ALGORITHMS:
            raise m.fail("algorithm", f"is {builtin!r}; expected a built-in algorithm ({sorted(BUILTIN_ALGORITHMS)})")
        produced = set(BUILTIN_ALGORITHMS[builtin])
        unknown = sorted({label.value for label in labels} - produced)
        if unknown:
            raise BundleError(f"{top.source}: label values {unknown} are not produced by {builtin} "
                              f"(it produces {sorted(produced)})")
        return kind, builtin, None, "", m
    if kind is ModelKind.PARTS:
        return kind, "", None, "", m
    directory = Path(top.source).parent
    return kind, "", directory / m.require("file", str), m.require("sha256", str).lower(), m


def _uneven_slices(p: Table) -> UnevenSlices:
    """``uneven_slices``: "resample" only for a network that resamples to its own ``spacing_mm`` anyway."""
    policy = p.choice("uneven_slices", UnevenSlices, UnevenSlices.DECLINE)
    if policy is UnevenSlices.RESAMPLE and _triple(p, "spacing_mm") is None:
        raise p.fail("uneven_slices", "is \"resample\" but spacing_mm is not set: a network that runs on the "
                     "native grid cannot be given a resampled stack; use \"decline\"")
    return policy


def _spline_orders(p: Table, key: str, default: tuple[int, int]) -> tuple[int, int]:
    value = p.get(key, list, list(default))
    if not (len(value) == 2 and value[0] in (0, 1, 3) and value[1] in (0, 1)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise p.fail(key, f"is {value!r}; expected [order, order_z] with order 0, 1 or 3 and order_z 0 or 1")
    return value[0], value[1]


def _nnunet_resampling(p: Table, resampling: Resampling) -> NnunetResampling:
    """nnU-Net's resampling kwargs (``resampling = "nnunet"`` only; node.infer.resample_nnunet)."""
    keys = ("resampling_order", "probabilities_order", "separate_z_anisotropy", "force_separate_z")
    if resampling is not Resampling.NNUNET:
        for key in keys:
            if key in p:
                raise p.fail(key, f"is set but resampling is {resampling.value!r}; it applies to \"nnunet\" only")
        return NnunetResampling()
    order, order_z = _spline_orders(p, "resampling_order", (3, 0))
    back, back_z = _spline_orders(p, "probabilities_order", (1, 0))
    return NnunetResampling(order=order, order_z=order_z, probabilities_order=back, probabilities_order_z=back_z,
                            force_separate_z=p.get("force_separate_z", bool, None),
                            anisotropy_threshold=p.positive("separate_z_anisotropy", 3.0))


def _transpose(p: Table) -> tuple[int, int, int]:
    value = p.get("transpose", list, [0, 1, 2])
    if sorted(value) != [0, 1, 2] or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise p.fail("transpose", f"is {value!r}; expected a permutation of [0, 1, 2]")
    return value[0], value[1], value[2]


def _preprocess(p: Table) -> Preprocess:
    median_size = p.get("median_size", int, 0)
    if median_size < 0 or (median_size and median_size % 2 == 0):
        raise p.fail("median_size", f"is {median_size}; expected 0 or an odd number")
    clip = p.numbers("clip", 2, (-1024.0, 3071.0))
    resampling = p.choice("resampling", Resampling, Resampling.LINEAR)
    return Preprocess(
        spacing_mm=_triple(p, "spacing_mm"),
        clip=(clip[0], clip[1]),
        scale=p.get("scale", float, 1.0),
        offset=p.get("offset", float, 0.0),
        orientation=_orientation(p, "orientation"),
        intermediate_spacing_mm=_triple(p, "intermediate_spacing_mm"),
        median_size=median_size,
        uneven_slices=_uneven_slices(p),
        crop=p.choice("crop", Crop, Crop.NONE),
        crop_max_mm=_triple(p, "crop_max_mm"),
        resampling=resampling,
        nnunet=_nnunet_resampling(p, resampling),
        normalisation=p.choice("normalisation", IntensityScheme, IntensityScheme.FIXED),
        transpose=_transpose(p),
    )


def _mr_selection(t: Table) -> MrSelection:
    """``[select.mr]``: the MR header rules (node.model.bundle.MrSelection)."""
    return MrSelection(
        acquisition_types=tuple(t.choices("acquisition_types", MrAcquisition)) if "acquisition_types" in t else (),
        max_slice_thickness_mm=t.positive("max_slice_thickness_mm", 0.0, allow_zero=True),
        scanning_sequences=tuple(t.choices("scanning_sequences", ScanningSequence)) if "scanning_sequences" in t
        else (),
        max_echo_time_ms=t.positive("max_echo_time_ms", 0.0, allow_zero=True),
        max_repetition_time_ms=t.positive("max_repetition_time_ms", 0.0, allow_zero=True),
        max_inversion_time_ms=t.positive("max_inversion_time_ms", 0.0, allow_zero=True),
        exclude_descriptions=t.strings("exclude_descriptions"),
        takes=t.get("takes", str, MrSelection.takes),
    )


def _window(w: Table) -> Window:
    mode = w.choice("mode", WindowMode, WindowMode.SLIDING)
    block = _int_triple(w, "block", None)
    if mode is WindowMode.SINGLE_BLOCK and block is None:
        raise w.fail("block", "is missing; mode 'single-block' needs block = [D, H, W]")
    patch = _int_triple(w, "patch", (64, 64, 64))
    assert patch is not None
    return Window(
        patch=patch,
        overlap=w.get("overlap", float, 0.25),
        batch=w.get("batch", int, 1),
        mode=mode,
        block=block,
        output_margin=w.get("output_margin", int, 0),
        pad_value=w.get("pad_value", float, None),
    )


def _gpu_options(g: Table) -> GpuOptions:
    max_batch = g.get("max_batch", int, 0)
    if max_batch < 0:
        raise g.fail("max_batch", f"is {max_batch}; expected 0 (sized from memory) or a positive number")
    return GpuOptions(
        precision=g.choice("precision", PrecisionRequest, PrecisionRequest.AUTO),
        max_batch=max_batch,
        max_abs_difference=g.get("max_abs_difference", float, 0.05),
        min_dice=g.get("min_dice", float, 0.99),
    )


def _cpu_options(c: Table, gpu: GpuOptions) -> CpuOptions:
    """``[cpu]``: the OpenVINO precision and the agreement a BF16 model must reach (``[gpu]``'s when not given)."""
    max_abs = c.get("max_abs_difference", float, gpu.max_abs_difference)
    if not 0.0 < max_abs <= 1.0:
        raise c.fail("max_abs_difference", f"is {max_abs!r}; expected a probability difference in (0, 1]")
    min_dice = c.get("min_dice", float, gpu.min_dice)
    if not 0.0 <= min_dice <= 1.0:
        raise c.fail("min_dice", f"is {min_dice!r}; expected a Dice coefficient in [0, 1]")
    return CpuOptions(precision=c.choice("precision", CpuPrecisionRequest, CpuPrecisionRequest.AUTO),
                      max_abs_difference=max_abs, min_dice=min_dice)


def _rule_values(t: Table) -> dict[str, object]:
    """The :class:`ContourRule` keys one table of ``[contours]`` sets (the others are inherited)."""
    values: dict[str, object] = {}
    for key in ("min_island_mm2", "min_hole_mm2"):
        area = t.positive(key, None, allow_zero=True)
        if area is not None:
            values[key] = area
    keep_holes = t.get("keep_holes", bool, None)
    if keep_holes is not None:
        values["keep_holes"] = keep_holes
    if "smoothing" in t:
        values["smoothing"] = t.choice("smoothing", ContourSmoothing)
    return values


def _named_rules(t: Table, key: str, known: set[str], what: str) -> dict[str, dict[str, object]]:
    """``[contours.<key>.<name>]`` tables: per RT ROI type or per label name."""
    tables = t.table(key)
    unknown = sorted(set(tables.data) - known)
    if unknown:
        raise tables.fail(unknown[0], f"names no {what}; expected one of {sorted(known)}")
    return {name: _rule_values(tables.table(name)) for name in list(tables.data)}


def _contours(c: Table, labels: tuple[Label, ...]) -> ContourOptions:
    """``[contours]``: each label's rule; per key, a label's own table wins over its RT ROI type's, then the
    table's top-level keys, then the built-in rule of its type (node.model.bundle.DEFAULT_CONTOUR_RULES)."""
    common = _rule_values(c)
    by_type = _named_rules(c, "roi_types", set(RT_ROI_TYPES), "RT ROI interpreted type")
    by_label = _named_rules(c, "labels", {label.name for label in labels}, "label of this bundle")
    rules = []
    for label in labels:
        values = {**common, **by_type.get(label.rt_roi_type, {}), **by_label.get(label.name, {})}
        base = DEFAULT_CONTOUR_RULES.get(label.rt_roi_type, ContourRule())
        rules.append((label.value, dataclasses.replace(base, **values)))  # type: ignore[arg-type]
    return ContourOptions(tuple(rules))


def _part_values(pt: Table, labels: tuple[Label, ...]) -> tuple[tuple[int, int], ...]:
    """``values = [[class, label value], …]``: each class once (1-255), each target a label of the bundle."""
    raw = pt.require("values", list)
    known = {label.value for label in labels}
    pairs: list[tuple[int, int]] = []
    for pair in raw:
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
            raise pt.fail("values", f"has {pair!r}; expected [class the network outputs, bundle label value] pairs")
        if not 1 <= pair[0] <= 255 or pair[1] not in known:
            raise pt.fail("values", f"has {pair!r}; expected a class 1-255 and one of the bundle's label values "
                          f"{sorted(known)}")
        pairs.append((pair[0], pair[1]))
    classes = [source for source, _ in pairs]
    if not pairs or len(set(classes)) != len(classes):
        raise pt.fail("values", f"lists classes {classes}; expected at least one class, each once")
    return tuple(pairs)


def _parts(top: Table, parent: Bundle) -> tuple[Part, ...]:
    """``[[parts]]``: each a complete single-network bundle whose labels carry the network's own classes."""
    by_value = {label.value: label for label in parent.labels}
    parts: list[Part] = []
    for pt in top.tables("parts", required=True):
        name = pt.require("name", str)
        if not name or not all(c.isalnum() or c in "-_" for c in name) or name in {p.name for p in parts}:
            raise pt.fail("name", f"is {name!r}; expected a name of letters, digits, '-' and '_', unique in the bundle")
        values = _part_values(pt, parent.labels)
        part_labels = tuple(dataclasses.replace(by_value[target], value=source, includes=())
                            for source, target in values)
        network = dataclasses.replace(
            parent,
            name=f"{parent.name}.{name}",
            model_kind=ModelKind.ONNX,
            model_file=parent.directory / pt.require("file", str),
            model_sha256=pt.require("sha256", str).lower(),
            input_name=pt.get("input", str, "image"),
            output_name=pt.get("output", str, "probabilities"),
            activation=pt.choice("activation", Activation, Activation.SOFTMAX),
            preprocess=_preprocess(pt.table("preprocess", required=True)),
            window=_window(pt.table("window", required=True)),
            postprocess=Postprocess(largest_component=False, fill_holes_2d=False, min_volume_ml=0.0),
            labels=part_labels,
            contours=ContourOptions(),
            parts=(),
        )
        parts.append(Part(name=name, bundle=network, values=values))
    return tuple(parts)


def load_bundle(directory: Path) -> Bundle:
    """Read and validate ``directory/manifest.toml``."""
    manifest = directory / "manifest.toml"
    try:
        raw = tomllib.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{directory}: no manifest.toml in this bundle directory") from None
    except tomllib.TOMLDecodeError as exc:
        raise BundleError(f"{manifest}: not valid TOML ({exc})") from None
    top = Table(raw, source=str(manifest), error=BundleError)
    b = top.table("bundle", required=True)
    s = top.table("select", required=True)
    alg = top.table("algorithm", required=True)
    labels = _labels(top)
    kind, builtin, model_file, sha256, m = _model(top, labels)
    # Sections a built-in algorithm does not need are optional for it.
    network = kind is ModelKind.ONNX  # a parts bundle has these per part
    p = top.table("preprocess", required=network)
    w = top.table("window", required=network)
    post = top.table("postprocess")
    cov = top.table("coverage")
    gpu = _gpu_options(top.table("gpu"))
    bundle = Bundle(
        name=b.require("name", str),
        version=b.require("version", str),
        description=b.get("description", str, ""),
        directory=directory,
        model_kind=kind,
        model_file=model_file,
        model_sha256=sha256,
        input_name=m.get("input", str, "image"),
        output_name=m.get("output", str, "probabilities"),
        activation=m.choice("activation", Activation, Activation.SOFTMAX),
        builtin=builtin,
        select=Selection(
            modalities=tuple(s.require("modalities", list)),
            sop_classes=tuple(s.get("sop_classes", list, [])),
            min_slices=s.get("min_slices", int, 1),
            mr=_mr_selection(s.table("mr")) if "mr" in s else None,
        ),
        coverage=Coverage(
            min_extent_mm=cov.get("min_extent_mm", float, 0.0),
            max_slice_spacing_mm=cov.get("max_slice_spacing_mm", float, 0.0),
            max_obliquity_deg=cov.get("max_obliquity_deg", float, 90.0),
            min_body_width_mm=cov.get("min_body_width_mm", float, 0.0),
        ),
        preprocess=_preprocess(p),
        window=_window(w),
        postprocess=Postprocess(
            largest_component=post.get("largest_component", bool, False),
            fill_holes_2d=post.get("fill_holes_2d", bool, False),
            min_volume_ml=post.get("min_volume_ml", float, 0.0),
            threshold=post.get("threshold", float, 0.5),
            open_model_grid=post.get("open_model_grid", bool, False),
        ),
        labels=labels,
        algorithm_name=alg.require("name", str),
        algorithm_family=_code(alg.table("family", required=True)),
        enabled_by_default=b.get("enabled_by_default", bool, True),
        gpu=gpu,
        cpu=_cpu_options(top.table("cpu"), gpu),
        contours=_contours(top.table("contours"), labels),
    )
    if kind is ModelKind.PARTS:
        bundle = dataclasses.replace(bundle, parts=_parts(top, bundle),
                                     combine=m.choice("combine", PartsCombine, PartsCombine.OVERLAY))
    top.finish()
    return bundle


def verify_model(bundle: Bundle) -> None:
    """Check the model file's sha256 against the manifest (built-in algorithms have no file; a parts bundle's
    parts have one each)."""
    for part in bundle.parts:
        verify_model(part.bundle)
    if bundle.model_file is None:
        return
    try:
        digest = hashlib.sha256(bundle.model_file.read_bytes()).hexdigest()
    except OSError as exc:
        raise BundleError(f"bundle {bundle.name}: cannot read model file {bundle.model_file}: {exc}") from exc
    if digest != bundle.model_sha256:
        raise BundleError(
            f"bundle {bundle.name}: {bundle.model_file.name} has sha256 {digest}, "
            f"but manifest.toml says {bundle.model_sha256}"
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
        verify_model(bundle)
    if not bundles:
        raise BundleError(f"no bundles (directories with manifest.toml, enabled by default or named in "
                          f"engines.bundles) in {bundles_dir}")
    return bundles
