"""Which bundles apply to a series, and why the others do not.

Modality, SOP class and slice count come from the index (the first instance's header). A bundle with MR
header rules (``[select.mr]``, node.model.bundle.MrSelection) also needs the MR facts of a header
(:class:`MrFacts`, read by :func:`mr_facts` from one instance file); where they are not known yet
(``SeriesFacts.mr`` None) those rules are left to the job, which checks them on the assembled volume's
headers (node.infer.brain) and declines with the same sentence.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from node.model.bundle import Bundle, MrSelection

log = logging.getLogger(__name__)

#: The header elements :func:`mr_facts` reads (tags, so a file is read only that far).
MR_FACT_KEYWORDS = ("ScanningSequence", "MRAcquisitionType", "SliceThickness", "RepetitionTime", "EchoTime",
                    "InversionTime", "SeriesDescription")

#: Image storage SOP classes that carry single-frame cross-sectional images a volume can be built from.
VOLUME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.128": "Positron Emission Tomography Image Storage",
}


@dataclass(frozen=True)
class MrFacts:
    """What an MR image's header says about its acquisition (None: the element is absent or empty)."""

    acquisition_type: str | None  # MRAcquisitionType (0018,0023): "2D" or "3D"
    slice_thickness_mm: float | None  # SliceThickness (0018,0050)
    scanning_sequence: tuple[str, ...]  # ScanningSequence (0018,0020): SE, IR, GR, EP, RM
    echo_time_ms: float | None  # EchoTime (0018,0081)
    repetition_time_ms: float | None  # RepetitionTime (0018,0080)
    inversion_time_ms: float | None  # InversionTime (0018,0082)
    series_description: str

    @classmethod
    def of(cls, ds: Dataset) -> MrFacts:
        def number(keyword: str) -> float | None:
            value = ds.get(keyword)
            try:
                return None if value is None or value == "" else float(value)
            except (TypeError, ValueError):
                return None

        raw = ds.get("ScanningSequence") or ()
        sequence = (raw,) if isinstance(raw, str) else tuple(str(v) for v in raw)
        acquisition = str(ds.get("MRAcquisitionType") or "").strip().upper() or None
        return cls(acquisition_type=acquisition, slice_thickness_mm=number("SliceThickness"),
                   scanning_sequence=tuple(v.strip().upper() for v in sequence if v.strip()),
                   echo_time_ms=number("EchoTime"), repetition_time_ms=number("RepetitionTime"),
                   inversion_time_ms=number("InversionTime"),
                   series_description=str(ds.get("SeriesDescription") or ""))


def mr_facts(paths: Sequence[Path]) -> MrFacts | None:
    """:class:`MrFacts` of the first readable file of ``paths`` (header only); None when none can be read."""
    for path in paths[:3]:
        try:
            return MrFacts.of(dcmread(path, stop_before_pixels=True, specific_tags=list(MR_FACT_KEYWORDS)))
        except (OSError, InvalidDicomError, ValueError, AttributeError) as exc:
            log.debug("cannot read the MR facts of %s: %s", path, exc)
    return None


@dataclass(frozen=True)
class SeriesFacts:
    modality: str
    sop_class_uid: str
    instance_count: int
    mr: MrFacts | None = None  # None: not read (the MR rules are then left to the job)


def _limit(what: str, value: float | None, limit: float, unit: str, element: str) -> str | None:
    if limit <= 0:
        return None
    if value is None:
        return f"no {what} in the header ({element}; at most {limit:g} {unit} taken)"
    return None if value <= limit else f"{what} {value:g} {unit} (at most {limit:g} {unit})"


def mr_mismatches(rules: MrSelection, facts: MrFacts) -> list[str]:
    """Each rule of ``rules`` the series breaks, as a phrase naming the value and what is taken."""
    out = []
    if rules.acquisition_types and facts.acquisition_type not in rules.acquisition_types:
        taken = "/".join(rules.acquisition_types)
        out.append(f"a {facts.acquisition_type} acquisition ({taken} taken)" if facts.acquisition_type
                   else f"no MR acquisition type in the header (MRAcquisitionType (0018,0023); {taken} taken)")
    thickness = _limit("slice thickness", facts.slice_thickness_mm, rules.max_slice_thickness_mm, "mm",
                       "SliceThickness (0018,0050)")
    if thickness:
        out.append(thickness)
    if rules.scanning_sequences and not set(facts.scanning_sequence) & set(rules.scanning_sequences):
        taken = " or ".join(rules.scanning_sequences)
        out.append(f"scanning sequence {'/'.join(facts.scanning_sequence) or 'not given'} "
                   f"(ScanningSequence (0018,0020) must include {taken})")
    for problem in (
        _limit("echo time", facts.echo_time_ms, rules.max_echo_time_ms, "ms", "EchoTime (0018,0081)"),
        _limit("repetition time", facts.repetition_time_ms, rules.max_repetition_time_ms, "ms",
               "RepetitionTime (0018,0080)"),
    ):
        if problem:
            out.append(problem)
    if rules.max_inversion_time_ms > 0 and facts.inversion_time_ms is not None \
            and facts.inversion_time_ms > rules.max_inversion_time_ms:
        out.append(f"inversion time {facts.inversion_time_ms:g} ms (at most {rules.max_inversion_time_ms:g} ms: "
                   "a longer inversion nulls fluid, not a T1 preparation)")
    words = [w for w in rules.exclude_descriptions if w.lower() in facts.series_description.lower()]
    if words:
        out.append(f"series description {facts.series_description!r} (contains {words[0]!r}, not taken)")
    return out


def why_not_mr(bundle: Bundle, facts: MrFacts) -> str | None:
    """None when the MR facts meet ``bundle``'s ``[select.mr]`` rules (or it has none), else the sentence."""
    rules = bundle.select.mr
    if rules is None:
        return None
    problems = mr_mismatches(rules, facts)
    if not problems:
        return None
    return f"{bundle.name} takes {rules.takes}; this series has " + "; ".join(problems)


def why_not(bundle: Bundle, facts: SeriesFacts) -> str | None:
    """None when ``bundle`` applies to the series, else a sentence saying why it does not."""
    allowed_classes = bundle.select.sop_classes or tuple(VOLUME_SOP_CLASSES)
    if facts.sop_class_uid not in allowed_classes:
        name = VOLUME_SOP_CLASSES.get(facts.sop_class_uid, facts.sop_class_uid)
        return f"{bundle.name} needs {'/'.join(bundle.select.modalities)} images, not {name}"
    if facts.modality not in bundle.select.modalities:
        return (f"{bundle.name} needs modality {'/'.join(bundle.select.modalities)}, "
                f"the series is {facts.modality or 'unlabelled'}")
    if facts.instance_count < bundle.select.min_slices:
        return f"{bundle.name} needs at least {bundle.select.min_slices} slices, the series has {facts.instance_count}"
    if facts.mr is not None and facts.modality == "MR":
        return why_not_mr(bundle, facts.mr)
    return None


def select_bundles(bundles: list[Bundle], facts: SeriesFacts) -> tuple[list[Bundle], list[str]]:
    """Bundles that apply, and the reasons for each that does not."""
    chosen, reasons = [], []
    for bundle in bundles:
        reason = why_not(bundle, facts)
        if reason is None:
            chosen.append(bundle)
        else:
            reasons.append(reason)
    return chosen, reasons
