"""Volume in → label volume out, on the volume's own grid: the bundle's whole infer stage."""

from __future__ import annotations

import numpy as np

from node.assemble.volume import Volume
from node.infer.bundle import Bundle
from node.infer.engine import Engine
from node.infer.transforms import labels_on_native_grid, postprocess, to_model_grid
from node.infer.window import sliding_window


def segment_volume(volume: Volume, bundle: Bundle, engine: Engine) -> np.ndarray:
    """Run ``bundle`` through ``engine`` on ``volume``; return uint8 labels shaped like the volume."""
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
    labels = labels_on_native_grid(probabilities, volume.geometry.shape)
    del probabilities
    voxel_ml = float(np.prod(volume.geometry.spacing)) / 1000.0
    return postprocess(labels, bundle.postprocess, [label.value for label in bundle.labels], voxel_ml)
