"""What every object we write says about who made it and when (injected, never read deep inside)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from node import __version__

MANUFACTURER = "dicom-seg-node"


@dataclass(frozen=True)
class Provenance:
    """Equipment and time stamps for written objects; build once per job and pass down."""

    created: dt.datetime
    station_name: str = "SEGNODE"
    software_version: str = __version__
    device_serial_number: str = "0"

    @property
    def date(self) -> str:
        return self.created.strftime("%Y%m%d")

    @property
    def time(self) -> str:
        return self.created.strftime("%H%M%S")

    @classmethod
    def now(cls, station_name: str = "SEGNODE") -> Provenance:
        return cls(created=dt.datetime.now().replace(microsecond=0), station_name=station_name)
