"""Which bundles apply to a series, and why the others do not."""

from __future__ import annotations

from dataclasses import dataclass

from node.model.bundle import Bundle

#: Image storage SOP classes that carry single-frame cross-sectional images a volume can be built from.
VOLUME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.128": "Positron Emission Tomography Image Storage",
}


@dataclass(frozen=True)
class SeriesFacts:
    modality: str
    sop_class_uid: str
    instance_count: int


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
