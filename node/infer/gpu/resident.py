"""The GPU-resident pipeline: the volume goes to the GPU once, labels come back once.

Sliding window (segment._sliding on the GPU): upload the int16/float32 volume (page-locked staging) →
resample to the model grid and normalise (one fused kernel) → for each batch of up to
``engine.max_batch`` tiles: gather the tiles (padding outside the image), ``engine.enqueue``, add each
tile's Gaussian-weighted probabilities into the accumulator (one launch per tile, so overlapping tiles
add in numpy's order) → per native voxel, interpolate acc / norm back to the native grid and take the
argmax → download the uint8 labels. Everything runs on one stream; nothing waits for the GPU until the
labels are downloaded. Tile corners, weights and padding are computed by node.infer.window's own
functions, so the result is the numpy path's: the kernels reproduce numpy's float32 operations in
numpy's order (see kernels.cu), and the tests compare them exactly.

Single block (block.py's device part): resample to the model spacing and normalise, centre in the
block, run, then threshold (sigmoid) or argmax (softmax) the output on the GPU and download uint8
masks; the crop to the image's voxels (block.image_probabilities) and everything before (reorientation,
crop, median) and after (opening, back to the native grid) stay on the CPU.

Device buffers belong to the pipeline object and are reused for the next volume when large enough.
The device is a :class:`node.infer.gpu.kernels.CudaDevice` (pycuda) on a GPU; tests run the same code on the
CPU emulation of kernels.cu.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from node.errors import InferenceError
from node.infer.block import image_probabilities
from node.infer.gpu.device import DeviceEngine
from node.infer.gpu.kernels import Kernels, Launcher, Normalisation, Shape, cuda_step
from node.infer.transforms import model_grid_shape
from node.infer.window import gaussian_weights, tile_grid
from node.model.bundle import Preprocess, Window
from node.model.enums import Activation, IntensityScheme, Resampling

FLOAT = 4  # bytes of a float32


class Device(Launcher, Protocol):
    """GPU memory and streams (``CudaDevice``; the tests' CPU emulation). Pointers are ints."""

    def new_stream(self) -> Any: ...

    def alloc(self, nbytes: int) -> int: ...

    def free(self, ptr: int) -> None: ...

    def host_array(self, shape: Sequence[int], dtype: Any) -> np.ndarray: ...

    def upload(self, dst: int, src: np.ndarray, stream: Any) -> None: ...

    def download(self, dst: np.ndarray, src: int, stream: Any) -> None: ...

    def zero(self, ptr: int, nbytes: int, stream: Any) -> None: ...

    def synchronize(self, stream: Any) -> None: ...


def tile_corners(shape: Shape, patch: Shape, overlap: float) -> np.ndarray:
    """(n, 3) int32 tile corners, in window.sliding_window's order, for a (D, H, W) image (padded by
    sliding_window to at least ``patch``)."""
    return np.array(tile_grid(shape, patch, overlap), dtype=np.int32).reshape(-1, 3)


class ResidentPipeline:
    """One DeviceEngine's pre- and post-processing on the GPU; one stream, buffers reused across volumes."""

    def __init__(self, engine: DeviceEngine, device: Device | None = None) -> None:
        if device is None:
            from node.infer.gpu.kernels import CudaDevice

            device = CudaDevice()
        self.engine = engine
        self.device = device
        self.kernels = Kernels(device)
        self.stream = device.new_stream()
        self._buffers: dict[str, tuple[int, int]] = {}  # name → (pointer, bytes)
        self._staging: dict[str, np.ndarray] = {}  # name → page-locked bytes
        self._weights_patch: Shape | None = None

    # ------------------------------------------------------------------------------- buffers
    def _buffer(self, name: str, nbytes: int) -> int:
        """Device buffer ``name`` of at least ``nbytes``: the one from an earlier volume when it is large enough."""
        held = self._buffers.get(name)
        if held is not None and held[1] >= nbytes:
            return held[0]
        if held is not None:
            del self._buffers[name]
            self.device.free(held[0])
        ptr = self.device.alloc(nbytes)
        self._buffers[name] = (ptr, nbytes)
        return ptr

    def _host(self, name: str, shape: Sequence[int], dtype: Any) -> np.ndarray:
        """Page-locked host array ``name`` (a view of a reused byte buffer)."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        held = self._staging.get(name)
        if held is None or held.nbytes < nbytes:
            held = self.device.host_array((max(1, nbytes),), np.uint8)
            self._staging[name] = held
        return held[:nbytes].view(dtype).reshape(tuple(shape))

    def _upload(self, name: str, array: np.ndarray) -> int:
        """Copy ``array`` through page-locked staging into device buffer ``name``."""
        staging = self._host(name, array.shape, array.dtype)
        np.copyto(staging, array)
        ptr = self._buffer(name, array.nbytes)
        self.device.upload(ptr, staging, self.stream)
        return ptr

    def _download(self, name: str, ptr: int, shape: Sequence[int], dtype: Any) -> np.ndarray:
        """Copy device buffer ``ptr`` to the host once the queued work is done."""
        staging = self._host(name, shape, dtype)
        self.device.download(staging, ptr, self.stream)
        self.device.synchronize(self.stream)
        return staging.copy()

    def close(self) -> None:
        """Free the device buffers (the staging arrays go with the object)."""
        for ptr, _ in self._buffers.values():
            self.device.free(ptr)
        self._buffers.clear()
        self._staging.clear()
        self._weights_patch = None

    # --------------------------------------------------------------------------------- steps
    def _enqueue(self, inputs: int, outputs: int, batch: int) -> None:
        with cuda_step(f"running {self.engine.name} on a batch of {batch} tiles"):
            self.engine.enqueue(inputs, outputs, batch, self.stream)

    def _check_engine(self, tile: Shape) -> None:
        e = self.engine
        if tuple(e.tile_shape) != tuple(tile):
            raise InferenceError(f"{e.name} takes tiles of {tuple(e.tile_shape)}; "
                                 f"the bundle's window needs {tuple(tile)}")
        if e.max_batch < 1:
            raise InferenceError(f"{e.name} has max_batch {e.max_batch}; it must run at least one tile")
        if not 1 <= e.channels <= 256:
            raise InferenceError(f"{e.name} has {e.channels} output channels; uint8 labels allow 1 to 256")

    def _model_image(self, voxels: np.ndarray, spacing: Sequence[float], pre: Preprocess, *, centred: bool
                     ) -> tuple[int, Shape]:
        """Upload the volume; resample it to the model spacing and normalise, on the device."""
        if voxels.ndim != 3:
            raise InferenceError(f"expected a (D, H, W) volume, got shape {voxels.shape}")
        if voxels.dtype != np.int16 and voxels.dtype != np.float32:
            voxels = voxels.astype(np.float32)
        native: Shape = voxels.shape
        src = self._upload("volume", np.ascontiguousarray(voxels))
        norm = Normalisation.of(pre)
        if pre.spacing_mm is None:
            model, target = native, tuple(spacing)
        else:
            model, target = model_grid_shape(native, tuple(spacing), pre.spacing_mm), pre.spacing_mm  # type: ignore[arg-type]
        image = self._buffer("image", FLOAT * math.prod(model))
        if centred:
            self.kernels.resample_centred(src, voxels.dtype, native, spacing, target, image, model, norm, self.stream)
        else:
            self.kernels.resample_aligned(src, voxels.dtype, native, image, model, norm, self.stream)
        return image, model

    # ------------------------------------------------------------------------------- sliding
    def sliding_labels(self, voxels: np.ndarray, spacing: Sequence[float], pre: Preprocess,
                       window: Window) -> np.ndarray:
        """segment._sliding on the GPU: (D, H, W) uint8 labels on the volume's grid, before post-processing."""
        if (pre.resampling is not Resampling.LINEAR or pre.normalisation is not IntensityScheme.FIXED
                or pre.transpose != (0, 1, 2)):
            raise InferenceError(f"the GPU-resident pipeline reproduces linear resampling with a fixed normalisation "
                                 f"on the image's own axes; resampling {pre.resampling.value!r}, normalisation "
                                 f"{pre.normalisation.value!r} and transpose {list(pre.transpose)} run on the CPU")
        engine, k = self.engine, self.kernels
        patch: Shape = tuple(window.patch)  # type: ignore[assignment]
        self._check_engine(patch)
        if tuple(engine.output_shape) != patch:
            raise InferenceError(f"{engine.name} returns {tuple(engine.output_shape)} per tile; the sliding window "
                                 f"needs the tile's own shape {patch}")
        native: Shape = voxels.shape
        image, model = self._model_image(voxels, spacing, pre, centred=False)  # to_model_grid: resample_linear
        pad_value = window.pad_value if window.pad_value is not None else (pre.clip[0] + pre.offset) * pre.scale

        corners = tile_corners(model, patch, window.overlap)
        corners_ptr = self._upload("corners", corners)
        if self._weights_patch != patch:
            self._upload("weights", gaussian_weights(patch))
            self._weights_patch = patch
        weights = self._buffers["weights"][0]

        channels, voxels_per_tile = engine.channels, math.prod(patch)
        grid_voxels = math.prod(model)
        acc = self._buffer("acc", FLOAT * channels * grid_voxels)
        norm = self._buffer("norm", FLOAT * grid_voxels)
        self.device.zero(acc, FLOAT * channels * grid_voxels, self.stream)
        self.device.zero(norm, FLOAT * grid_voxels, self.stream)
        tiles = self._buffer("tiles", FLOAT * engine.max_batch * voxels_per_tile)
        probs = self._buffer("probs", FLOAT * engine.max_batch * channels * voxels_per_tile)

        for first in range(0, len(corners), engine.max_batch):
            group = corners[first:first + engine.max_batch]
            k.extract_tiles(image, model, tiles, corners_ptr + first * 3 * 4, len(group), patch, pad_value, self.stream)
            self._enqueue(tiles, probs, len(group))
            for j, corner in enumerate(group):
                k.accumulate_tile(acc, norm, model, probs + FLOAT * j * channels * voxels_per_tile, weights, channels,
                                  patch, [int(c) for c in corner], self.stream)

        labels = self._buffer("labels", math.prod(native))
        k.labels_native_argmax(acc, norm, channels, model, labels, native, self.stream)
        return self._download("labels", labels, native, np.uint8)

    # -------------------------------------------------------------------------- single block
    def single_block_channels(self, image: np.ndarray, spacing: Sequence[float], pre: Preprocess, window: Window,
                              activation: Activation, threshold: float, values: Sequence[int]
                              ) -> tuple[list[tuple[int, np.ndarray]], Shape]:
        """block.segment_single_block's device part, from the image before its last resampling (after the
        median) to the per-label masks on the model grid: ([(label value, bool mask)], model-grid shape).

        Sigmoid: mask i = output channel i > threshold; softmax: mask = (argmax == value)."""
        if window.block is None or pre.spacing_mm is None:
            raise InferenceError("single-block inference needs [window] block and [preprocess] spacing_mm")
        block: Shape = tuple(window.block)  # type: ignore[assignment]
        self._check_engine(block)
        engine = self.engine
        image_ptr, model = self._model_image(image, spacing, pre, centred=True)
        pad = window.pad_value if window.pad_value is not None else (pre.clip[0] + pre.offset) * pre.scale
        block_ptr = self._buffer("tiles", FLOAT * math.prod(block))
        self.kernels.place_in_block(image_ptr, model, block_ptr, block, pad, self.stream)
        out_shape: Shape = tuple(engine.output_shape)  # type: ignore[assignment]
        out_voxels = math.prod(out_shape)
        output = self._buffer("probs", FLOAT * engine.channels * out_voxels)
        self._enqueue(block_ptr, output, 1)
        masks = self._buffer("labels", engine.channels * out_voxels)
        if activation is Activation.SIGMOID:
            if len(values) > engine.channels:
                raise InferenceError(f"{engine.name} has {engine.channels} channels for {len(values)} sigmoid labels")
            self.kernels.threshold_sigmoid(output, masks, engine.channels * out_voxels, threshold, 1, self.stream)
            above = self._download("labels", masks, (engine.channels, *out_shape), np.uint8)
            inside = image_probabilities(above, model, block, window.output_margin)
            return [(value, inside[i] > 0) for i, value in enumerate(values)], model
        self.kernels.labels_native_argmax(output, 0, engine.channels, out_shape, masks, out_shape, self.stream)
        best = self._download("labels", masks, (1, *out_shape), np.uint8)
        inside = image_probabilities(best, model, block, window.output_margin)[0].astype(np.uint8)
        return [(value, inside == value) for value in values], model
