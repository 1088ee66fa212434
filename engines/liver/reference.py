"""Independent float64 NumPy forward pass of the pyliverlesionseg 0.3 liver U-Net.

This is the yardstick for ``convert.py``: it shares no code with the converter and works in the
package's own conventions, so that a mistake in the converter's axis order, kernel orientation,
padding, cropping or normalisation shows up as a difference between the two:

* arrays are channels-last ``(x, y, z, C)`` in the package's array order (what
  ``unet_liver_predict`` feeds to Keras, i.e. after the LPS → RAS flip of axes 0 and 1);
* Keras kernels are used exactly as stored, ``(kx, ky, kz, C_in, C_out)``, as a cross-correlation;
* every step is computed in float64 (instance-norm statistics with ``np.mean``/``np.std``).

The forward pass follows ``create_unet_like_model`` (pyliverlesionseg/architectures/
unet_generalized.py, lines 255-333) with the arguments of ``unet_liver_predict``
(cnn_liver_lesion_seg_CT_MR_functions.py, lines 152-177): ``padding='same'``,
``upsampling='linear'`` (UpSampling3D ×s then AveragePooling3D(s, strides=1, padding='valid'),
unet_generalized.py:141-146), instance normalisation ``(x - mean) / (std + K.epsilon())`` with
``K.epsilon() = 1e-7`` (line 105), LeakyReLU(0.01) (line 122), max pooling (line 132), centre
cropping of the skip connection (line 298), ``Concatenate([skip, upsampled])`` (line 299) and a final
1×1×1 convolution with a sigmoid (line 333). The alignment AveragePooling3D of line 295 has pool size
1 for this configuration (all parities are even), i.e. it is the identity, and is omitted.

Weights are assigned like Keras 2.2 ``load_weights`` (topological, by order): the layers in the
file's ``layer_names`` that carry weights, in that order, to the network's Conv3D layers in creation
order.

Slow but small inputs (54³) take a few seconds. Usage::

    python engines/liver/reference.py --wheel /path/pyliverlesionseg-0.3-py3-none-any.whl --size 54 54 54
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np

#: Arguments of create_unet_like_model in unet_liver_predict (cnn_liver_lesion_seg_CT_MR_functions.py:152-177).
SUBSAMPLE_FACTORS = [(1, 1, 1), (3, 3, 3), (9, 9, 9), (27, 27, 27)]
KERNEL_SIZES = [
    [[(3, 3, 1), (3, 3, 3)], [(3, 3, 3), (3, 3, 1)]],
    [[(3, 3, 1), (3, 3, 3)], [(3, 3, 3), (3, 3, 1)]],
    [[(3, 3, 1), (3, 3, 3)], [(3, 3, 3), (3, 3, 1)]],
    [[(3, 3, 3), (3, 3, 3)], []],
]
NUMBER_FEATURES = [
    [[20, 40], [40, 20]],
    [[40, 80], [80, 40]],
    [[80, 160], [160, 80]],
    [[160, 160], []],
]
COMMON_KERNELS = [(1, 1, 1)]
COMMON_FEATURES = [1]
EPSILON = 1e-7  # keras.backend.epsilon() default
LEAKY_ALPHA = 0.01

LIVER_HDF5_SUFFIX = "model_unet_ct_mr_liv_seg_resize_1.5mm_med_3_resize_3mm_20201011_dice_loss_val_binary_dice_mean.hdf5"


def read_hdf5_bytes(source: str | Path) -> bytes:
    """The liver model's HDF5 bytes, from the wheel (a zip) or from an extracted .hdf5 file."""
    source = Path(source)
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            names = [n for n in zf.namelist() if n.endswith(LIVER_HDF5_SUFFIX)]
            if len(names) != 1:
                raise ValueError(f"{source}: expected one member ending in {LIVER_HDF5_SUFFIX}, found {names}")
            return zf.read(names[0])
    return source.read_bytes()


def load_weights(source: str | Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(kernel (kx,ky,kz,Ci,Co) float64, bias (Co,) float64), ...] in Keras load order."""
    import h5py

    with h5py.File(io.BytesIO(read_hdf5_bytes(source)), "r") as f:
        weights = []
        for raw in f.attrs["layer_names"]:
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            wnames = [w.decode() if isinstance(w, bytes) else str(w) for w in f[name].attrs["weight_names"]]
            if not wnames:
                continue
            arrays = {w.split("/")[-1].split(":")[0]: np.asarray(f[name][w], dtype=np.float64) for w in wnames}
            weights.append((arrays["kernel"], arrays["bias"]))
    return weights


# ----------------------------------------------------------------------------- layers (channels-last)


def conv3d_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Keras Conv3D(padding='same', strides=1): zero padding (k-1)//2 before, the rest after."""
    X, Y, Z, _ = x.shape
    kx, ky, kz, _, co = kernel.shape
    pads = [((k - 1) // 2, (k - 1) - (k - 1) // 2) for k in (kx, ky, kz)] + [(0, 0)]
    xp = np.pad(x, pads)
    out = np.zeros((X, Y, Z, co), dtype=np.float64)
    for a in range(kx):
        for b in range(ky):
            for c in range(kz):
                out += np.tensordot(xp[a : a + X, b : b + Y, c : c + Z, :], kernel[a, b, c], axes=([3], [0]))
    return out + bias


def instance_norm(x: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=(0, 1, 2), keepdims=True)
    std = x.std(axis=(0, 1, 2), keepdims=True)  # population std, as K.std
    return (x - mean) / (std + EPSILON)


def leaky_relu(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x, LEAKY_ALPHA * x)


def max_pool(x: np.ndarray, s: tuple[int, int, int]) -> np.ndarray:
    """MaxPooling3D(pool_size=s, strides=s, padding='valid')."""
    if tuple(s) == (1, 1, 1):
        return x
    X, Y, Z, C = x.shape
    sx, sy, sz = s
    nx, ny, nz = X // sx, Y // sy, Z // sz
    x = x[: nx * sx, : ny * sy, : nz * sz]
    return x.reshape(nx, sx, ny, sy, nz, sz, C).max(axis=(1, 3, 5))


def upsample_linear(x: np.ndarray, s: tuple[int, int, int]) -> np.ndarray:
    """UpSampling3D(s) (nearest, repeat) then AveragePooling3D(s, strides=1, padding='valid')."""
    if tuple(s) == (1, 1, 1):
        return x
    up = x
    for axis, f in enumerate(s):
        up = np.repeat(up, f, axis=axis)
    X, Y, Z, C = up.shape
    sx, sy, sz = s
    out = np.zeros((X - sx + 1, Y - sy + 1, Z - sz + 1, C), dtype=np.float64)
    for a in range(sx):
        for b in range(sy):
            for c in range(sz):
                out += up[a : a + out.shape[0], b : b + out.shape[1], c : c + out.shape[2]]
    return out / (sx * sy * sz)


def centre_crop(x: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
    """Cropping3D([int((l - r) / 2) ...]) — symmetric."""
    idx = []
    for l, r in zip(x.shape[:3], target[:3]):
        c = int((l - r) / 2)
        idx.append(slice(c, l - c))
    return x[tuple(idx)]


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# ----------------------------------------------------------------------------- network


def forward(image_xyz: np.ndarray, weights: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Probability map (X-26, Y-26, Z-26) for one preprocessed (X, Y, Z) block (multiples of 27).

    ``image_xyz`` is in the package's network-input order and units: RAS-flipped (x, y, z) array,
    CT normalised as clip(HU/1000, -0.2, 0.2)*2.5.
    """
    if image_xyz.ndim != 3 or any(n % 27 for n in image_xyz.shape):
        raise ValueError(f"expected an (X, Y, Z) block with multiples of 27, got {image_xyz.shape}")
    convs = iter(weights)

    def conv(path, k_s, n_f):
        kernel, bias = next(convs)
        assert kernel.shape[:3] == tuple(k_s) and kernel.shape[4] == n_f, (kernel.shape, k_s, n_f)
        return conv3d_same(path, kernel, bias)

    path = np.asarray(image_xyz, dtype=np.float64)[..., None]
    nb_pathways = len(SUBSAMPLE_FACTORS)

    # Downwards (unet_generalized.py:265-291)
    left_outputs = []
    prev = np.ones(3, dtype=int)
    for i, (s_f_p_p, k_s_p_p, n_f_p_p) in enumerate(
        zip([(1, 1, 1)] + SUBSAMPLE_FACTORS, [[[], []]] + KERNEL_SIZES, [[[], []]] + NUMBER_FEATURES)
    ):
        s_f = tuple(int(v) for v in np.array(s_f_p_p) // prev)
        prev = np.array(s_f_p_p)
        path = max_pool(path, s_f)
        if i > 0:
            for j, (k_s, n_f) in enumerate(zip(k_s_p_p[0], n_f_p_p[0])):
                if i > 1 or j > 0:
                    path = leaky_relu(instance_norm(path))
                path = conv(path, k_s, n_f)
        left_outputs.append(path)

    # Upwards (unet_generalized.py:293-320)
    prev = np.array(SUBSAMPLE_FACTORS[-1])
    levels = list(
        enumerate(
            zip(
                [(1, 1, 1), (1, 1, 1)] + SUBSAMPLE_FACTORS[:-1],
                [[[], []]] + KERNEL_SIZES,
                [[[], []]] + NUMBER_FEATURES,
            )
        )
    )
    for i, (s_f_p_p, k_s_p_p, n_f_p_p) in reversed(levels):
        if i > 0:
            if i < nb_pathways:
                path = np.concatenate([centre_crop(left_outputs[i], path.shape), path], axis=-1)
            for j, (k_s, n_f) in enumerate(zip(k_s_p_p[1], n_f_p_p[1])):
                path = leaky_relu(instance_norm(path))
                path = conv(path, k_s, n_f)
        s_f = tuple(int(v) for v in prev // np.array(s_f_p_p))
        prev = np.array(s_f_p_p)
        path = upsample_linear(path, s_f)

    # Common pathway (unet_generalized.py:323-333)
    for k_s, n_f in zip(COMMON_KERNELS, COMMON_FEATURES):
        path = leaky_relu(instance_norm(path))
        path = conv(path, k_s, n_f)
    path = sigmoid(path)

    if next(convs, None) is not None:
        raise ValueError("the weight file has more convolutions than the architecture")
    return path[..., 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", required=True, help="pyliverlesionseg-0.3 wheel or the extracted liver .hdf5")
    ap.add_argument("--size", type=int, nargs=3, default=[54, 54, 54], help="(x, y, z) block size, multiples of 27")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    weights = load_weights(args.wheel)
    x = np.random.default_rng(args.seed).uniform(-0.5, 0.5, size=args.size)
    y = forward(x, weights)
    print(f"parameters={sum(k.size + b.size for k, b in weights)} output shape={y.shape} "
          f"min={y.min():.6f} max={y.max():.6f} mean={y.mean():.6f}")


if __name__ == "__main__":
    main()
