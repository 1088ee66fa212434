"""Both pipelines on one volume: the node's (an imported bundle through segment_volume on ONNX Runtime) and
nnU-Net's own ``nnUNetPredictor`` on the same voxels, spacing and weights; and the agreement figures.

nnU-Net is given the volume's array as its SimpleITK reader would give it, (slice, row, column) with the
spacing in that order, so both see the same axes. Settings that match: the same folds, mirroring off on
both (``use_mirroring=False``; the bundle is imported without ``--mirror``), step 0.5, Gaussian weighting,
no crop. Needs torch and nnunetv2.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from node.infer.backends.onnxrt import OnnxRuntimeEngine, uses_memory_arena
from node.infer.segment import segment_volume
from node.model.bundle import Bundle
from node.model.volume import Volume


@dataclass(frozen=True)
class Agreement:
    voxel_agreement: float
    dice: dict[int, float]  # per label present in either


def node_labels(volume: Volume, bundle: Bundle, threads: int = 0) -> tuple[np.ndarray, float]:
    assert bundle.model_file is not None
    engine = OnnxRuntimeEngine(bundle.model_file, input_name=bundle.input_name, output_name=bundle.output_name,
                               threads=threads, memory_arena=uses_memory_arena(bundle))  # as the node's backend
    start = time.perf_counter()
    labels = segment_volume(volume, bundle, engine)
    return labels, time.perf_counter() - start


def nnunet_labels(volume: Volume, model_dir: Path, folds: tuple[str, ...],
                  threads: int = 2) -> tuple[np.ndarray, float]:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(threads)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=folds)
    image = volume.voxels.astype(np.float32)[None]
    start = time.perf_counter()
    labels = predictor.predict_single_npy_array(image, {"spacing": list(volume.geometry.spacing)})
    return np.asarray(labels, dtype=np.uint8), time.perf_counter() - start


def agreement(a: np.ndarray, b: np.ndarray, values: list[int]) -> Agreement:
    dice = {}
    for v in values:
        x, y = a == v, b == v
        total = int(x.sum() + y.sum())
        if total:
            dice[v] = 2.0 * int((x & y).sum()) / total
    return Agreement(voxel_agreement=float((a == b).mean()), dice=dice)
