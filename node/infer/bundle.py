"""Model bundles: ``engines/<name>/manifest.toml`` plus the model file it names.

A bundle declares everything the pipeline needs: which series it applies to, the preprocessing, the
sliding window, the labels (names, SNOMED CT codes, colours, RT ROI interpreted types), the
algorithm's identity and the model file with its sha256. Adding a model means adding a directory.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import BundleError

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


@dataclass(frozen=True)
class Selection:
    modalities: tuple[str, ...]
    sop_classes: tuple[str, ...]
    min_slices: int


@dataclass(frozen=True)
class Preprocess:
    spacing_mm: tuple[float, float, float] | None  # (slice, row, column) target, None = native
    clip: tuple[float, float]
    scale: float
    offset: float  # x' = (clip(x) + offset) * scale


@dataclass(frozen=True)
class Window:
    patch: tuple[int, int, int]
    overlap: float
    batch: int


@dataclass(frozen=True)
class Postprocess:
    largest_component: bool
    fill_holes_2d: bool
    min_volume_ml: float


@dataclass(frozen=True)
class Bundle:
    name: str
    version: str
    description: str
    directory: Path
    model_file: Path
    model_sha256: str
    input_name: str
    output_name: str
    select: Selection
    preprocess: Preprocess
    window: Window
    postprocess: Postprocess
    labels: tuple[Label, ...]
    algorithm_name: str
    algorithm_family: Code

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    def verify_model(self) -> None:
        """Check the model file's sha256 against the manifest."""
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
    p = top.table("preprocess")
    w = top.table("window")
    post = top.table("postprocess")
    alg = top.table("algorithm")

    spacing = p.opt("spacing_mm", list, None)
    labels = []
    for i, raw_label in enumerate(top.req("labels", list)):
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
            )
        )
    if not labels:
        raise BundleError(f"{where}: a bundle needs at least one label")
    values = [label.value for label in labels]
    if len(set(values)) != len(values) or min(values) < 1:
        raise BundleError(f"{where}: label values must be unique integers ≥ 1; got {values}")

    patch = _floats(w.req("patch", list), 3, f"{where} [window] patch")
    model_file = directory / m.req("file", str)
    return Bundle(
        name=b.req("name", str),
        version=b.req("version", str),
        description=b.opt("description", str, ""),
        directory=directory,
        model_file=model_file,
        model_sha256=m.req("sha256", str).lower(),
        input_name=m.opt("input", str, "image"),
        output_name=m.opt("output", str, "probabilities"),
        select=Selection(
            modalities=tuple(s.req("modalities", list)),
            sop_classes=tuple(s.opt("sop_classes", list, [])),
            min_slices=s.opt("min_slices", int, 1),
        ),
        preprocess=Preprocess(
            spacing_mm=_floats(spacing, 3, f"{where} [preprocess] spacing_mm") if spacing is not None else None,  # type: ignore[arg-type]
            clip=_floats(p.req("clip", list), 2, f"{where} [preprocess] clip"),  # type: ignore[arg-type]
            scale=p.req("scale", float),
            offset=p.opt("offset", float, 0.0),
        ),
        window=Window(
            patch=tuple(int(v) for v in patch),  # type: ignore[arg-type]
            overlap=w.opt("overlap", float, 0.25),
            batch=w.opt("batch", int, 1),
        ),
        postprocess=Postprocess(
            largest_component=post.opt("largest_component", bool, False),
            fill_holes_2d=post.opt("fill_holes_2d", bool, False),
            min_volume_ml=post.opt("min_volume_ml", float, 0.0),
        ),
        labels=tuple(labels),
        algorithm_name=alg.req("name", str),
        algorithm_family=_code(alg.req("family", dict), f"{where} [algorithm] family"),
    )


def discover_bundles(bundles_dir: Path, names: tuple[str, ...] = ()) -> list[Bundle]:
    """Load every bundle under ``bundles_dir`` (or only ``names``), verifying model hashes."""
    if not bundles_dir.is_dir():
        raise BundleError(f"bundles directory {bundles_dir} does not exist")
    found = {d.name: d for d in sorted(bundles_dir.iterdir()) if (d / "manifest.toml").is_file()}
    wanted = list(names) or list(found)
    missing = [n for n in wanted if n not in found]
    if missing:
        raise BundleError(f"bundle(s) {missing} not found in {bundles_dir}; available: {sorted(found)}")
    bundles = [load_bundle(found[n]) for n in wanted]
    for bundle in bundles:
        bundle.verify_model()
    if not bundles:
        raise BundleError(f"no bundles (directories with manifest.toml) in {bundles_dir}")
    return bundles
