"""Volume in → label volume out, on the volume's own grid: the bundle's whole infer stage."""

from __future__ import annotations

import logging

import numpy as np

from node.errors import BundleError
from node.infer.coverage import check_coverage
from node.infer.engine import Engine, device_pipeline
from node.infer.memory import release_free_memory
from node.infer.orient import reorientation
from node.infer.resample_nnunet import native_labels, to_network_grid
from node.infer.transforms import labels_on_native_grid, postprocess, to_model_grid
from node.infer.uneven import segment_uneven
from node.infer.window import sliding_window
from node.model.bundle import Bundle
from node.model.enums import IntensityScheme, ModelKind, Resampling, WindowMode
from node.model.volume import Volume


def _sliding(volume: Volume, bundle: Bundle, engine: Engine) -> np.ndarray:
    pre = bundle.preprocess
    if not pre.orientation:
        return _sliding_arrays(volume.voxels, volume.geometry.spacing, bundle, engine)
    turn = reorientation(volume.geometry, pre.orientation)  # a transpose and flips, no resampling
    labels = _sliding_arrays(turn.apply(volume.voxels), turn.spacing(volume.geometry.spacing), bundle, engine)
    return np.ascontiguousarray(turn.undo(labels))


def _sliding_arrays(voxels: np.ndarray, spacing: tuple[float, float, float], bundle: Bundle,
                    engine: Engine) -> np.ndarray:
    pre, win = bundle.preprocess, bundle.window
    pad_value = win.pad_value if win.pad_value is not None else (pre.clip[0] + pre.offset) * pre.scale
    if pre.resampling is Resampling.TOTALSEG:  # TotalSegmentator's own resampling, on the CPU like "nnunet"
        from node.infer.resample_totalseg import argmax_labels, labels_to_native, to_model_grid_totalseg

        image = to_model_grid_totalseg(voxels, spacing, pre)
        probabilities = sliding_window(image, engine, patch=win.patch, overlap=win.overlap, batch=win.batch,
                                       pad_value=pad_value)
        del image
        return labels_to_native(argmax_labels(probabilities), voxels.shape)
    if pre.resampling is Resampling.NNUNET:
        # nnU-Net's own preprocessing (crop to nonzero, order-3 / separate-axis resampling, order 1 back) runs on the
        # CPU: the GPU-resident pipeline reproduces only linear resampling, so it is skipped here; the engine still
        # runs the tiles (on the GPU for a GPU engine).
        logging.getLogger(__name__).debug("bundle %s: nnU-Net resampling on the CPU, tiles on the engine", bundle.name)
        grid = to_network_grid(voxels, spacing, pre, win.patch, pad_value)
        probabilities = sliding_window(grid.image, engine, patch=win.patch, overlap=win.overlap, batch=win.batch,
                                       pad_value=pad_value)
        return native_labels(probabilities, grid, pre)
    on_device = pre.normalisation is IntensityScheme.FIXED and pre.transpose == (0, 1, 2)
    resident = device_pipeline(engine) if on_device else None
    if resident is not None:  # the volume goes to the GPU once, labels come back once
        labels: np.ndarray = resident.sliding_labels(voxels, spacing, pre, win)
        return labels
    image = to_model_grid(voxels, spacing, pre)
    if pre.transpose != (0, 1, 2):  # the network's axis order (nnU-Net's transpose_forward)
        image = np.ascontiguousarray(image.transpose(pre.transpose))
    probabilities = sliding_window(image, engine, patch=win.patch, overlap=win.overlap, batch=win.batch,
                                   pad_value=pad_value)
    del image
    if pre.transpose != (0, 1, 2):
        probabilities = probabilities.transpose((0, *(1 + int(a) for a in np.argsort(pre.transpose))))
    return labels_on_native_grid(probabilities, voxels.shape)


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
