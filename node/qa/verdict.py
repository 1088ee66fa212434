"""A structure's verdict from its metrics and the ``[qa]`` thresholds."""

from __future__ import annotations

from node.config_qa import QaConfig
from node.model.enums import EditVerdict
from node.qa.metrics import Overlap


def judge(metrics: Overlap, cfg: QaConfig) -> EditVerdict:
    """unchanged: surface Dice at 1 mm and Dice at least the ``unchanged_*`` bars; minor edit: surface Dice at
    2 mm and Dice at least the ``minor_*`` bars; else major edit."""
    if metrics.surface_dice_1mm >= cfg.unchanged_surface_dice and metrics.dice >= cfg.unchanged_dice:
        return EditVerdict.UNCHANGED
    if metrics.surface_dice_2mm >= cfg.minor_surface_dice and metrics.dice >= cfg.minor_dice:
        return EditVerdict.MINOR
    return EditVerdict.MAJOR
