"""Readers of DICOM objects that other systems write (RT Structure Sets; Segmentations in node.read.seg)."""

from node.read.rtstruct import (
    Contour,
    ReferencedSeries,
    Roi,
    StructureSet,
    StructureSetError,
    rasterise,
    read_structure_set,
)

__all__ = [
    "Contour",
    "ReferencedSeries",
    "Roi",
    "StructureSet",
    "StructureSetError",
    "rasterise",
    "read_structure_set",
]
