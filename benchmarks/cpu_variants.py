"""The engine variants the CPU benchmarks compare side by side (issue 20), as node configuration.

A variant is a backend (``engines.backend``) and, for OpenVINO, a precision. The precision is the
bundle's (``[cpu] precision`` in its manifest), so a forced one is a copy of the bundles directory whose
manifests say it (the model files linked, not copied) — the node then runs exactly as it would with
that manifest, agreement check included.

    onnxruntime     engines.backend = "cpu"       ONNX Runtime FP32
    openvino-fp32   engines.backend = "openvino"  [cpu] precision = "fp32"
    openvino-bf16   engines.backend = "openvino"  [cpu] precision = "bf16" (FP32 where the check rejects it)
    openvino        engines.backend = "openvino"  the manifests as they are ("auto")
    auto            engines.backend = "auto"      the manifests as they are
"""

from __future__ import annotations

import re
from pathlib import Path

VARIANTS: dict[str, tuple[str, str | None]] = {
    "onnxruntime": ("cpu", None),
    "openvino-fp32": ("openvino", "fp32"),
    "openvino-bf16": ("openvino", "bf16"),
    "openvino": ("openvino", None),
    "auto": ("auto", None),
}


def with_cpu_precision(manifest: str, precision: str) -> str:
    """``manifest``'s text with ``[cpu] precision = precision`` (the table added when it has none)."""
    line = f'precision = "{precision}"'
    match = re.search(r"^\[cpu\][ \t]*(#.*)?$", manifest, flags=re.MULTILINE)
    if match is None:
        return manifest.rstrip("\n") + f"\n\n[cpu]\n{line}\n"
    end = re.search(r"^\[", manifest[match.end():], flags=re.MULTILINE)
    stop = match.end() + (end.start() if end else len(manifest) - match.end())
    table = re.sub(r"^precision\s*=.*$\n?", "", manifest[match.end():stop], flags=re.MULTILINE)
    return manifest[:match.end()] + f"\n{line}" + table + manifest[stop:]


def bundles_for(variant: str, source: Path, work: Path) -> Path:
    """The bundles directory for ``variant``: ``source`` itself, or a copy under ``work`` with the precision."""
    if variant not in VARIANTS:
        raise ValueError(f"engine variant {variant!r} is not one of {', '.join(VARIANTS)}")
    precision = VARIANTS[variant][1]
    if precision is None:
        return source
    target = work / f"bundles-{variant}"
    for bundle in sorted(d for d in source.iterdir() if (d / "manifest.toml").is_file()):
        copy = target / bundle.name
        copy.mkdir(parents=True, exist_ok=True)
        for item in bundle.iterdir():
            if item.name == "manifest.toml":
                (copy / item.name).write_text(with_cpu_precision(item.read_text(), precision))
            elif not (copy / item.name).exists():
                (copy / item.name).symlink_to(item.resolve())
    return target


def engines_toml(variant: str, source: Path, work: Path) -> str:
    """The ``[engines]`` keys (backend, bundles_dir) that select ``variant``."""
    backend = VARIANTS[variant][0]
    return f'backend = "{backend}"\nbundles_dir = "{bundles_for(variant, source, work)}"\n'
