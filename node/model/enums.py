"""The choices a configuration or a manifest makes, as enums: a string is validated once, where it is
read (``Enum(value)`` at the boundary, as highdicom does with ``SegmentationTypeValues``), and the
code below compares members, never strings.

Each is a :class:`~enum.StrEnum`, so a member formats, compares and serialises as its value (the
index, the logs and the JSON status keep the same words).
"""

from __future__ import annotations

import enum


class EngineBackend(enum.StrEnum):
    """``engines.backend``: which registered backend runs the networks (:mod:`node.infer.backends`)."""

    AUTO = "auto"  # the first available in the registry's preference order (the GPU first, the CPU last)
    CPU = "cpu"  # ONNX Runtime on the CPU; the GPU is never touched
    TENSORRT = "tensorrt"  # the GPU or nothing: the service does not start without it


class ModelKind(enum.StrEnum):
    """``[model] kind`` of a bundle."""

    ONNX = "onnx"  # a network run by the configured engine
    BUILTIN = "builtin"  # a rule-based algorithm shipped in the node's code


class Activation(enum.StrEnum):
    """``[model] activation``: how the network's output channels become probabilities."""

    SOFTMAX = "softmax"  # K channels, channel 0 background
    SIGMOID = "sigmoid"  # one channel per label


class WindowMode(enum.StrEnum):
    """``[window] mode``: how a volume is fed to the network."""

    SLIDING = "sliding"  # overlapping patches blended with Gaussian weights
    SINGLE_BLOCK = "single-block"  # the whole (cropped) image in one zero-padded block


class Crop(enum.StrEnum):
    """``[preprocess] crop``."""

    NONE = "none"
    ABDOMEN = "abdomen"  # the body's box below the lung base (node/infer/crop.py)


class PrecisionRequest(enum.StrEnum):
    """``[gpu] precision``: what a bundle asks of a TensorRT build (node/infer/gpu/plan.py decides)."""

    AUTO = "auto"  # FP16 on tensor cores, else FP32
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class SegType(enum.StrEnum):
    """``output.seg_type``: the DICOM-SEG Segmentation Type (highdicom's ``SegmentationTypeValues``)."""

    BINARY = "BINARY"
    LABELMAP = "LABELMAP"


class DestinationType(enum.StrEnum):
    """``destinations[].type``: the transport that delivers results (node/send/transports)."""

    DICOM = "dicom"  # C-STORE (DIMSE), optionally over TLS


class ObjectKind(enum.StrEnum):
    """The kinds of result object the node writes (``destinations[].objects`` routes by them)."""

    SEG = "SEG"
    RTSTRUCT = "RTSTRUCT"
    SC = "SC"  # the preview, a Secondary Capture


class RuleAction(enum.StrEnum):
    """``[[rules]] action``: what happens to a series the rule matches."""

    SEGMENT = "segment"
    IGNORE = "ignore"
