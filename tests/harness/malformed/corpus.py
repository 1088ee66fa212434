"""The whole corpus: every generator in turn on one builder (the order fixes file names and random draws)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tests.harness.malformed.builder import _Builder
from tests.harness.malformed.cases import Case
from tests.harness.malformed.gen_bytes import _absurd_length_cases, _truncation_cases, _wrong_vr_cases
from tests.harness.malformed.gen_dataset import _pixel_cases, _uid_cases
from tests.harness.malformed.gen_protocol import _protocol_cases
from tests.harness.malformed.gen_series import _geometry_cases, _transfer_syntax_cases
from tests.harness.malformed.gen_shared import _shared_cases


def generate_cases(workdir: Path, *, seed: int = 0, shared_data: Path | None = None) -> list[Case]:
    """Write the corpus under ``workdir`` and return its cases (same seed → same cases and bytes)."""
    from pydicom import config

    before = config.settings.writing_validation_mode, config.settings.reading_validation_mode
    # malformed values are the point: let pydicom write them as given
    config.settings.writing_validation_mode = config.settings.reading_validation_mode = config.IGNORE
    try:
        b = _Builder(Path(workdir), seed)
        _truncation_cases(b)
        _wrong_vr_cases(b)
        _absurd_length_cases(b)
        _pixel_cases(b)
        _uid_cases(b)
        _transfer_syntax_cases(b)
        _geometry_cases(b)
        if shared_data is not None and shared_data.is_dir():
            _shared_cases(b, shared_data)
        _protocol_cases(b)
    finally:
        config.settings.writing_validation_mode, config.settings.reading_validation_mode = before
    names = [c.name for c in b.cases]
    duplicates = [n for n, k in Counter(names).items() if k > 1]
    if duplicates:
        raise AssertionError(f"duplicate case names: {duplicates[:5]}")
    return b.cases
