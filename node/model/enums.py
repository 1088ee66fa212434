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
    OPENVINO = "openvino"  # OpenVINO on the CPU (BF16 on AMX / AVX-512 BF16 units); "auto" tries it before "cpu"
    CUDA = "cuda"  # ONNX Runtime's CUDA execution provider (onnxruntime-gpu); "auto" tries it after TensorRT
    TRITON = "triton"  # a Triton Inference Server ([triton] url); never chosen by "auto"


class ModelKind(enum.StrEnum):
    """``[model] kind`` of a bundle."""

    ONNX = "onnx"  # a network run by the configured engine
    BUILTIN = "builtin"  # a rule-based algorithm shipped in the node's code
    PARTS = "parts"  # several networks ([[parts]]), each run by the configured engine, combined into one label map


class PartsCombine(enum.StrEnum):
    """``[model] combine`` of a parts bundle: how its networks' outputs become one label map."""

    OVERLAY = "overlay"  # each part on the whole volume; later parts' labels overwrite earlier ones (TotalSegmentator)
    DEEPBET = "deepbet"  # a locator network's box, then the brain network inside it (node.infer.brain)


class Resampling(enum.StrEnum):
    """``[preprocess] resampling``: how a volume goes to the network's spacing and the probabilities come back."""

    LINEAR = "linear"  # trilinear both ways (the GPU-resident pipeline reproduces it)
    #: nnU-Net v2's own (``resample_data_or_seg_to_shape``): crop to the nonzero box, order 3 in, order 1 back,
    #: order 0 along a separate low-resolution axis (node.infer.resample_nnunet); CPU only
    NNUNET = "nnunet"
    #: TotalSegmentator's own (change_spacing): linear with end voxel centres aligned, rounded toward zero,
    #: argmax on the model grid, labels back by nearest neighbour (node.infer.resample_totalseg); CPU only
    TOTALSEG = "totalseg"


class IntensityScheme(enum.StrEnum):
    """``[preprocess] normalisation``: how voxel values become network input."""

    FIXED = "fixed"  # (clip(x) + offset) * scale: CT windows, nnU-Net's CTNormalization
    ZSCORE = "zscore"  # (x - mean) / std over the whole image (nnU-Net's ZScoreNormalization)
    ZSCORE_NONZERO = "zscore-nonzero"  # the same inside the filled nonzero mask, 0 outside (use_mask_for_norm)


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


class CpuPrecisionRequest(enum.StrEnum):
    """``[cpu] precision``: what a bundle asks of an OpenVINO compile (node/infer/cpu/precision.py decides)."""

    AUTO = "auto"  # BF16 where the CPU has AMX-BF16 or AVX-512 BF16 units, else FP32
    FP32 = "fp32"
    BF16 = "bf16"


class SegType(enum.StrEnum):
    """``output.seg_type``: the DICOM-SEG Segmentation Type (highdicom's ``SegmentationTypeValues``)."""

    BINARY = "BINARY"
    LABELMAP = "LABELMAP"


class DestinationType(enum.StrEnum):
    """``destinations[].type``: the transport that delivers results (node/send/transports)."""

    DICOM = "dicom"  # C-STORE (DIMSE), optionally over TLS
    DICOMWEB = "dicomweb"  # STOW-RS (PS3.18 10.5): one multipart/related POST per result


class WebAuth(enum.StrEnum):
    """How a DICOMweb destination is authenticated (the secret is read from a file, never the config)."""

    NONE = "none"
    BASIC = "basic"
    BEARER = "bearer"


class TimeoutAction(enum.StrEnum):
    """``completeness.on_timeout``: what becomes of a series still short of instances after ``max_wait_s``."""

    PROCEED = "proceed"  # segment what arrived
    IGNORE = "ignore"  # leave it alone (its note says why)


class VerifyMode(enum.StrEnum):
    """How a destination's storage of a sent object is confirmed (a Success status alone does not prove it)."""

    NONE = "none"  # the peer's Success is taken as stored
    FIND = "find"  # ask for each SOP Instance UID afterwards: C-FIND at IMAGE level, or QIDO-RS for DICOMweb
    COMMITMENT = "commitment"  # Storage Commitment (N-ACTION, then the peer's N-EVENT-REPORT); DICOM only


class ObjectKind(enum.StrEnum):
    """The kinds of result object the node writes (``destinations[].objects`` routes by them)."""

    SEG = "SEG"
    RTSTRUCT = "RTSTRUCT"
    SC = "SC"  # the preview, a Secondary Capture


class RuleAction(enum.StrEnum):
    """``[[rules]] action``: what happens to a series the rule matches."""

    SEGMENT = "segment"
    IGNORE = "ignore"


class JobKind(enum.StrEnum):
    """``jobs.kind``: what a job does with its series (the worker dispatches on it)."""

    SEGMENT = "segment"  # run a bundle on an image series, write and send its results
    QA = "qa"  # edit QA: compare an edited structure set that came back with the node's own result (node/qa)


class EditVerdict(enum.StrEnum):
    """Edit QA: what a clinician did to one structure of the node's result (thresholds in ``[qa]``)."""

    UNCHANGED = "unchanged"
    MINOR = "minor edit"
    MAJOR = "major edit"
    ADDED = "added by clinician"  # in the edited set only
    DELETED = "deleted by clinician"  # in the node's result only (or emptied)
    NOT_COMPARED = "not compared"  # the structure's contours could not be placed (its note says why)


class QaOutcome(enum.StrEnum):
    """Edit QA: what became of one edited structure set (an RTSTRUCT or SEG instance that came back)."""

    COMPARED = "compared"  # matched with the node's result and measured, structure by structure
    NO_AI_RESULT = "no AI result to compare"  # it references a series the node never segmented (or no longer has)
    OWN_RESULT = "own result"  # it is one of the node's own results coming back: nothing to compare
    REJECTED = "rejected"  # unusable input (unreadable, no referenced series, too many ROIs): the reason is kept
