"""Volume in → label volume out, on the volume's own grid: the bundle's whole infer stage."""

from __future__ import annotations

import numpy as np

from node.errors import BundleError
from node.infer.coverage import check_coverage
from node.infer.engine import Engine, device_pipeline
from node.infer.memory import release_free_memory
from node.infer.transforms import labels_on_native_grid, postprocess, to_model_grid
from node.infer.uneven import segment_uneven
from node.infer.window import sliding_window
from node.model.bundle import Bundle
from node.model.enums import ModelKind, WindowMode
from node.model.volume import Volume


def _sliding(volume: Volume, bundle: Bundle, engine: Engine) -> np.ndarray:
    resident = device_pipeline(engine)
    if resident is not None:  # the volume goes to the GPU once, labels come back once
        labels: np.ndarray = resident.sliding_labels(volume.voxels, volume.geometry.spacing, bundle.preprocess,
                                                     bundle.window)
        return labels
    pre = bundle.preprocess
    image = to_model_grid(volume.voxels, volume.geometry.spacing, pre)
    pad_value = (pre.clip[0] + pre.offset) * pre.scale
    probabilities = sliding_window(
        image,
        engine,
        patch=bundle.window.patch,
        overlap=bundle.window.overlap,
        batch=bundle.window.batch,
        pad_value=pad_value,
    )
    del image
    return labels_on_native_grid(probabilities, volume.geometry.shape)


def _builtin(volume: Volume, bundle: Bundle) -> np.ndarray:
    if bundle.builtin == "body-lungs":
        from node.infer.anatomy import segment_body_lungs

        labels = segment_body_lungs(volume.voxels, volume.geometry)
    else:  # load_bundle only accepts known names
        raise BundleError(f"bundle {bundle.name}: no built-in algorithm {bundle.builtin!r}")
    wanted = np.zeros(256, dtype=np.uint8)
    for label in bundle.labels:
        wanted[label.value] = label.value
    return wanted[labels]  # labels the manifest does not list are dropped


def segment_volume(volume: Volume, bundle: Bundle, engine: Engine | None) -> np.ndarray:
    """Run ``bundle`` on ``volume``; return uint8 labels shaped like the volume.

    Raises :class:`node.errors.Declined` when the series is outside the bundle's coverage.
    """
    check_coverage(bundle, volume.geometry)
    if not volume.geometry.is_uniform and bundle.model_kind is ModelKind.ONNX:
        return segment_uneven(volume, bundle, engine, segment_volume)  # a network: via a regular grid
    release_free_memory()  # what an earlier job left in the heap
    if bundle.parts:  # each part through this function as a single network, then combined
        from node.infer.parts import segment_parts

        labels = segment_parts(volume, bundle, engine, segment_volume)
    elif bundle.model_kind is ModelKind.BUILTIN:
        labels = _builtin(volume, bundle)
    elif engine is None:
        raise BundleError(f"bundle {bundle.name} needs an inference engine and none was given")
    elif bundle.window.mode is WindowMode.SINGLE_BLOCK:
        from node.infer.block import segment_single_block

        labels = segment_single_block(volume, bundle, engine)
    else:
        labels = _sliding(volume, bundle, engine)
    voxel_ml = float(np.prod(volume.geometry.spacing)) / 1000.0
    return postprocess(labels, bundle.postprocess, [label.value for label in bundle.labels], voxel_ml)
