"""PixelMed's DicomInstanceValidator (Debian's pixelmed-apps), a second independent IOD validator."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

JAR = Path("/usr/share/java/pixelmed.jar")
#: The validator's XSLT exceeds newer JDKs' default XPath limits; lift them for this process only.
JAVA_OPTIONS = ["-Djava.awt.headless=true", "-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0",
                "-Djdk.xml.xpathTotalOpLimit=0"]


@dataclass(frozen=True)
class PixelmedReport:
    raw: str
    errors: list[str]
    warnings: list[str]
    recognised: bool


def pixelmed_missing_reason() -> str | None:
    if not JAR.is_file() or shutil.which("java") is None:
        return "PixelMed's validator is not installed (apt-get install pixelmed-apps)"
    return None


def validate(path: Path, timeout: float = 180.0) -> PixelmedReport:
    proc = subprocess.run(["java", *JAVA_OPTIONS, "-cp", str(JAR), "com.pixelmed.validate.DicomInstanceValidator",
                           str(path)], capture_output=True, text=True, timeout=timeout)
    raw = proc.stdout + proc.stderr
    lines = [line.strip() for line in raw.splitlines()]
    return PixelmedReport(
        raw=raw,
        errors=[line for line in lines if line.startswith("Error")],
        warnings=[line for line in lines if line.startswith("Warning")],
        recognised="IOD (SOP Class) unrecognized" not in raw,
    )
