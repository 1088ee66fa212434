"""Edit QA's records: what one edited structure set and each of its structures measured (pure data)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from node.model.enums import EditVerdict, QaOutcome


@dataclass(frozen=True)
class StructureQa:
    """One structure of the node's result against the clinician's edit of it (distances in mm, volumes in mL).

    ``name`` is our structure's name (or, for one the clinician added, theirs); ``their_name`` the ROI name
    in the edited set ('' when they deleted it). Metrics are None where they do not apply (a structure on
    one side only) or could not be computed (``note`` says why).
    """

    name: str
    their_name: str
    bundle: str
    verdict: EditVerdict
    dice: float | None = None
    surface_dice_1mm: float | None = None
    surface_dice_2mm: float | None = None
    hd95_mm: float | None = None
    msd_mm: float | None = None
    ours_ml: float | None = None
    theirs_ml: float | None = None
    change_ml: float | None = None
    change_pct: float | None = None
    added_slices: int = 0
    removed_slices: int = 0
    note: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self) | {"verdict": self.verdict.value}


@dataclass(frozen=True)
class QaSet:
    """One edited structure set (an RTSTRUCT or SEG instance that came back) and what became of it."""

    sop_instance_uid: str
    series_uid: str  # the edited set's own series
    path: str  # its file in the spool
    outcome: QaOutcome
    reason: str = ""  # why it was not compared, or what was odd about it
    label: str = ""  # StructureSetLabel (or a SEG's ContentLabel)
    ct_series_uid: str = ""  # the image series it references
    result_jobs: tuple[int, ...] = ()  # the node's jobs whose results it was compared with
    calling_ae: str = ""
    received_at: float = 0.0
    compared_at: float = 0.0
    structures: list[StructureQa] = field(default_factory=list)
    job_id: int = 0
    id: int = 0

    def as_dict(self) -> dict[str, object]:
        return asdict(self) | {"outcome": self.outcome.value, "result_jobs": list(self.result_jobs),
                               "structures": [s.as_dict() for s in self.structures]}
