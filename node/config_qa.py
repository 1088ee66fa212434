"""``[qa]``: edit QA — how an edited structure set that comes back is matched with the node's result and judged.

```toml
[qa]
enabled = true                   # false: edited sets are still stored, their qa job ends declined
unchanged_surface_dice = 0.99    # surface Dice at 1 mm at least this (and Dice at least unchanged_dice): unchanged
unchanged_dice = 0.99
minor_surface_dice = 0.90        # else surface Dice at 2 mm at least this (and Dice at least minor_dice): minor edit
minor_dice = 0.80                # else: major edit
max_rois = 1000                  # a structure set with more ROIs is rejected with the reason
recent_days = 30                 # `qa report`: the recent period; the earlier one sets the control limits
floor_dice = 0.0                 # a structure whose recent median Dice falls below this is flagged (0: none)
floor_surface_dice = 0.0         # the same for surface Dice at 2 mm
[qa.aliases]                     # our structure name = the names planning systems give it
Lung_L = ["Lung L", "LUNG_LT", "Lt Lung", "Left Lung"]
```

Names are compared case- and punctuation-insensitively ("Lung_L" = "lung l" = "LUNG-L"), so an alias is
needed only for a different word ("LUNG_LT", "External").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from node.model.tables import Table

#: Aliases every node knows (a site's ``[qa.aliases]`` add to them): what planning systems call our structures.
DEFAULT_ALIASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("BODY", ("External", "Body", "Outline", "Skin", "EXT")),
    ("Lung_L", ("Lung_Lt", "Lung_Left", "LUNG_LT", "Lt_Lung", "Left_Lung", "L_Lung")),
    ("Lung_R", ("Lung_Rt", "Lung_Right", "LUNG_RT", "Rt_Lung", "Right_Lung", "R_Lung")),
    ("Liver", ("Liver_AI",)),
)


def name_key(name: str) -> str:
    """A structure name as compared: lower case, letters and digits only ("Lung_L", "LUNG L" → "lungl")."""
    return re.sub(r"[^0-9a-z]", "", name.casefold())


@dataclass(frozen=True)
class QaConfig:
    """``[qa]``: the thresholds of the verdicts, the aliases and the report's control limits."""

    enabled: bool = True
    unchanged_surface_dice: float = 0.99  # at 1 mm
    unchanged_dice: float = 0.99
    minor_surface_dice: float = 0.90  # at 2 mm
    minor_dice: float = 0.80
    max_rois: int = 1000
    recent_days: float = 30.0
    floor_dice: float = 0.0
    floor_surface_dice: float = 0.0
    aliases: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_ALIASES

    def alias_table(self) -> dict[str, str]:
        """Normalised name (:func:`name_key`) → our structure's name, for every alias (and the name itself)."""
        table: dict[str, str] = {}
        for ours, names in self.aliases:
            for name in (ours, *names):
                table.setdefault(name_key(name), ours)
        return table


def parse_qa(table: Table) -> QaConfig:
    """``[qa]`` of the configuration (``table`` from :class:`node.model.tables.Table`)."""
    d = QaConfig()
    fractions = {}
    for key in ("unchanged_surface_dice", "unchanged_dice", "minor_surface_dice", "minor_dice", "floor_dice",
                "floor_surface_dice"):
        value = table.get(key, float, getattr(d, key))
        if not 0.0 <= value <= 1.0:
            raise table.fail(key, f"is {value!r}; expected a fraction between 0 and 1")
        fractions[key] = value
    if fractions["minor_surface_dice"] > fractions["unchanged_surface_dice"]:
        raise table.fail("minor_surface_dice", f"is {fractions['minor_surface_dice']!r}, above "
                         f"unchanged_surface_dice ({fractions['unchanged_surface_dice']!r}); a minor edit's bar "
                         "cannot be higher than an unchanged structure's")
    aliases = table.table("aliases")
    extra: list[tuple[str, tuple[str, ...]]] = []
    for ours in sorted(aliases.data):
        names = aliases.strings(ours)
        if not name_key(ours) or not all(name_key(n) for n in names):
            raise aliases.fail(ours, f"holds a name with no letter or digit ({[ours, *names]!r}); names are "
                               "compared by their letters and digits")
        extra.append((ours, names))
    # A site's aliases first: they win over the defaults for a name both list.
    return QaConfig(
        enabled=table.get("enabled", bool, d.enabled),
        max_rois=table.positive("max_rois", d.max_rois, integer=True),
        recent_days=table.positive("recent_days", d.recent_days),
        aliases=tuple(extra) + DEFAULT_ALIASES,
        **fractions,
    )
